"""Run model packages on ONNX Runtime: ``load`` returns a Generator or an Embedder."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from llmopt.package import Package
from llmopt.runtime.embedder import Embedder
from llmopt.runtime.generator import Generator, TextStream
from llmopt.runtime.memory import decoder_provider_options
from llmopt.runtime.providers import CPUOptions, CUDAOptions, ShapeRange, TensorRTOptions
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import GenerationResult, GenerationStats
from llmopt.runtime.session import ProviderSpec, SessionInfo, create_session

__all__ = [
    "CPUOptions",
    "CUDAOptions",
    "Embedder",
    "GenerationResult",
    "GenerationStats",
    "Generator",
    "SamplingParams",
    "SessionInfo",
    "ShapeRange",
    "TensorRTOptions",
    "TextStream",
    "load",
]


def load(package: str | os.PathLike[str] | Package,
         providers: Sequence[ProviderSpec] | None = None, *,
         provider_options: Mapping[str, Any] | None = None,
         strict: bool = False) -> Generator | Embedder:
    """Open a package on the first of ``providers`` that loads (default ``["cpu"]``).

    ``strict=True`` raises :class:`~llmopt.errors.ProviderError` instead of falling back to a
    later provider; ``runner.session_info`` says which provider holds the session and why.
    Decoders run on CPU without ONNX Runtime's memory arena unless CPU options are given
    (:mod:`llmopt.runtime.memory`).
    """
    pkg = package if isinstance(package, Package) else Package.open(package)
    if pkg.is_decoder:
        provider_options = decoder_provider_options(provider_options)
    source = pkg.manifest.get("source") or {}
    fingerprint = f"{source.get('sha256')}:{pkg.manifest.get('steps')}"
    session, info = create_session(pkg.model_path, providers, provider_options, strict,
                                   signature=pkg.manifest.get("signature"),
                                   model_fingerprint=fingerprint)
    tokenizer = load_tokenizer(pkg.path)
    if pkg.is_decoder:
        return Generator(pkg, session, info, tokenizer)
    return Embedder(pkg, session, info, tokenizer)


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The package's tokenizer as it was at export (None if it has none).

    A tokenizer saved as the generic fast class is loaded as that class: AutoTokenizer would
    otherwise pick the model type's own class, which may rebuild the pipeline differently.
    """
    import json
    from pathlib import Path

    import transformers

    config_file = Path(path) / "tokenizer_config.json"
    if not config_file.is_file() and not (Path(path) / "tokenizer.json").is_file():
        return None
    try:
        saved = json.loads(config_file.read_text()).get("tokenizer_class") \
            if config_file.is_file() else None
        if saved in GENERIC_TOKENIZERS:
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):  # unreadable: the package takes token ids only
        return None
