"""A model package: a directory holding an ONNX model, its tokenizer and a manifest.

Every stage reads a package and writes one; ``llmopt.json`` records how it was made (source,
signature, KV-cache layout, every step applied, validation results, tool versions).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmopt.errors import PackageError

MANIFEST_NAME = "llmopt.json"
MODEL_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx.data"
SCHEMA_VERSION = 1

TASKS = ("text-generation", "feature-extraction", "text-classification")


@dataclass
class Package:
    """A model package on disk. ``manifest`` is the parsed ``llmopt.json``."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

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
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PackageError(
                f"{manifest_path} is unreadable: {exc}",
                fix="re-export the package with `llmopt export`",
            ) from None
        version = manifest.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise PackageError(
                f"{manifest_path} has schema version {version!r}; this llmopt reads up to "
                f"{SCHEMA_VERSION}",
                fix="upgrade llmopt (pip install -U llmopt) or re-export the package",
            )
        package = cls(root, manifest)
        if not package.model_path.is_file():
            raise PackageError(
                f"{package.model_path} is missing from the package",
                fix="re-export the package with `llmopt export`",
            )
        return package

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.get("onnx", {}).get("file", MODEL_NAME)

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def is_decoder(self) -> bool:
        return self.task == "text-generation"

    @property
    def builder(self) -> str:
        """``native`` or ``traced``: which exporter builder made the graph (packages from before
        the traced builder are native)."""
        return str(self.manifest.get("builder", "native"))

    @property
    def kv_cache(self) -> dict[str, Any]:
        return dict(self.manifest.get("kv_cache") or {})

    def write_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.manifest, indent=2, sort_keys=False, default=_json_default)
        (self.path / MANIFEST_NAME).write_text(text + "\n")

    def add_step(self, stage: str, **details: Any) -> None:
        """Record a pipeline step (export, optimize, quantize) in the manifest."""
        step = {"stage": stage, "time": now_iso(), **details}
        self.manifest.setdefault("steps", []).append(step)

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


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the manifest")


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


def write_derived(parent: Package, out_dir: str | os.PathLike[str], proto: Any,
                  manifest: dict[str, Any], external_data: bool | None = None) -> Package:
    """Write a package made from ``parent``: its side files (tokenizer, configs) and a new
    graph and manifest, into a temporary sibling directory moved into place at the end."""
    import shutil

    import onnx

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
        size = sum(len(t.raw_data) for t in proto.graph.initializer)
        if external_data is None:
            external_data = size > 2**31 - 2**26
        if external_data:
            onnx.save_model(proto, str(tmp / MODEL_NAME), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=EXTERNAL_DATA_NAME,
                            size_threshold=1024)
        else:
            onnx.save_model(proto, str(tmp / MODEL_NAME))
        manifest = dict(manifest)
        manifest["onnx"] = {**manifest.get("onnx", {}), "file": MODEL_NAME,
                            "external_data": EXTERNAL_DATA_NAME if external_data else None,
                            "opset": max((o.version for o in proto.opset_import
                                          if o.domain in ("", "ai.onnx")), default=None)}
        manifest["versions"] = tool_versions()
        package = Package(tmp, manifest)
        package.write_manifest()
    package.path = out
    return package


def graph_signature(proto: Any) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph: name, numpy dtype name, shape (symbolic names)."""
    import onnx

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            out.append({"name": value.name, "dtype": dtype, "shape": shape})
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}
