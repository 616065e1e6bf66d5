"""Run model packages on ONNX Runtime: ``load`` returns a Generator or an Embedder."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from llmopt.package import Package
from llmopt.runtime.embedder import Embedder
from llmopt.runtime.generator import GenerationResult, GenerationStats, Generator, TextStream
from llmopt.runtime.providers import CPUOptions, CUDAOptions, ShapeRange, TensorRTOptions
from llmopt.runtime.sampling import SamplingParams
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
    """
    from transformers import AutoTokenizer

    pkg = package if isinstance(package, Package) else Package.open(package)
    source = pkg.manifest.get("source") or {}
    fingerprint = f"{source.get('sha256')}:{pkg.manifest.get('steps')}"
    session, info = create_session(pkg.model_path, providers, provider_options, strict,
                                   signature=pkg.manifest.get("signature"),
                                   model_fingerprint=fingerprint)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg.path))
    if pkg.is_decoder:
        return Generator(pkg, session, info, tokenizer)
    return Embedder(pkg, session, info, tokenizer)
