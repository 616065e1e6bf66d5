"""Export: a transformers model (hub id, local directory or .gguf) to a validated package."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from llmopt.errors import PackageError, ValidationError
from llmopt.exporter.options import FP16_TOLERANCE, ExportOptions
from llmopt.package import (
    EXTERNAL_DATA_NAME,
    MANIFEST_NAME,
    MODEL_NAME,
    SCHEMA_VERSION,
    Manifest,
    Package,
    Signature,
    graph_signature,
    now_iso,
    save_model,
    staging,
    tool_versions,
)

__all__ = ["ExportOptions", "export"]

log = logging.getLogger("llmopt.exporter")


def export(source: str | os.PathLike[str], out_dir: str | os.PathLike[str],
           options: ExportOptions | None = None) -> Package:
    """Export ``source`` to a model package in ``out_dir`` and validate it against PyTorch.

    Raises :class:`~llmopt.errors.ValidationError` (after writing the package, marked failed)
    when the graph disagrees with PyTorch beyond the tolerance.
    """
    from llmopt.exporter import registry, sources

    options = options or ExportOptions()
    out = Path(out_dir)
    _check_output_dir(out)
    started = time.perf_counter()
    source_ = sources.resolve(str(source), options.revision)
    config = sources.load_config(source_, options.trust_remote_code)
    task = options.task or _default_task(config)
    arch = registry.choose(config, task, options.builder)  # refusals come before any weight
    log.info("loading %s (%s, %s, %s builder)", source, arch.name, task, arch.builder)
    model = sources.load_model(source_, task, options.trust_remote_code, options.allow_pickle)
    tokenizer = _try_tokenizer(source_, options.trust_remote_code)
    log.info("emitting the ONNX graph (%s)", options.dtype)
    proto, layout = arch.emit(model, options.dtype)

    final = out
    with staging(final) as tmp:
        package = _write_and_validate(tmp, proto, model, tokenizer, source_, config, task, arch,
                                      layout, options, started)
    package.path = final
    validation = package.manifest.validation
    if validation is not None and not validation["passed"]:
        raise ValidationError(
            f"exported graph differs from PyTorch: {_failure_summary(validation)}; "
            f"package written to {final} and marked failed",
            fix="report it with the manifest attached, or raise --tolerance if the differences "
            "are acceptable",
            report=validation,
        )
    return package


def _write_and_validate(out: Path, proto: Any, model: Any, tokenizer: Any, source_: Any,
                        config: Any, task: str, arch: Any, layout: dict[str, Any],
                        options: ExportOptions, started: float) -> Package:
    external = save_model(proto, out / MODEL_NAME, options.external_data)
    del proto
    _save_side_files(model, tokenizer, out)

    import onnxruntime

    opset = 18
    manifest = Manifest({
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "architecture": arch.name,
        "builder": arch.builder,
        "model_type": str(config.model_type),
        "source": source_.manifest(),
        "onnx": {
            "file": MODEL_NAME,
            "external_data": EXTERNAL_DATA_NAME if external else None,
            "opset": opset,
            "dtype": options.dtype,
        },
        "signature": _signature(out / MODEL_NAME),
        "kv_cache": layout if arch.kind == "decoder" else None,
        "encoder": layout if arch.kind == "encoder" else None,
        "generation": _generation_info(model, tokenizer, layout) if arch.kind == "decoder"
        else None,
        "labels": _labels(config) if task == "text-classification" else None,
        "versions": tool_versions(),
        "steps": [{"stage": "export", "time": now_iso(), "options": _options_dict(options),
                   "seconds": None}],
        "validation": None,
    })
    package = Package(out, manifest)

    if options.validate:
        tolerance = options.tolerance or (
            FP16_TOLERANCE if options.dtype == "float16" else arch.tolerance
        )
        from llmopt.runtime.session import cpu_session

        log.info("validating against PyTorch on CPU (tolerance %g)", tolerance)
        session = cpu_session(out / MODEL_NAME)
        report = arch.validate(model, session, layout, tokenizer, tolerance,
                               options.generation_tokens)
        report["provider"] = "CPUExecutionProvider"
        report["onnxruntime"] = onnxruntime.__version__
        manifest.validation = report
    package.update_step(seconds=round(time.perf_counter() - started, 2))
    return package


def _default_task(config: Any) -> str:
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "text-generation"
    if any(a.endswith("Model") for a in architectures) and not getattr(config, "is_decoder",
                                                                       False):
        from llmopt.exporter import traced

        if traced.default_task(str(config.model_type)) is not None and str(
                config.model_type) not in _decoder_only():
            return "feature-extraction"  # a bare encoder (ElectraModel, ModernBertModel)
    from llmopt.exporter import registry

    return registry.default_task(str(config.model_type))


def _decoder_only() -> set[str]:
    """Model types transformers has a causal LM for and no masked-LM or classifier head:
    decoders, whose bare ``...Model`` class is still a decoder."""
    from transformers.models.auto import modeling_auto as auto

    return set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PackageError(f"{out} exists and is not a directory",
                           fix="choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise PackageError(
            f"{out} is not empty and is not an llmopt package; refusing to overwrite it",
            fix="choose an empty or new output directory",
        )


def _save_side_files(model: Any, tokenizer: Any, out: Path) -> None:
    import json

    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF source is dequantized in the package
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _try_tokenizer(source: Any, trust_remote_code: bool) -> Any:
    from llmopt.errors import SourceError
    from llmopt.exporter import sources

    try:
        return sources.load_tokenizer(source, trust_remote_code)
    except SourceError as exc:
        log.warning("no tokenizer found for %s; the package will take token ids only",
                    source.reference)
        log.debug("tokenizer load failed: %s", exc)
        return None


def _generation_info(model: Any, tokenizer: Any, layout: dict[str, Any]) -> dict[str, Any]:
    config = model.generation_config
    eos = config.eos_token_id
    eos_ids = [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]
    pad = config.pad_token_id if config.pad_token_id is not None else getattr(
        tokenizer, "pad_token_id", None)
    return {
        "eos_token_ids": [int(e) for e in eos_ids],
        "bos_token_id": config.bos_token_id,
        "pad_token_id": pad if pad is not None else (eos_ids[0] if eos_ids else 0),
        "context_length": int(layout["max_positions"]),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def _labels(config: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}


def _signature(path: Path) -> Signature:
    import onnx

    return graph_signature(onnx.load(str(path), load_external_data=False))


def _options_dict(options: ExportOptions) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(options)


def _failure_summary(report: dict[str, Any]) -> str:
    parts = []
    for case in report["cases"]:
        if "error" in case:
            parts.append(f"{case['case']}: the graph failed to run ({case['error']})")
        elif not case["passed"]:
            worst = max(case["max_abs_diff"].items(), key=lambda kv: kv[1])
            parts.append(f"{case['case']}: {worst[0]} max abs diff {worst[1]:.3g}")
    for gen in report.get("generation", []):
        if not gen["match"]:
            parts.append(f"greedy tokens differ from token {gen['first_mismatch']} "
                         f"on {gen['prompt']!r}")
    return "; ".join(parts) + f" (tolerance {report['tolerance']:g})"
