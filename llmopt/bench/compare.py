"""``llmopt bench compare A B``: the same points in two runs, side by side, with ratios.

Points match by id (target/package/provider/workload). Each ratio is B / A; the verdict says
whether B is better, worse, or within ``threshold`` of A (latencies: lower is better;
throughputs: higher is better). Differences of machine and versions are listed first, since
they usually explain the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (metric, statistic, label, higher is better)
METRICS = (
    ("ttft_s", "p50", "TTFT p50 (ms)", False),
    ("itl_s", "p50", "ITL p50 (ms)", False),
    ("e2e_s", "p50", "e2e p50 (ms)", False),
    ("e2e_s", "p99", "e2e p99 (ms)", False),
    ("decode_tokens_per_s", "p50", "decode tok/s", True),
    ("output_tokens_per_s", "mean", "output tok/s", True),
    ("latency_s", "p50", "latency p50 (ms)", False),
    ("sequences_per_s", "mean", "seq/s", True),
)


@dataclass
class Row:
    id: str
    metric: str
    a: float | None
    b: float | None
    ratio: float | None
    verdict: str


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.05
            ) -> tuple[list[str], list[Row], list[str]]:
    """Environment differences, metric rows, and notes on points in only one run or failed."""
    env = _environment_diff(a["fingerprint"], b["fingerprint"])
    rec_a = {r["id"]: r for r in a["records"]}
    rec_b = {r["id"]: r for r in b["records"]}
    rows: list[Row] = []
    notes: list[str] = []
    for pid in [i for i in rec_a if i in rec_b]:
        ra, rb = rec_a[pid], rec_b[pid]
        if ra["status"] != "ok" or rb["status"] != "ok":
            notes.append(f"{pid}: A {ra['status']}, B {rb['status']}")
            continue
        for key, stat, label, higher in METRICS:
            va = ((ra["metrics"] or {}).get(key) or {}).get(stat)
            vb = ((rb["metrics"] or {}).get(key) or {}).get(stat)
            if va is None and vb is None:
                continue
            scale = 1000.0 if key.endswith("_s") and not key.endswith("per_s") else 1.0
            ratio = vb / va if va and vb is not None else None
            rows.append(Row(pid, label, None if va is None else va * scale,
                            None if vb is None else vb * scale, ratio,
                            _verdict(ratio, higher, threshold)))
    notes += [f"{i}: only in A" for i in rec_a if i not in rec_b]
    notes += [f"{i}: only in B" for i in rec_b if i not in rec_a]
    return env, rows, notes


def _verdict(ratio: float | None, higher_is_better: bool, threshold: float) -> str:
    if ratio is None:
        return "?"
    if abs(ratio - 1) <= threshold:
        return "same"
    better = ratio > 1 if higher_is_better else ratio < 1
    return "better" if better else "worse"


def _environment_diff(fa: dict[str, Any], fb: dict[str, Any]) -> list[str]:
    out = []
    pairs = [("cpu", (fa.get("cpu") or {}).get("model"), (fb.get("cpu") or {}).get("model")),
             ("usable cores", (fa.get("cpu") or {}).get("usable_cores"),
              (fb.get("cpu") or {}).get("usable_cores")),
             ("gpu", [g.get("name") for g in fa.get("gpu") or []],
              [g.get("name") for g in fb.get("gpu") or []]),
             ("load average", fa.get("load_average"), fb.get("load_average"))]
    va, vb = fa.get("versions") or {}, fb.get("versions") or {}
    pairs += [(name, va.get(name), vb.get(name)) for name in sorted(set(va) | set(vb))]
    for name, x, y in pairs:
        if x != y:
            out.append(f"{name}: {x} -> {y}")
    return out


def format_table(env: list[str], rows: list[Row], notes: list[str]) -> str:
    lines = ["Environment (A -> B):"] + [f"  {e}" for e in env or ["same"]] + [""]
    if rows:
        width = max(len(r.id) for r in rows)
        lines.append(f"{'point':<{width}}  {'metric':<17} {'A':>10} {'B':>10} {'B/A':>7}  verdict")
        last = None
        for r in rows:
            pid = r.id if r.id != last else ""
            last = r.id
            lines.append(f"{pid:<{width}}  {r.metric:<17} {_num(r.a):>10} {_num(r.b):>10} "
                         f"{_num(r.ratio, 3):>7}  {r.verdict}")
    else:
        lines.append("No point was measured in both runs.")
    if notes:
        lines += ["", "Not compared:"] + [f"  {n}" for n in notes]
    return "\n".join(lines)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"
