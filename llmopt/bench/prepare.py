"""Create the packages a config names but that do not exist yet, through llmopt's own API.

A package's ``prepare`` says how:

    prepare: {export: fetch:smollm2-135m-instruct}          # or a .gguf file, directory, hub id
    prepare: {quantize: {from: fp32, preset: int8_dynamic}}  # QuantizeOptions.<preset>()

Packages are made in dependency order; one that cannot be made (for instance because this llmopt
has no quantizer yet) is reported and left missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llmopt.bench.config import BenchConfig, PackageSpec
from llmopt.errors import InvalidInputError, LlmoptError, UnsupportedError

log = logging.getLogger("llmopt.bench")


def prepare_packages(config: BenchConfig,
                     progress: Callable[[str], None] = log.info) -> dict[str, str]:
    """Build every missing package that has a ``prepare`` step; returns {label: why not} for
    those that could not be built."""
    failed: dict[str, str] = {}
    done: set[str] = set()

    def make(label: str, chain: tuple[str, ...] = ()) -> None:
        spec = config.packages[label]
        if label in done or (spec.path / "llmopt.json").is_file():
            done.add(label)
            return
        if label in chain:
            raise InvalidInputError(f"packages {' -> '.join((*chain, label))} prepare each "
                                    "other in a cycle", fix="break the cycle in the config")
        if not spec.prepare:
            return
        try:
            _make_one(config, spec, lambda dep: make(dep, (*chain, label)), progress)
            done.add(label)
        except LlmoptError as exc:
            failed[label] = str(exc)
            progress(f"prepare: {label}: not built: {exc}")

    for label in config.packages:
        make(label)
    return failed


def _make_one(config: BenchConfig, spec: PackageSpec, need: Callable[[str], None],
              progress: Callable[[str], None]) -> None:
    steps = dict(spec.prepare or {})
    if set(steps) - {"export", "quantize", "options"} or len(set(steps) - {"options"}) != 1:
        raise InvalidInputError(f"packages.{spec.label}.prepare needs exactly one of export, "
                                "quantize (and optionally options)",
                                fix="e.g. prepare: {export: fetch:smollm2-135m-instruct}")
    options = dict(steps.get("options") or {})
    if "export" in steps:
        from llmopt.exporter import ExportOptions, export

        source = _source(str(steps["export"]))
        progress(f"prepare: {spec.label}: exporting {source} to {spec.path}")
        export(source, spec.path, ExportOptions(**options))
        return
    quant = steps["quantize"]
    if not isinstance(quant, dict) or "from" not in quant or "preset" not in quant:
        raise InvalidInputError(f"packages.{spec.label}.prepare.quantize needs from and preset",
                                fix="e.g. quantize: {from: fp32, preset: int8_dynamic}")
    base = str(quant["from"])
    if base not in config.packages:
        raise InvalidInputError(f"packages.{spec.label}: quantize from unknown package {base!r}",
                                fix=f"defined packages: {', '.join(config.packages)}")
    need(base)
    quantize, options_cls = _quantizer()
    preset = getattr(options_cls, str(quant["preset"]), None)
    if preset is None:
        raise InvalidInputError(f"unknown quantize preset {quant['preset']!r}",
                                fix="use a QuantizeOptions preset, e.g. int8_dynamic or int4")
    progress(f"prepare: {spec.label}: quantizing {base} ({quant['preset']}) to {spec.path}")
    quantize(config.packages[base].path, spec.path, preset(**options))


def _quantizer() -> tuple[Any, Any]:
    try:
        from llmopt.quantizer import QuantizeOptions, quantize
    except ImportError:
        raise UnsupportedError("this llmopt has no quantize stage yet",
                               fix="build the package another way, or leave it out") from None
    return quantize, QuantizeOptions


def _source(reference: str) -> str:
    if reference.startswith("fetch:"):
        from llmopt.models import fetch

        return str(fetch(reference.removeprefix("fetch:")))
    return reference
