"""Markdown tables of a run's analysis: one row per runtime and package, and the ratio rows.

The README's headline table is :func:`decoder_table` + :func:`ratio_table` of the committed
``bench/results/vs_genai`` run, written between markers by :mod:`llmopt.bench.report.readme`.
"""

from __future__ import annotations

from typing import Any


def comparison_markdown(results: dict[str, Any]) -> str:
    """The analysis section of summary.md ('' when the run has none)."""
    analysis = results.get("analysis")
    if not analysis:
        return ""
    lines = ["## Comparison", ""]
    bandwidth = analysis.get("bandwidth")
    if bandwidth:
        probes = ", ".join(f"{p['bytes_per_s'] / 1e9:.1f} ({p['when']})"
                           for p in bandwidth["probes"])
        lines += [f"Read-bandwidth limit: **{bandwidth['bytes_per_s'] / 1e9:.1f} GB/s** on "
                  f"{analysis['threads']} thread(s) (best probe; GB/s {probes}).", ""]
    for table in (decoder_table(results), ratio_table(results), encoder_table(results)):
        if table:
            lines += [table, ""]
    return "\n".join(lines)


def runtime_name(row: dict[str, Any]) -> str:
    target, package = row["target"], row["package"]
    if row.get("title"):
        return str(row["title"])
    if target == "pytorch":
        return "transformers eager PyTorch"
    if target == "genai":
        return f"ONNX Runtime GenAI {row['precision']}"
    return f"llmopt {package}" + (" (served)" if target == "server" else "")


def decoder_table(results: dict[str, Any]) -> str:
    rows = [r for r in (results.get("analysis") or {}).get("rows", [])
            if "decode_tokens_per_s" in r]
    if not rows:
        return ""
    reference = results["analysis"].get("reference")
    lines = [
        "| runtime | decode tok/s | TTFT ms | prefill tok/s | peak RSS MiB | MB read/token | "
        f"% of read limit | perplexity (vs {reference or 'reference'}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ppl = "-" if r.get("perplexity") is None else f"{r['perplexity']:.2f}"
        if r.get("perplexity_delta_pct") is not None:
            ppl += f" ({r['perplexity_delta_pct']:+.2f}%)"
        lines.append(
            f"| {runtime_name(r)} | {_f(r['decode_tokens_per_s'], 1)} | "
            f"{_f(_times(r.get('ttft_s'), 1000), 0)} | {_f(r.get('prefill_tokens_per_s'), 0)} | "
            f"{_f(_times(r.get('peak_rss_bytes'), 2**-20), 0)} | "
            f"{_f(_times(r.get('bytes_per_token'), 1e-6), 1)} | "
            f"{_f(_times(r.get('bandwidth_fraction'), 100), 0)} | {ppl} |")
    return "\n".join(lines)


def ratio_table(results: dict[str, Any]) -> str:
    ratios = [r for r in (results.get("analysis") or {}).get("ratios", [])
              if "decode_tokens_per_s" in r]
    if not ratios:
        return ""
    lines = ["| llmopt package vs | decode tok/s | TTFT (lower is faster) | prefill tok/s |",
             "|---|---:|---:|---:|"]
    names = {r["package"]: runtime_name(r) for r in results["analysis"]["rows"]}
    for r in ratios:
        lines.append(f"| {names.get(r['package'], r['package'])} vs "
                     f"{names.get(r['against'], r['against'])} | "
                     f"{_x(r.get('decode_tokens_per_s'))} | {_x(r.get('ttft_s'))} | "
                     f"{_x(r.get('prefill_tokens_per_s'))} |")
    return "\n".join(lines)


def encoder_table(results: dict[str, Any]) -> str:
    analysis = results.get("analysis") or {}
    rows = [r for r in analysis.get("rows", []) if "sequences_per_s" in r]
    if not rows:
        return ""
    reference = analysis.get("reference")
    ratios = {(r["package"], r["workload"]["batch_size"]): r for r in analysis.get("ratios", [])}
    lines = [f"| runtime | batch | latency ms | sentences/s | x its comparison (sentences/s) | "
             f"peak RSS MiB | cosine mean / min (vs {reference or 'reference'}) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cosine = "-" if r.get("cosine_mean") is None else (
            f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f}")
        ratio = ratios.get((r["package"], r["workload"]["batch_size"])) \
            if r["target"] != "pytorch" else None
        versus = "-" if ratio is None else (
            f"{_x(ratio.get('sequences_per_s'))} vs {ratio['against']}")
        lines.append(f"| {runtime_name(r)} | {r['workload']['batch_size']} | "
                     f"{_f(_times(r.get('latency_s'), 1000), 1)} | "
                     f"{_f(r.get('sequences_per_s'), 1)} | {versus} | "
                     f"{_f(_times(r.get('peak_rss_bytes'), 2**-20), 0)} | {cosine} |")
    return "\n".join(lines)


def _times(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
