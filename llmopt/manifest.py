"""The package manifest (``llmopt.json``) as a typed object.

The JSON document is the contract between the stages and every reader of a package (the
runtime, the server, the bench, tools outside llmopt); its format is declared in
``llmopt/data/manifest.schema.json``. :class:`Manifest` keeps that document exactly as read, so
a package read and written again is byte-identical and keys a newer llmopt added survive, and
gives the library typed properties over it: ``manifest.vocab_size`` instead of walking
``["signature"]["outputs"][0]["shape"][-1]`` at each reader. Loading checks the document
against the schema's required keys, so a damaged manifest fails when the package is opened,
naming the key, rather than as a ``KeyError`` deep inside a stage.

Sections are ``TypedDict`` views of the JSON objects: typed for mypy, plain dicts at run time.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, NoReturn, TypedDict

from llmopt.errors import PackageError

SCHEMA_VERSION = 1
TASKS = ("text-generation", "feature-extraction", "text-classification")
DECODER_TASK = "text-generation"


class Source(TypedDict):
    kind: str  # hub, local or gguf
    reference: str
    gguf_file: str | None
    revision: str | None
    sha256: str | None


class OnnxFile(TypedDict):
    file: str
    external_data: str | None
    opset: int | None
    dtype: str


class TensorSpec(TypedDict):
    name: str
    dtype: str
    shape: list[str | int]


class Signature(TypedDict):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class _KVCacheRequired(TypedDict):
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layout: str
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    max_positions: int
    sliding_window: int | None
    rope_attention_scaling: float


class KVCacheLayout(_KVCacheRequired, total=False):
    """Decoders: the cache the runtime allocates and feeds back (schema ``$defs/kv_cache``)."""

    rope_long_after: int
    rope_local_attention_scaling: float
    shared_buffer: bool


class _EncoderRequired(TypedDict):
    inputs: list[str]
    output: str
    padding_side: str
    pad_token_id: int | None
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    max_positions: int
    num_labels: int | None
    dtype: str
    pooling: str
    normalize: bool
    pooling_from: str


class EncoderLayout(_EncoderRequired, total=False):
    """Encoders: inputs, output, padding and pooling (schema ``$defs/encoder``)."""

    other_modules: list[str]


class Generation(TypedDict):
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int
    context_length: int
    chat_template: bool


# Top-level keys whose value is an object with required keys of its own: key -> schema $defs name
_SECTIONS = {"source": "source", "onnx": "onnx", "signature": "signature",
             "kv_cache": "kv_cache", "encoder": "encoder", "generation": "generation",
             "versions": "versions"}
_NULLABLE = frozenset({"kv_cache", "encoder", "generation"})


class Manifest(Mapping[str, Any]):
    """A package's ``llmopt.json``: the document as written (read-only mapping access, for tools
    and tests that look at raw keys) and typed properties, which library code reads.

    Stages change a manifest only through :meth:`derived` and the few setters below
    (``validation``, ``fidelity``, :meth:`update_step`), so every change is one the schema
    declares.
    """

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @classmethod
    def from_dict(cls, data: Any, where: str = "the manifest") -> Manifest:
        """A manifest checked against the schema's required keys (see :func:`check`)."""
        check(data, where)
        return cls(data)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read and check ``path`` (an ``llmopt.json``)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PackageError(f"{path} is unreadable: {exc}",
                               fix="re-export the package with `llmopt export`") from None
        return cls.from_dict(data, str(path))

    # --- the document ----------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Manifest):
            return self._data == other._data
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable through the setters

    def __repr__(self) -> str:
        return f"Manifest({self.task}, {self.architecture}, steps={self.stages})"

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the document."""
        return copy.deepcopy(self._data)

    def to_json(self, *, sort_keys: bool = False) -> str:
        """The document as ``llmopt.json`` holds it (key order kept unless ``sort_keys``)."""
        return json.dumps(self._data, indent=2, sort_keys=sort_keys, default=_json_default)

    # --- what the package is ---------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self._data["schema_version"])

    @property
    def task(self) -> str:
        return str(self._data["task"])

    @property
    def is_decoder(self) -> bool:
        return self.task == DECODER_TASK

    @property
    def architecture(self) -> str:
        return str(self._data["architecture"])

    @property
    def model_type(self) -> str:
        return str(self._data["model_type"])

    @property
    def builder(self) -> str:
        """``native`` or ``traced``: which exporter builder made the graph (packages from before
        the traced builder are native)."""
        return str(self._data.get("builder", "native"))

    @property
    def source(self) -> Source:
        return self._data["source"]

    @property
    def onnx(self) -> OnnxFile:
        return self._data["onnx"]

    @property
    def dtype(self) -> str:
        """Float type of the weights and activations (quantized packages stay float32)."""
        return str(self.onnx["dtype"])

    @property
    def versions(self) -> dict[str, str]:
        return dict(self._data["versions"])

    # --- the graph's interface -------------------------------------------------------------

    @property
    def signature(self) -> Signature:
        return self._data["signature"]

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.signature["inputs"]]

    @property
    def vocab_size(self) -> int:
        """Decoders: rows of the logits (the first output's last axis); token ids lie below."""
        return int(str(self.signature["outputs"][0]["shape"][-1]))

    @property
    def kv_cache(self) -> KVCacheLayout | None:
        """Decoders: the KV-cache layout; None for encoders."""
        return self._data["kv_cache"]

    @property
    def encoder(self) -> EncoderLayout | None:
        """Encoders: inputs, output, padding and pooling; None for decoders."""
        return self._data["encoder"]

    @property
    def generation(self) -> Generation | None:
        """Decoders: special tokens, context length, chat template; None for encoders."""
        return self._data["generation"]

    @property
    def labels(self) -> dict[str, str]:
        """text-classification: class index (as a string) -> label; empty for other tasks."""
        return dict(self._data["labels"] or {})

    @property
    def context_length(self) -> int:
        """Longest sequence the model takes: prompt plus generated tokens for a decoder, the
        input for an encoder."""
        if self.generation is not None:
            return int(self.generation["context_length"])
        assert self.encoder is not None  # check() requires one of the two
        return int(self.encoder["max_positions"])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Decoders: the tokens that end generation (empty for encoders)."""
        generation = self.generation
        return tuple(int(e) for e in generation["eos_token_ids"]) if generation else ()

    @property
    def pad_token_id(self) -> int:
        """The token that fills padded positions (0 where the package names none)."""
        if self.generation is not None:
            return int(self.generation["pad_token_id"] or 0)
        return int(self.encoder["pad_token_id"] or 0) if self.encoder else 0

    # --- how it was made -------------------------------------------------------------------

    @property
    def steps(self) -> list[dict[str, Any]]:
        """Every pipeline step, oldest first (export, then optimize / quantize)."""
        return self._data["steps"]

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(str(step["stage"]) for step in self.steps)

    @property
    def last_step(self) -> dict[str, Any]:
        return self.steps[-1]

    @property
    def quantization(self) -> str | None:
        """The method of the quantize step (``int8``, ``int4``, ``int4_gguf``, ...), or None
        for a float package."""
        methods = [str(step.get("method")) for step in self.steps if step["stage"] == "quantize"]
        return methods[-1] if methods else None

    @property
    def validation(self) -> dict[str, Any] | None:
        """The numerical check of this graph (against PyTorch or the parent), None if not run."""
        return self._data.get("validation")

    @validation.setter
    def validation(self, report: dict[str, Any] | None) -> None:
        self._data["validation"] = report

    @property
    def fidelity(self) -> dict[str, Any] | None:
        """Quantized packages: what quantization cost against the parent, None if skipped."""
        return self._data.get("fidelity")

    @fidelity.setter
    def fidelity(self, report: dict[str, Any] | None) -> None:
        self._data["fidelity"] = report

    def update_step(self, **details: Any) -> None:
        """Add details (seconds, sizes) to the last step, measured after the graph was written."""
        self.steps[-1].update(details)

    # --- deriving ---------------------------------------------------------------------------

    def derived(self, stage: str, signature: Signature, step: dict[str, Any], *,
                dtype: str | None = None,
                kv_cache: Mapping[str, Any] | None = None) -> Manifest:
        """The manifest of a package ``stage`` makes from this one's: ``step`` appended, the
        new graph's ``signature``, validation reset (the new graph is not checked yet), and for
        a quantize step fidelity reset (measured next, or null when skipped). ``dtype`` changes
        the float type everywhere it is recorded; ``kv_cache`` changes keys of the cache
        layout (decoders only)."""
        data = copy.deepcopy(self._data)
        data["signature"] = signature
        data["steps"] = [*data["steps"], step]
        data["validation"] = None
        if stage == "quantize":
            data["fidelity"] = None
        if dtype is not None:
            data["onnx"]["dtype"] = dtype
            for layout in ("kv_cache", "encoder"):
                if data.get(layout):
                    data[layout]["dtype"] = dtype
        if kv_cache and data.get("kv_cache"):
            data["kv_cache"].update(kv_cache)
        return Manifest(data)

    def with_file(self, onnx: Mapping[str, Any], versions: Mapping[str, str]) -> Manifest:
        """This manifest describing a freshly written graph file: its ``onnx`` keys and the
        versions of the tools that wrote it."""
        data = copy.deepcopy(self._data)
        data["onnx"] = {**data["onnx"], **onnx}
        data["versions"] = dict(versions)
        return Manifest(data)


def check(data: Any, where: str = "the manifest") -> None:
    """Raise :class:`PackageError` unless ``data`` has what the typed properties read: the
    schema version this llmopt reads, every key the schema requires (top level and in each
    section), a known task with the sections it needs, and an export step first. The full
    schema (types, patterns) is checked by tests/test_docs.py on every manifest llmopt writes."""
    if not isinstance(data, dict):
        _invalid(where, f"it holds a {type(data).__name__}, not an object")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise PackageError(
            f"{where} has schema version {version!r}; this llmopt reads up to {SCHEMA_VERSION}",
            fix="upgrade llmopt (pip install -U llmopt) or re-export the package",
        )
    schema = _schema()
    _require(data, schema["required"], where, "")
    for key, name in _SECTIONS.items():
        value = data[key]
        if value is None and key in _NULLABLE:
            continue
        if not isinstance(value, dict):
            _invalid(where, f"`{key}` is {type(value).__name__}, not an object")
        _require(value, schema["$defs"][name].get("required", ()), where, f"{key}.")
    if data["task"] not in TASKS:
        _invalid(where, f"unknown task {data['task']!r} (known: {', '.join(TASKS)})")
    needed = ("kv_cache", "generation") if data["task"] == DECODER_TASK else ("encoder",)
    for key in needed:
        if data[key] is None:
            _invalid(where, f"a {data['task']} package needs `{key}`, and it is null")
    if not data["signature"]["outputs"]:
        _invalid(where, "`signature.outputs` is empty")
    steps = data["steps"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        _invalid(where, "`steps` is not a list of steps")
    if steps[0].get("stage") != "export":
        _invalid(where, "`steps` does not start with the export step")


def _require(obj: dict[str, Any], required: Any, where: str, prefix: str) -> None:
    missing = [key for key in required if key not in obj]
    if missing:
        _invalid(where, "missing " + ", ".join(f"`{prefix}{key}`" for key in missing))


def _invalid(where: str, problem: str) -> NoReturn:
    raise PackageError(f"{where} is not a valid llmopt manifest: {problem}",
                       fix="re-export the package with `llmopt export` (the format is "
                       "llmopt/data/manifest.schema.json)")


@cache
def _schema() -> dict[str, Any]:
    from importlib import resources

    text = resources.files("llmopt.data").joinpath("manifest.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the manifest")
