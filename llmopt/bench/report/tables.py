"""CSV (every number, one row per point) and a Markdown summary (the numbers people read)."""

from __future__ import annotations

import csv
import io
from typing import Any

from llmopt.bench.report.comparison import comparison_markdown

WORKLOAD = ("batch_size", "prompt_tokens", "new_tokens", "concurrency", "request_rate")
LATENCIES = ("ttft_s", "itl_s", "e2e_s", "latency_s")
RATES = ("prefill_tokens_per_s", "decode_tokens_per_s", "output_tokens_per_s", "requests_per_s",
         "sequences_per_s")
STATS = ("p50", "p90", "p99", "mean", "stdev")


def to_csv(records: list[dict[str, Any]]) -> str:
    columns = ["id", "status", "target", "package", "precision", "provider", *WORKLOAD,
               "rounds", "requests"]
    columns += [f"{m}_{s}" for m in LATENCIES for s in STATS]
    columns += [f"{m}_{s}" for m in RATES for s in ("mean", "p50", "stdev")]
    columns += ["peak_rss_bytes", "peak_rss_scope", "model_rss_bytes", "gpu_memory_bytes",
                "speedup_e2e", "speedup_decode", "load_average_1m", "error"]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        row: dict[str, Any] = {k: rec.get(k) for k in columns if k in rec}
        row.update(rec["workload"])
        metrics = rec.get("metrics") or {}
        for name, summary in metrics.items():
            if isinstance(summary, dict):
                for stat in STATS:
                    row[f"{name}_{stat}"] = summary.get(stat)
        row.update({k: v for k, v in (rec.get("memory") or {}).items() if k in columns})
        speedup = rec.get("speedup_over_pytorch") or {}
        row["speedup_e2e"] = speedup.get("e2e") or speedup.get("latency")
        row["speedup_decode"] = speedup.get("decode_tokens_per_s")
        row["load_average_1m"] = (rec.get("load_average") or [None])[0]
        row["error"] = (rec.get("error") or {}).get("message")
        writer.writerow(row)
    return out.getvalue()


def to_markdown(results: dict[str, Any]) -> str:
    records = results["records"]
    fp = results["fingerprint"]
    cpu = fp["cpu"]
    isa = ", ".join(k for k, v in (cpu.get("isa") or {}).items() if v) or "unknown"
    gpus = ", ".join(g["name"] for g in fp.get("gpu") or []) or "none"
    versions = fp.get("versions") or {}
    ort = versions.get("onnxruntime-gpu") or versions.get("onnxruntime")
    lines = [
        f"# Bench: {results['name']}",
        "",
        f"- Machine: {cpu['model']}, {cpu.get('usable_cores')} usable cores, "
        f"{(fp.get('memory_bytes') or 0) / 2**30:.0f} GiB; GPU: {gpus}",
        f"- ISA: {isa}" + (f"; llmopt CPU kernels: {fp['cpu_kernels']}"
                           if fp.get("cpu_kernels") else ""),
        f"- Load average (1/5/15 min) at start: {fp.get('load_average')}, at end: "
        f"{fp.get('load_average_end')}",
        f"- llmopt {versions.get('llmopt')}, onnxruntime {ort}, torch {versions.get('torch')}, "
        f"transformers {versions.get('transformers')}",
        f"- Command: `{results['command']}` ({results['created']}, "
        f"{results.get('duration_s', 0):.0f} s)",
        "",
    ]
    decoders = [r for r in records if r["task"] == "text-generation" and r["status"] == "ok"]
    encoders = [r for r in records if r["task"] != "text-generation" and r["status"] == "ok"]
    if decoders:
        lines += [
            "| target | package | provider | batch | prompt | new | conc | TTFT p50 ms | "
            "ITL p50 ms | e2e p50 s | e2e p90 s | decode tok/s | output tok/s | req/s | "
            "peak RSS MiB | x PyTorch (e2e) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in decoders:
            m, w = r["metrics"], r["workload"]
            conc = f"{w['concurrency']}" + (f" @{w['request_rate']:g}/s"
                                            if w["request_rate"] else "")
            lines.append(
                f"| {r['target']} | {r['package']} ({r['precision']}) | {r['provider']} | "
                f"{w['batch_size']} | {w['prompt_tokens']} | {w['new_tokens']} | {conc} | "
                f"{_ms(m['ttft_s']['p50'])} | {_ms(m['itl_s']['p50'])} | "
                f"{_f(m['e2e_s']['p50'], 3)} | {_f(m['e2e_s']['p90'], 3)} | "
                f"{_f(m['decode_tokens_per_s']['p50'], 1)} | "
                f"{_f(m['output_tokens_per_s']['mean'], 1)} | "
                f"{_f(m['requests_per_s']['mean'], 2)} | {_mib(r)} | {_speedup(r, 'e2e')} |")
        lines.append("")
    if encoders:
        lines += [
            "| target | package | provider | batch | tokens/seq | conc | latency p50 ms | "
            "latency p90 ms | latency p99 ms | seq/s | peak RSS MiB | x PyTorch |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in encoders:
            m, w = r["metrics"], r["workload"]
            lines.append(
                f"| {r['target']} | {r['package']} ({r['precision']}) | {r['provider']} | "
                f"{w['batch_size']} | {_f(m.get('input_tokens_per_sequence'), 0)} | "
                f"{w['concurrency']} | {_ms(m['latency_s']['p50'])} | "
                f"{_ms(m['latency_s']['p90'])} | {_ms(m['latency_s']['p99'])} | "
                f"{_f(m['sequences_per_s']['mean'], 1)} | {_mib(r)} | "
                f"{_speedup(r, 'latency')} |")
        lines.append("")
    comparison = comparison_markdown(results)
    if comparison:
        lines += [comparison]
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        lines += ["Points not measured:", ""]
        lines += [f"- `{r['id']}`: {r['status']} ({r['error']['phase']}): "
                  f"{r['error']['message']}" for r in bad]
        lines.append("")
    return "\n".join(lines)


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _mib(rec: dict[str, Any]) -> str:
    mem = rec.get("memory") or {}
    value = mem.get("server_peak_rss_bytes") if rec["target"] == "server" else \
        mem.get("worker_peak_rss_bytes") if rec["target"] == "genai" else None
    value = value or mem.get("peak_rss_bytes")
    return "-" if not value else f"{value / 2**20:.0f}"


def _speedup(rec: dict[str, Any], key: str) -> str:
    value = (rec.get("speedup_over_pytorch") or {}).get(key)
    return "-" if value is None else f"{value:.2f}x"
