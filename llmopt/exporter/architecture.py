"""What an architecture description is, and the table descriptions register into.

Kept apart from the lookups (``registry.py``), which load the built-in descriptions
(``architectures/``) first: the descriptions import :func:`register` from here, so neither
side imports the other.
"""

from __future__ import annotations

from typing import Any, Protocol

from llmopt.package import Package


class Architecture(Protocol):
    """What the exporter needs of an architecture description (decoder or encoder)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def model_types(self) -> tuple[str, ...]: ...
    @property
    def tasks(self) -> tuple[str, ...]: ...
    @property
    def tolerance(self) -> float: ...
    @property
    def min_transformers(self) -> str: ...
    @property
    def builder(self) -> str: ...

    def emit(self, model: Any, dtype: Any) -> tuple[Any, dict[str, Any]]: ...

    def reemit(self, package: Package, tensors: Any, fusions: frozenset[str], dtype: str,
               gqa: bool | None = None) -> tuple[Any, dict[str, str]]: ...

    def validate(self, model: Any, session: Any, layout: dict[str, Any], tokenizer: Any,
                 tolerance: float, generation_tokens: int) -> dict[str, Any]: ...


REGISTERED: dict[str, Architecture] = {}  # model_type -> its description


def register(arch: Architecture) -> Architecture:
    for model_type in arch.model_types:
        if model_type in REGISTERED:
            raise ValueError(f"model type {model_type!r} registered twice")
        REGISTERED[model_type] = arch
    return arch
