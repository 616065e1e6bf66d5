"""A readable summary of a model package: I/O, op histogram, size, steps, validation."""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

from llmopt.package import Package


def describe(path: str | os.PathLike[str] | Package) -> dict[str, Any]:
    """Everything ``llmopt inspect`` shows, as a dict (``--json`` prints it as is)."""
    import onnx

    package = path if isinstance(path, Package) else Package.open(path)
    proto = onnx.load(str(package.model_path), load_external_data=False)
    ops = Counter(
        f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in proto.graph.node
    )
    m = package.manifest
    return {
        "path": str(package.path),
        "task": m.task,
        "architecture": m.architecture,
        "builder": m.builder,
        "model_type": m.model_type,
        "source": m.source,
        "onnx": m.onnx,
        "size_bytes": package.size_bytes(),
        "nodes": len(proto.graph.node),
        "ops": dict(ops.most_common()),
        "signature": m.signature,
        "kv_cache": m.kv_cache,
        "generation": m.generation,
        "steps": m.steps,
        "validation": m.validation,
        "fidelity": m.fidelity,
        "versions": m.versions,
    }


def render(info: dict[str, Any]) -> str:
    """The summary as aligned text."""
    lines: list[str] = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<11} {text}")

    row("Package", info["path"])
    row("Task", f"{info['task']}  ({info['architecture']}, model_type {info['model_type']}, "
        f"{info['builder']} builder)")
    source = info.get("source") or {}
    digest = (source.get("sha256") or "")[:16]
    row("Source", f"{source.get('kind')} {source.get('reference')}"
        + (f"  [{source['gguf_file']}]" if source.get("gguf_file") else "")
        + (f"  sha256 {digest}..." if digest else ""))
    onnx_info = info.get("onnx") or {}
    external = onnx_info.get("external_data")
    row("ONNX", f"{onnx_info.get('file')}  opset {onnx_info.get('opset')}  "
        f"{onnx_info.get('dtype')}  {_size(info['size_bytes'])}"
        + (f"  (weights in {external})" if external else ""))
    signature = info.get("signature") or {}
    for label, key in (("Inputs", "inputs"), ("Outputs", "outputs")):
        for i, text in enumerate(_io_lines(signature.get(key, []))):
            row(label if i == 0 else "", text)
    kv = info.get("kv_cache")
    if kv:
        row("KV cache", f"{kv['num_layers']} layers x {kv['num_kv_heads']} KV heads "
            f"({kv['num_attention_heads']} query heads) x {kv['head_dim']} head dim, "
            f"{kv['dtype']}; context {kv.get('max_positions')}"
            + (f", sliding window {kv['sliding_window']}" if kv.get("sliding_window") else ""))
    ops = ", ".join(f"{op} {n}" for op, n in list(info["ops"].items())[:12])
    more = len(info["ops"]) - 12
    row("Ops", f"{info['nodes']} nodes: {ops}" + (f", +{more} more kinds" if more > 0 else ""))
    for i, step in enumerate(info.get("steps") or []):
        seconds = f" ({step['seconds']} s)" if step.get("seconds") is not None else ""
        row("Steps" if i == 0 else "", f"{step['stage']}{seconds} at {step.get('time')}")
    lines.extend(_validation_lines(info.get("validation")))
    if info.get("fidelity"):
        from llmopt.evaluate import format_fidelity

        lines.extend(f"{'Fidelity' if i == 0 else '':<11} {line}"
                     for i, line in enumerate(format_fidelity(info["fidelity"])))
    versions = info.get("versions") or {}
    row("Versions", ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def _io_lines(values: list[dict[str, Any]]) -> list[str]:
    """One line per tensor, with per-layer KV tensors folded into one line each."""
    out: list[str] = []
    folded: dict[str, list[dict[str, Any]]] = {}
    for value in values:
        key = re.sub(r"\.\d+\.", ".{i}.", value["name"])
        folded.setdefault(key, []).append(value)
    for key, group in folded.items():
        first = group[0]
        shape = ", ".join(str(d) for d in first["shape"])
        count = f"  x{len(group)}" if len(group) > 1 else ""
        out.append(f"{key:<28} {first['dtype']:<8} [{shape}]{count}")
    return out


def _validation_lines(validation: dict[str, Any] | None) -> list[str]:
    if not validation:
        return ["Validation  not run (quantized packages are measured: see Fidelity)"]
    verdict = "PASSED" if validation["passed"] else "FAILED"
    lines = [f"Validation  {verdict} on {validation.get('provider', '?')} "
             f"(tolerance {validation['tolerance']:g}: {validation.get('rule', '')})"]
    for case in validation.get("cases", []):
        diffs = case["max_abs_diff"]
        main = {k: v for k, v in diffs.items() if not k.startswith("present.")}
        presents = [v for k, v in diffs.items() if k.startswith("present.")]
        parts = [f"{k} {v:.2e}" for k, v in main.items()]
        if "error" in case:
            parts.append(f"failed to run: {case['error']}")
        if presents:
            parts.append(f"presents <= {max(presents):.2e}")
        mark = "ok" if case["passed"] else "FAIL"
        lines.append(f"{'':<11}   {mark:<4} {case['case']:<36} {', '.join(parts)}")
    generation = validation.get("generation") or []
    if generation:
        matched = sum(g["match"] for g in generation)
        counts = ", ".join(str(g["tokens"]) for g in generation)
        lines.append(f"{'':<11}   {'ok' if matched == len(generation) else 'FAIL':<4} greedy "
                     f"generation equals PyTorch on {matched}/{len(generation)} prompts "
                     f"({counts} tokens)")
    return lines


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1000
    return f"{value:.1f} GB"
