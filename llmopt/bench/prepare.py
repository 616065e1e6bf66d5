"""Create the packages a config names but that do not exist yet, through llmopt's own API.

A package's ``prepare`` says how:

    prepare: {export: fetch:smollm2-135m-instruct}          # or a .gguf file, directory, hub id
    prepare: {optimize: {from: fp32, level: 2}}               # OptimizeOptions(level=...)
    prepare: {quantize: {from: fused, preset: int8_dynamic}}  # QuantizeOptions.<preset>()
    prepare: {ort_dynamic: {from: fused}}                     # ONNX Runtime's quantize_dynamic

Packages are made in dependency order; one that cannot be made (for instance because this llmopt
has no quantizer yet) is reported and left missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
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
    kinds = set(steps) - {"options"}
    if set(steps) - {"export", "optimize", "quantize", "ort_dynamic", "options"} \
            or len(kinds) != 1:
        raise InvalidInputError(f"packages.{spec.label}.prepare needs exactly one of export, "
                                "optimize, quantize, ort_dynamic (and optionally options)",
                                fix="e.g. prepare: {export: fetch:smollm2-135m-instruct}")
    options = dict(steps.get("options") or {})
    if "export" in steps:
        from llmopt.exporter import ExportOptions, export

        source = _source(str(steps["export"]))
        progress(f"prepare: {spec.label}: exporting {source} to {spec.path}")
        export(source, spec.path, ExportOptions(**options))
        return
    kind = kinds.pop()
    step = steps[kind]
    example = {"optimize": "optimize: {from: fp32, level: 2}",
               "quantize": "quantize: {from: fp32, preset: int8_dynamic}",
               "ort_dynamic": "ort_dynamic: {from: fused}"}[kind]
    if not isinstance(step, dict) or "from" not in step or (
            kind == "quantize" and "preset" not in step):
        raise InvalidInputError(f"packages.{spec.label}.prepare.{kind} needs from"
                                + (" and preset" if kind == "quantize" else ""),
                                fix=f"e.g. {example}")
    base = str(step["from"])
    if base not in config.packages:
        raise InvalidInputError(f"packages.{spec.label}: {kind} from unknown package {base!r}",
                                fix=f"defined packages: {', '.join(config.packages)}")
    need(base)
    if kind == "ort_dynamic":
        progress(f"prepare: {spec.label}: ONNX Runtime quantize_dynamic of {base} to "
                 f"{spec.path}")
        ort_quantize_dynamic(config.packages[base].path, spec.path)
        return
    if kind == "optimize":
        from llmopt.optimizer import OptimizeOptions, optimize

        level = int(step.get("level", 2))
        progress(f"prepare: {spec.label}: optimizing {base} (level {level}) to {spec.path}")
        optimize(config.packages[base].path, spec.path, OptimizeOptions(level=level, **options))
        return
    quantize, options_cls = _quantizer()
    preset = getattr(options_cls, str(step["preset"]), None)
    if preset is None:
        raise InvalidInputError(f"unknown quantize preset {step['preset']!r}",
                                fix="use a QuantizeOptions preset, e.g. int8_dynamic or int4")
    progress(f"prepare: {spec.label}: quantizing {base} ({step['preset']}) to {spec.path}")
    quantize(config.packages[base].path, spec.path, preset(**options))


def ort_quantize_dynamic(base: Path, out: Path) -> Path:
    """ONNX Runtime's own ``quantize_dynamic`` with its defaults (per-tensor int8 weights, as
    optimum's ``avx512_vnni`` dynamic config) on every weight MatMul of ``base``, written as a
    package beside it (same tokenizer; its manifest records an ``int8_dynamic`` quantize step
    made by that tool): the reference int8 of other tools."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from llmopt.package import Package

    if (out / "model.onnx").is_file():
        return out
    parent = Package.open(base)
    op_types, extra = ["MatMul"], {"MatMulConstBOnly": True}
    with tempfile.TemporaryDirectory(prefix="llmopt-ort-dynamic-") as tmp:
        quantized = Path(tmp) / "model.onnx"
        quantize_dynamic(parent.model_path, quantized, op_types_to_quantize=op_types,
                         weight_type=QuantType.QInt8,
                         extra_options={**extra, "DefaultTensorType": onnx.TensorProto.FLOAT})
        options = {"tool": "onnxruntime.quantization.quantize_dynamic",
                   "weight_type": QuantType.QInt8.name, "per_channel": False,
                   "op_types_to_quantize": op_types, "extra_options": extra}
        Package.derive(parent, out, "quantize", onnx.load(str(quantized)),
                       method="int8_dynamic", options=options, kept_float=[])
    return out


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
