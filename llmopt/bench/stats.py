"""Summary statistics of latency samples: percentiles by linear interpolation (numpy's default,
"type 7"), mean and sample standard deviation."""

from __future__ import annotations

import math
from collections.abc import Sequence

SUMMARY_KEYS = ("n", "mean", "stdev", "min", "p50", "p90", "p99", "max")


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, interpolating between closest ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: Sequence[float]) -> dict[str, float | int | None]:
    """``n, mean, stdev, min, p50, p90, p99, max``; all but ``n`` are None without samples.

    ``stdev`` is the sample standard deviation (n - 1), 0.0 for a single sample.
    """
    n = len(samples)
    if n == 0:
        return {"n": 0, **dict.fromkeys(SUMMARY_KEYS[1:])}
    mean = math.fsum(samples) / n
    var = math.fsum((x - mean) ** 2 for x in samples) / (n - 1) if n > 1 else 0.0
    return {
        "n": n,
        "mean": mean,
        "stdev": math.sqrt(var),
        "min": min(samples),
        "p50": percentile(samples, 50),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "max": max(samples),
    }


def mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None
