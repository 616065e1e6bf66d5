"""Options for ``llmopt.export``."""

from __future__ import annotations

from dataclasses import dataclass

from llmopt.errors import InvalidInputError
from llmopt.package import TASKS

DTYPES = ("float32", "float16")
BUILDERS = ("auto", "native", "traced")
# fp16 graphs are compared with the float32 PyTorch model; this is their tolerance.
FP16_TOLERANCE = 3e-2


@dataclass(frozen=True)
class ExportOptions:
    """How to export. ``None`` means "the default for this model".

    - ``task``: text-generation, feature-extraction or text-classification (default: from the
      model's config).
    - ``dtype``: float32, or float16 (for GPUs; validated on CPU with a looser tolerance).
    - ``external_data``: store weights beside the graph in ``model.onnx.data``; ``None`` does
      so for decoders (the CPU runtime reads their graph without the weights) and where the
      model exceeds protobuf's 2 GB limit.
    - ``validate``: compare against PyTorch (keep it on; off only for quick experiments).
    - ``tolerance``: override the architecture's validation tolerance.
    - ``generation_tokens``: tokens of greedy generation compared with PyTorch.
    - ``builder``: ``native`` (a registered architecture: the graph emitted from the weights,
      fused by ``optimize``), ``traced`` (the PyTorch module traced, for any architecture
      transformers runs) or ``auto`` (native where registered, else traced).
    """

    task: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    revision: str | None = None
    external_data: bool | None = None
    validate: bool = True
    tolerance: float | None = None
    generation_tokens: int = 16
    builder: str = "auto"

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise InvalidInputError(
                f"unknown task {self.task!r}",
                fix=f"use one of: {', '.join(TASKS)}",
            )
        if self.dtype not in DTYPES:
            raise InvalidInputError(
                f"unknown dtype {self.dtype!r}", fix=f"use one of: {', '.join(DTYPES)}"
            )
        if self.tolerance is not None and not self.tolerance > 0:
            raise InvalidInputError("tolerance must be positive", fix="pass e.g. 1e-3")
        if self.builder not in BUILDERS:
            raise InvalidInputError(
                f"unknown builder {self.builder!r}", fix=f"use one of: {', '.join(BUILDERS)}"
            )
        if self.generation_tokens < 0:
            raise InvalidInputError("generation_tokens must be >= 0", fix="pass e.g. 16")
