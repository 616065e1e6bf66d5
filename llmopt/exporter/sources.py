"""Where a model comes from: a Hugging Face hub id, a local directory, or a ``.gguf`` file.

Loading goes through transformers' own ``from_pretrained`` (GGUF included), with two safety
defaults: repository code never runs without ``trust_remote_code``, and pickled weights are
refused unless the user opts in.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmopt.errors import SourceError, UnsupportedError
from llmopt.exporter import gguf_header

GGUF_MAGIC = b"GGUF"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_AUTO_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
}


@dataclass(frozen=True)
class Source:
    kind: str  # "hub" | "local" | "gguf"
    reference: str  # what the user passed
    directory: str  # what from_pretrained takes: a local directory or a hub id
    gguf_file: str | None = None
    revision: str | None = None

    def manifest(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "reference": self.reference,
            "gguf_file": self.gguf_file,
            "revision": self.revision,
            "sha256": self.sha256(),
        }

    def sha256(self) -> str | None:
        """Content hash of the weights and config this source resolved to."""
        if self.kind == "gguf":
            return _hash_files([Path(self.directory) / str(self.gguf_file)])
        directory: Path | None = Path(self.directory)
        if self.kind == "hub":
            directory = _hub_snapshot(self.directory, self.revision)
        if directory is None:
            return None
        files = [p for p in directory.iterdir()
                 if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)]
        return _hash_files(sorted(files))


def resolve(reference: str, revision: str | None = None) -> Source:
    """Classify ``reference`` and check what can be checked before loading anything."""
    path = Path(reference).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(
                f"{reference} is a file but not a .gguf model",
                fix="pass a .gguf file, a Hugging Face model directory, or a hub id",
            )
        _check_gguf(path)
        return Source("gguf", reference, str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
            raise SourceError(
                f"{reference} has no config.json, so it is not a Hugging Face model "
                f"directory{hint}",
                fix="pass a directory written by save_pretrained, a .gguf file, or a hub id",
            )
        return Source("local", reference, str(path.resolve()))
    if _looks_like_path(reference):
        raise SourceError(
            f"{reference} does not exist",
            fix="check the path, or pass a Hugging Face hub id such as "
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    return Source("hub", reference, reference, revision=revision)


def gguf_reader(path: str | os.PathLike[str]) -> Any:
    """A ``gguf.GGUFReader`` for ``path``, shared while the file is unchanged (it maps the
    file and parses its metadata once: seconds for a real model)."""
    stat = Path(path).stat()
    return _gguf_reader(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str, mtime_ns: int, size: int) -> Any:
    from gguf.gguf_reader import GGUFReader  # the class itself, even while _hub_errors patches

    del mtime_ns, size  # part of the cache key only
    return GGUFReader(path)


def load_config(source: Source, trust_remote_code: bool) -> Any:
    """The transformers config (a GGUF source's header was checked by :func:`resolve`)."""
    from transformers import AutoConfig

    with _hub_errors(source):
        return AutoConfig.from_pretrained(
            source.directory, gguf_file=source.gguf_file, revision=source.revision,
            trust_remote_code=trust_remote_code,
        )


def load_model(source: Source, task: str, trust_remote_code: bool, allow_pickle: bool) -> Any:
    """The PyTorch model in float32, eval mode, eager attention (the reference semantics)."""
    import torch
    import transformers

    auto = getattr(transformers, _AUTO_CLASSES[task])
    kwargs: dict[str, Any] = {
        "dtype": torch.float32,
        "trust_remote_code": trust_remote_code,
        "revision": source.revision,
        "attn_implementation": "eager",
    }
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    elif not allow_pickle:
        kwargs["use_safetensors"] = True
    with _hub_errors(source, allow_pickle=allow_pickle):
        model = auto.from_pretrained(source.directory, **kwargs)
    return model.eval()


def load_tokenizer(source: Source, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    if source.kind == "local" and not trust_remote_code:
        from llmopt.runtime import load_tokenizer as load_saved

        tokenizer = load_saved(source.directory)
        if tokenizer is None:
            raise SourceError(f"no tokenizer in {source.reference}", fix="add tokenizer files")
        return tokenizer
    with _hub_errors(source):
        return AutoTokenizer.from_pretrained(
            source.directory, gguf_file=source.gguf_file, revision=source.revision,
            trust_remote_code=trust_remote_code,
        )


class _hub_errors:
    """Turn transformers' loading exceptions into one-line SourceErrors with the fix."""

    def __init__(self, source: Source, allow_pickle: bool = True) -> None:
        self.source = source
        self.allow_pickle = allow_pickle
        self.patched: Any = None

    def __enter__(self) -> None:
        if self.source.kind == "gguf" and importlib.util.find_spec("gguf") is not None:
            # transformers builds a new GGUFReader for the config, the model and the tokenizer,
            # ~8 s each for SmolLM2 (every metadata field parsed in Python): share one
            import gguf

            self.patched = gguf.GGUFReader
            gguf.GGUFReader = gguf_reader  # type: ignore[assignment,misc]

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if self.patched is not None:
            import gguf

            gguf.GGUFReader = self.patched  # type: ignore[misc]
            self.patched = None
        if exc is None or isinstance(exc, SourceError) or not isinstance(exc, Exception):
            return False
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        lowered = str(exc).lower()
        if "trust_remote_code" in lowered:
            raise SourceError(
                f"{self.source.reference} needs code from its repository to load",
                fix="review that code, then pass --trust-remote-code (trust_remote_code=True)",
            ) from None
        if not self.allow_pickle and "safetensors" in lowered:
            raise SourceError(
                f"{self.source.reference} has no safetensors weights; its pickled weights "
                "could run arbitrary code when loaded",
                fix="convert the weights to safetensors, or pass --allow-pickle "
                "(allow_pickle=True) if you trust the source",
            ) from None
        if self.source.kind == "hub":
            raise SourceError(
                f"could not load {self.source.reference!r} from the Hugging Face Hub: {text}",
                fix="check the id and your network; offline, set HF_HUB_OFFLINE=1 to use the "
                "local cache, or pass a local model directory or .gguf file",
            ) from None
        if self.source.kind == "gguf":
            _require("gguf", "gguf")
            _require("accelerate", "gguf")
            if "gguf model with architecture" in lowered and "not supported" in lowered:
                import transformers

                arch = text.split("architecture", 1)[1].split("is not", 1)[0].strip()
                raise UnsupportedError(
                    f"transformers {transformers.__version__} cannot read {arch!r} models "
                    f"from GGUF files ({self.source.reference})",
                    fix="export the model's Hugging Face checkpoint (a directory or hub id) "
                    "instead, or upgrade transformers if a newer one reads this architecture",
                ) from None
            raise SourceError(
                f"could not read GGUF file {self.source.reference}: {text}",
                fix="check the file is a complete GGUF model of a supported architecture "
                "(re-download it if it is truncated)",
            ) from None
        raise SourceError(
            f"could not load the model in {self.source.reference}: {text}",
            fix="check the directory holds a complete save_pretrained model",
        ) from None


def _require(module: str, extra: str) -> None:
    import importlib.util

    from llmopt.errors import MissingDependencyError

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(module, extra)


def _check_gguf(path: Path) -> None:
    """The magic bytes, then what the header alone decides (:mod:`gguf_header`): a file
    transformers cannot read, would read as another model, or llmopt cannot export is refused
    here, before transformers parses it or dequantizes a weight."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise SourceError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
            fix="re-download the file; it may be corrupt or another format",
        )
    _require("gguf", "gguf")
    gguf_header.check(gguf_header.read(path))


def _looks_like_path(reference: str) -> bool:
    return (
        reference.startswith((".", "/", "~"))
        or reference.endswith(".gguf")
        or reference.count("/") > 1
        or (os.sep != "/" and os.sep in reference)
    )


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    try:
        from transformers.utils import cached_file

        config = cached_file(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001  (the hash is best-effort for hub sources)
        return None
    return Path(config).parent if config else None


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
