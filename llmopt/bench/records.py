"""Turn measured points into result records (the JSON schema in :mod:`llmopt.bench.schema`),
and derive the speedup of each point over its PyTorch baseline.

Metric definitions (also in bench/results/README.md):

- ``ttft_s``: per prompt, request sent -> its first token received.
- ``itl_s``: per prompt, the gaps between consecutive tokens received.
- ``e2e_s``: per request (all its prompts), sent -> last token received.
- ``prefill_tokens_per_s``: per request, its prompt tokens / the time to the last first token.
- ``decode_tokens_per_s``: per request, the tokens after each prompt's first / the time after
  the last first token (a batch's rows together).
- ``output_tokens_per_s``, ``requests_per_s``, ``sequences_per_s``: per round, the round's
  tokens, requests or sequences / the round's wall time (first send -> last answer).
- encoders: ``latency_s`` per request (a batch of texts), ``sequences_per_s`` per round.
"""

from __future__ import annotations

from typing import Any

from llmopt.bench.matrix import PackageInfo
from llmopt.bench.runner import PointResult
from llmopt.bench.stats import summarize

SAMPLE_DIGITS = 6


def build_records(results: list[PointResult],
                  packages: dict[str, PackageInfo]) -> list[dict[str, Any]]:
    records = [_record(r, packages[r.point.package]) for r in results]
    _add_speedups(records, packages)
    return records


def _record(result: PointResult, info: PackageInfo) -> dict[str, Any]:
    point = result.point
    record: dict[str, Any] = {
        "id": point.id,
        "series": point.series,
        "status": result.status,
        "error": result.error,
        "target": point.target,
        "package": point.package,
        "package_path": str(info.path),
        "task": info.task,
        "precision": "fp32" if point.target == "pytorch" else info.precision,
        "provider": point.provider,
        "workload": point.workload,
        "rounds": len(result.rounds),
        "warmup_rounds": result.warmup_rounds,
        "requests": sum(len(r.timings) for r in result.rounds),
        "measured_s": round(result.measured_s, 4),
        "budget_exhausted": result.budget_exhausted,
        "in_effect": result.info,
        "memory": result.memory,
        "load_average": result.load_average,
        "metrics": None,
        "samples": None,
        "speedup_over_pytorch": None,
    }
    if result.status == "ok" and result.rounds:
        metrics, samples = _metrics(result, info.is_decoder)
        record["metrics"], record["samples"] = metrics, samples
    return record


def _metrics(result: PointResult, decoder: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    timings = [t for r in result.rounds for t in r.timings]
    walls = [r.wall_s for r in result.rounds]
    per_round = {
        "requests_per_s": summarize([len(r.timings) / r.wall_s for r in result.rounds]),
        "sequences_per_s": summarize([r.sequences / r.wall_s for r in result.rounds]),
    }
    if not decoder:
        latency = [t.e2e_s for t in timings]
        metrics = {"latency_s": summarize(latency), **per_round,
                   "input_tokens_per_sequence": result.mean_input_tokens,
                   "round_wall_s": summarize(walls)}
        return metrics, {"latency_s": _rounded(latency)}
    ttft = [x for t in timings for x in t.ttft_s]
    itl = [x for t in timings for x in t.itl_s]
    e2e = [t.e2e_s for t in timings]
    prefill, decode = [], []
    for t in timings:
        first = max(t.ttft_s) if t.ttft_s else None
        if first and first > 0:
            prefill.append(t.prompt_tokens / first)
        if first is not None and t.e2e_s > first and t.output_tokens > t.sequences:
            decode.append((t.output_tokens - t.sequences) / (t.e2e_s - first))
    metrics = {
        "ttft_s": summarize(ttft),
        "itl_s": summarize(itl),
        "e2e_s": summarize(e2e),
        "prefill_tokens_per_s": summarize(prefill),
        "decode_tokens_per_s": summarize(decode),
        "output_tokens_per_s": summarize([r.output_tokens / r.wall_s for r in result.rounds]),
        **per_round,
        "output_tokens_per_request": (sum(t.output_tokens for t in timings) / len(timings)
                                      if timings else None),
        "round_wall_s": summarize(walls),
    }
    return metrics, {"ttft_s": _rounded(ttft), "itl_s": _rounded(itl), "e2e_s": _rounded(e2e)}


def _rounded(values: list[float]) -> list[float]:
    return [round(v, SAMPLE_DIGITS) for v in values]


def _add_speedups(records: list[dict[str, Any]], packages: dict[str, PackageInfo]) -> None:
    """Ratios against the PyTorch point with the same source and workload (concurrency 1,
    closed loop): > 1 means faster than PyTorch."""
    baselines = {}
    for rec in records:
        if rec["target"] == "pytorch" and rec["status"] == "ok":
            source = packages[rec["package"]].source
            baselines[(source, _shape(rec))] = rec
    for rec in records:
        workload = rec["workload"]
        if rec["target"] == "pytorch" or rec["status"] != "ok" or workload["concurrency"] != 1 \
                or workload["request_rate"] is not None:
            continue
        base = baselines.get((packages[rec["package"]].source, _shape(rec)))
        if base is None:
            continue
        mine, theirs = rec["metrics"], base["metrics"]
        ratios: dict[str, Any] = {"baseline": base["id"]}
        if rec["task"] == "text-generation":
            ratios["e2e"] = _ratio(theirs["e2e_s"]["p50"], mine["e2e_s"]["p50"])
            ratios["ttft"] = _ratio(theirs["ttft_s"]["p50"], mine["ttft_s"]["p50"])
            ratios["decode_tokens_per_s"] = _ratio(mine["decode_tokens_per_s"]["p50"],
                                                   theirs["decode_tokens_per_s"]["p50"])
        else:
            ratios["latency"] = _ratio(theirs["latency_s"]["p50"], mine["latency_s"]["p50"])
        rec["speedup_over_pytorch"] = ratios


def _shape(rec: dict[str, Any]) -> tuple[int, int, int]:
    w = rec["workload"]
    return (w["batch_size"], w["prompt_tokens"], w["new_tokens"])


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator
