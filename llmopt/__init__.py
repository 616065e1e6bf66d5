"""llmopt: export, optimize, quantize, serve and benchmark Transformer models on ONNX Runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmopt.errors import (
    InvalidInputError,
    LlmoptError,
    PackageError,
    ProviderError,
    SourceError,
    UnsupportedError,
    ValidationError,
)
from llmopt.package import Package

__version__ = "0.1.0"

__all__ = [
    "ExportOptions",
    "InvalidInputError",
    "LlmoptError",
    "Package",
    "PackageError",
    "ProviderError",
    "SourceError",
    "UnsupportedError",
    "ValidationError",
    "__version__",
    "export",
]

if TYPE_CHECKING:
    from llmopt.exporter import ExportOptions, export

_LAZY = {
    "export": ("llmopt.exporter", "export"),
    "ExportOptions": ("llmopt.exporter.options", "ExportOptions"),
}


def __getattr__(name: str) -> Any:
    """Import stages on first use, so ``import llmopt`` (and the CLI) stays fast."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
