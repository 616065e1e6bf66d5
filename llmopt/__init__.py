"""llmopt: export, optimize, quantize, serve and benchmark Transformer models on ONNX Runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmopt.errors import (
    BusyError,
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
    "AsyncClient",
    "BusyError",
    "CPUOptions",
    "CUDAOptions",
    "Client",
    "ExportOptions",
    "InvalidInputError",
    "LlmoptError",
    "OptimizeOptions",
    "Package",
    "PackageError",
    "ProviderError",
    "QuantizeOptions",
    "ResponseFormat",
    "SamplingParams",
    "ShapeRange",
    "SourceError",
    "TensorRTOptions",
    "UnsupportedError",
    "ValidationError",
    "__version__",
    "export",
    "load",
    "optimize",
    "quantize",
]

if TYPE_CHECKING:
    from llmopt.client import AsyncClient, Client
    from llmopt.exporter import ExportOptions, export
    from llmopt.optimizer import OptimizeOptions, optimize
    from llmopt.quantizer import QuantizeOptions, quantize
    from llmopt.runtime import load
    from llmopt.runtime.constraints import ResponseFormat
    from llmopt.runtime.providers import CPUOptions, CUDAOptions, ShapeRange, TensorRTOptions
    from llmopt.runtime.sampling import SamplingParams

_LAZY = {
    "load": ("llmopt.runtime", "load"),
    "SamplingParams": ("llmopt.runtime.sampling", "SamplingParams"),
    "ResponseFormat": ("llmopt.runtime.constraints", "ResponseFormat"),
    "CPUOptions": ("llmopt.runtime.providers", "CPUOptions"),
    "CUDAOptions": ("llmopt.runtime.providers", "CUDAOptions"),
    "TensorRTOptions": ("llmopt.runtime.providers", "TensorRTOptions"),
    "ShapeRange": ("llmopt.runtime.providers", "ShapeRange"),
    "export": ("llmopt.exporter", "export"),
    "ExportOptions": ("llmopt.exporter.options", "ExportOptions"),
    "optimize": ("llmopt.optimizer", "optimize"),
    "OptimizeOptions": ("llmopt.optimizer", "OptimizeOptions"),
    "quantize": ("llmopt.quantizer", "quantize"),
    "QuantizeOptions": ("llmopt.quantizer", "QuantizeOptions"),
    "Client": ("llmopt.client", "Client"),
    "AsyncClient": ("llmopt.client", "AsyncClient"),
}


def __getattr__(name: str) -> Any:
    """Import stages on first use, so ``import llmopt`` (and the CLI) stays fast."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
