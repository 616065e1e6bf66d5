"""The registry of architectures llmopt can export.

Each architecture is a small, declarative description (weight-name mappings, norm and
activation kinds, tolerance, minimum transformers version) registered once; the exporter
never dispatches on architecture names itself. Importing this module registers the built-in
descriptions (``architectures/``), which register into ``architecture.REGISTERED``.
"""

from __future__ import annotations

from typing import Any

import llmopt.exporter.architectures  # noqa: F401  (registers the built-in descriptions)
from llmopt.errors import UnsupportedError
from llmopt.exporter import traced
from llmopt.exporter.architecture import REGISTERED, Architecture, register
from llmopt.exporter.options import BUILDERS

__all__ = ["Architecture", "choose", "default_task", "find", "register", "supported"]


def find(model_type: str, task: str) -> Architecture:
    """The architecture for a transformers ``model_type``, checked to support ``task``."""
    arch = REGISTERED.get(model_type)
    if arch is None:
        raise UnsupportedError(
            f"architecture {model_type!r} is not supported; supported: "
            + ", ".join(sorted(REGISTERED)),
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
    model_type = str(config.model_type)
    if builder not in BUILDERS:
        raise UnsupportedError(f"unknown builder {builder!r}",
                               fix=f"use one of: {', '.join(BUILDERS)}")
    native = REGISTERED.get(model_type)
    if builder == "native" or (builder == "auto" and native is not None):
        if native is None:
            raise UnsupportedError(
                f"architecture {model_type!r} has no native builder; native: "
                + ", ".join(sorted(REGISTERED)),
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
    arch = REGISTERED.get(model_type)
    if arch is not None:
        return arch.tasks[0]
    return traced.default_task(model_type) or "text-generation"


def supported() -> list[Architecture]:
    """Every registered architecture, once each, in registration order."""
    seen: dict[str, Architecture] = {}
    for arch in REGISTERED.values():
        seen.setdefault(arch.name, arch)
    return list(seen.values())

