"""Validation of a derived package (optimized or quantized) against the package it came from."""

from __future__ import annotations

from llmopt.errors import ValidationError
from llmopt.package import Package

FP32_TOLERANCE = 2e-3
FP16_TOLERANCE = 3e-2


def check_against(result: Package, parent: Package, dtype: str, tolerance: float | None,
                  generation_tokens: int, require_generation: bool | None = None) -> dict:
    """Compare ``result`` with ``parent`` on the export validation cases; record the report in
    ``result``'s manifest and raise ValidationError (package kept, marked failed) on a miss."""
    from llmopt.runtime import load_tokenizer
    from llmopt.runtime.session import cpu_session

    tol = tolerance or (FP16_TOLERANCE if dtype == "float16" else FP32_TOLERANCE)
    tokenizer = load_tokenizer(parent.path)
    if parent.is_decoder:
        from llmopt.exporter.validate import OnnxReference, validate_decoder

        reference = OnnxReference(cpu_session(parent.model_path), parent.kv_cache,
                                  parent.manifest.eos_token_ids, parent.manifest.vocab_size)
        report = validate_decoder(reference, cpu_session(result.model_path), result.kv_cache,
                                  tokenizer, tol, generation_tokens,
                                  require_generation=require_generation)
    else:
        from llmopt.exporter.validate import validate_encoder_against

        report = validate_encoder_against(parent, result, tokenizer, tol)
    report["against"] = str(parent.path)
    result.manifest.validation = report
    result.write_manifest()
    if not report["passed"]:
        from llmopt.exporter import _failure_summary

        raise ValidationError(
            f"{result.path} differs from {parent.path}: {_failure_summary(report)}; "
            "package written and marked failed",
            fix="try a lower level or fewer fusions, or raise --tolerance if acceptable",
            report=report,
        )
    return report
