"""Percentiles and summaries on samples whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmopt.bench.stats import percentile, summarize


def test_percentiles_of_one_to_hundred_one() -> None:
    samples = list(range(1, 102))  # 1..101: the q-th percentile is q + 1
    assert percentile(samples, 50) == 51
    assert percentile(samples, 90) == 91
    assert percentile(samples, 99) == 100
    assert percentile(samples, 0) == 1
    assert percentile(samples, 100) == 101


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([10.0, 20.0], 50) == 15.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0


@pytest.mark.parametrize("q", [1, 25, 50, 90, 99, 99.9])
def test_percentile_matches_numpy_linear(q: float) -> None:
    rng = np.random.default_rng(0)
    samples = rng.lognormal(size=257).tolist()
    assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


def test_order_of_samples_does_not_matter() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_summary_of_known_samples() -> None:
    s = summarize([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert s["n"] == 8
    assert s["mean"] == 5.0
    assert s["stdev"] == pytest.approx(math.sqrt(32 / 7))  # sample (n - 1) deviation
    assert s["min"] == 2.0 and s["max"] == 9.0
    assert s["p50"] == 4.5


def test_summary_edge_cases() -> None:
    assert summarize([]) == {"n": 0, "mean": None, "stdev": None, "min": None, "p50": None,
                             "p90": None, "p99": None, "max": None}
    one = summarize([0.25])
    assert one["stdev"] == 0.0 and one["p99"] == 0.25


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)
