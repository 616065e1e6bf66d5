"""The registry of architectures llmopt can export.

Each architecture is a small, declarative description (weight-name mappings, norm and
activation kinds, tolerance, minimum transformers version) registered once; the exporter
never dispatches on architecture names itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from llmopt.errors import UnsupportedError
from llmopt.exporter.options import BUILDERS
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


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    for model_type in arch.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model type {model_type!r} registered twice")
        _REGISTRY[model_type] = arch
    return arch


def find(model_type: str, task: str) -> Architecture:
    """The architecture for a transformers ``model_type``, checked to support ``task``."""
    _load_builtin()
    arch = _REGISTRY.get(model_type)
    if arch is None:
        raise UnsupportedError(
            f"architecture {model_type!r} is not supported; supported: "
            + ", ".join(sorted(_REGISTRY)),
            fix="export a supported architecture, or add one (see CONTRIBUTING.md, "
            "'Adding an architecture')",
        )
    if task not in arch.tasks:
        raise UnsupportedError(
            f"{model_type} supports tasks {', '.join(arch.tasks)}, not {task!r}",
            fix=f"pass --task {arch.tasks[0]}",
        )
    return arch


def choose(config: Any, task: str, builder: str = "auto") -> Architecture:
    """The builder that exports a model with this transformers ``config`` for ``task``:
    ``native`` (a registered description: a fused graph emitted from the weights), ``traced``
    (the PyTorch module traced) or ``auto`` (native where registered, else traced). Decided from
    the config alone, so a refusal never costs a weight load."""
    from llmopt.exporter import traced

    _load_builtin()
    model_type = str(config.model_type)
    if builder not in BUILDERS:
        raise UnsupportedError(f"unknown builder {builder!r}",
                               fix=f"use one of: {', '.join(BUILDERS)}")
    native = _REGISTRY.get(model_type)
    if builder == "native" or (builder == "auto" and native is not None):
        if native is None:
            raise UnsupportedError(
                f"architecture {model_type!r} has no native builder; native: "
                + ", ".join(sorted(_REGISTRY)),
                fix="use --builder traced (or auto) to trace the PyTorch model instead",
            )
        if native.kind == "decoder":
            traced.check_rope(config, native=True)
        for check in getattr(native, "extra_checks", ()):  # the description's own refusals
            check(config)
        return find(model_type, task)
    traced.check_config(config, task)
    return traced.TracedArch(model_type, traced.kind_for_task(task))


def default_task(model_type: str) -> str:
    """The first task an architecture lists, else what transformers' auto classes suggest
    (text-generation where nothing does)."""
    from llmopt.exporter import traced

    _load_builtin()
    arch = _REGISTRY.get(model_type)
    if arch is not None:
        return arch.tasks[0]
    return traced.default_task(model_type) or "text-generation"


def supported() -> list[Architecture]:
    """Every registered architecture, once each, in registration order."""
    _load_builtin()
    seen: dict[str, Architecture] = {}
    for arch in _REGISTRY.values():
        seen.setdefault(arch.name, arch)
    return list(seen.values())


def _load_builtin() -> None:
    import llmopt.exporter.architectures  # noqa: F401  (registers the built-in architectures)
