"""A model package: a directory holding an ONNX model, its tokenizer and a manifest.

Every stage reads a package and writes one; ``llmopt.json`` records how it was made (source,
signature, KV-cache layout, every step applied, validation results, tool versions).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmopt.errors import PackageError
from llmopt.manifest import SCHEMA_VERSION, TASKS, Manifest, Signature, TensorSpec

__all__ = ["EXTERNAL_DATA_NAME", "MANIFEST_NAME", "MODEL_NAME", "PROTOBUF_LIMIT",
           "SCHEMA_VERSION", "TASKS", "Manifest", "Package", "Signature", "graph_signature",
           "save_model"]

MANIFEST_NAME = "llmopt.json"
MODEL_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx.data"
# Serialized ONNX models are protobuf messages, which cannot pass 2 GiB; weights past this
# (64 MiB of headroom for the graph itself) go to an external data file.
PROTOBUF_LIMIT = 2**31 - 2**26


@dataclass
class Package:
    """A model package on disk: its directory and its parsed, checked ``llmopt.json``."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Package:
        """Open an existing package directory, checking that it is complete."""
        root = Path(path)
        if not root.exists():
            raise PackageError(
                f"model package {root} does not exist",
                fix="pass the directory written by `llmopt export`",
            )
        manifest_path = root / MANIFEST_NAME
        if not root.is_dir() or not manifest_path.is_file():
            raise PackageError(
                f"{root} is not an llmopt model package (no {MANIFEST_NAME})",
                fix="create one with `llmopt export SOURCE -o DIR`",
            )
        package = cls(root, Manifest.read(manifest_path))
        if not package.model_path.is_file():
            raise PackageError(
                f"{package.model_path} is missing from the package",
                fix="re-export the package with `llmopt export`",
            )
        return package

    @classmethod
    def derive(cls, parent: Package, out_dir: str | os.PathLike[str], stage: str, proto: Any,
               *, dtype: str | None = None, kv_cache: Mapping[str, Any] | None = None,
               **step: Any) -> Package:
        """Write the package ``stage`` (optimize, quantize) makes from ``parent``: the graph
        ``proto``, ``parent``'s side files (tokenizer, configs) and its manifest with the step
        recorded (``step`` are its details, the parent's path added), the new graph's signature
        and validation reset (see :meth:`Manifest.derived`). ``dtype`` and ``kv_cache`` change
        what the new graph changed. Fill in what is measured afterwards with
        :meth:`update_step`."""
        record = {"stage": stage, "time": now_iso(), **step, "parent": str(parent.path)}
        manifest = parent.manifest.derived(stage, graph_signature(proto), record, dtype=dtype,
                                           kv_cache=kv_cache)
        return _write_derived(parent, out_dir, proto, manifest)

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.onnx["file"]

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def is_decoder(self) -> bool:
        return self.manifest.is_decoder

    @property
    def builder(self) -> str:
        return self.manifest.builder

    @property
    def kv_cache(self) -> dict[str, Any]:
        """The KV-cache layout as a fresh dict (empty for encoders)."""
        return dict(self.manifest.kv_cache or {})

    def write_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MANIFEST_NAME).write_text(self.manifest.to_json() + "\n")

    def update_step(self, **details: Any) -> None:
        """Add details measured after the graph was written (seconds, sizes) to the last step,
        and write the manifest."""
        self.manifest.update_step(**details)
        self.write_manifest()

    def size_bytes(self) -> int:
        """Bytes of the ONNX model and its external data."""
        total = 0
        for path in self.path.iterdir():
            if path.name == MODEL_NAME or path.name.startswith(MODEL_NAME + "."):
                total += path.stat().st_size
        return total


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shape a package, for the manifest and bench fingerprints."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("llmopt", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "numpy", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


SIDE_FILE_EXCLUDES = (MANIFEST_NAME, MODEL_NAME)


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write a package into, moved into place when the block
    succeeds and removed when it fails, so no half-written package is ever left behind."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _write_derived(parent: Package, out_dir: str | os.PathLike[str], proto: Any,
                   manifest: Manifest) -> Package:
    """Write a package made from ``parent``: its side files (tokenizer, configs) and a new
    graph and manifest, into a temporary sibling directory moved into place at the end."""
    import shutil

    out = Path(out_dir)
    if out.resolve() == parent.path.resolve():
        raise PackageError("the output directory is the input package",
                           fix="write the result to a new directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise PackageError(f"{out} is not empty and is not an llmopt package; refusing to "
                           "overwrite it", fix="choose an empty or new output directory")
    with staging(out) as tmp:
        for item in parent.path.iterdir():
            if item.is_file() and not item.name.startswith(SIDE_FILE_EXCLUDES):
                shutil.copy2(item, tmp / item.name)
        # int4 kernels that a prompt session runs too: their weights beside the graph, so that
        # session opens the graph without the weights (llmopt.runtime.prompt_graph)
        external_data = save_model(proto, tmp / MODEL_NAME,
                                   True if float_prompt_nodes(proto) else None)
        opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                    default=None)
        onnx_file = {"file": MODEL_NAME,
                     "external_data": EXTERNAL_DATA_NAME if external_data else None,
                     "opset": opset}
        package = Package(tmp, manifest.with_file(onnx_file, tool_versions()))
        package.write_manifest()
    package.path = out
    return package


def save_model(proto: Any, path: Path, external_data: bool | None = None) -> bool:
    """Save ``proto`` to ``path``, its weights in ``<path>.data`` when ``external_data`` or (by
    default) when they would not fit in one protobuf or the graph is a decoder's. Returns
    whether they went outside.

    A decoder's runtime reads its graph without its weights when it opens it on CPU (to move
    its MatMuls onto llmopt's kernels, :mod:`llmopt.runtime.kernels`, and for int4 prompts,
    :mod:`llmopt.runtime.prompt_graph`): with the weights inside the graph file, reading the
    graph reads them all (SmolLM2-135M fused: peak RSS at load 1.62 GB, against 0.8 GB with
    them beside it)."""
    import onnx

    if external_data is None:
        external_data = not fits_in_protobuf(proto) or is_decoder_graph(proto)
    if external_data:
        onnx.save_model(proto, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data",
                        size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return external_data


def is_decoder_graph(proto: Any) -> bool:
    """A graph with a KV cache (``past_key_values.*`` inputs)."""
    return any(i.name.startswith("past_key_values") for i in proto.graph.input)


INT8_COMPUTE = 4  # MatMulNBits accuracy_level: int8 activations


def float_prompt_nodes(proto: Any) -> list[Any]:
    """The MatMulNBits nodes of ``proto`` that a prompt session computes in float32
    (:mod:`llmopt.runtime.prompt_graph`): 4-bit codes at accuracy level 4."""
    found = []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("bits") == 4 and attrs.get("accuracy_level") == INT8_COMPUTE:
            found.append(node)
    return found


def fits_in_protobuf(proto: Any) -> bool:
    """Whether the model serializes under :data:`PROTOBUF_LIMIT`: its tensors summed first, so
    a model far past the limit is never serialized just to measure it."""
    if sum(len(t.raw_data) for t in proto.graph.initializer) >= PROTOBUF_LIMIT:
        return False
    return bool(proto.ByteSize() <= PROTOBUF_LIMIT)


def graph_signature(proto: Any) -> Signature:
    """Inputs and outputs of an ONNX graph: name, numpy dtype name, shape (symbolic names)."""
    import onnx

    def describe(values: Any) -> list[TensorSpec]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            out.append(TensorSpec(name=value.name, dtype=dtype, shape=shape))
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}
