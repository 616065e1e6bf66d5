"""A run with an analysis section: bytes/token, perplexity, peak RSS and ratio rows beside the
timings, computed for each package and printed in the summary's comparison tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmopt.bench import parse_config, run_bench
from llmopt.bench.report import to_markdown

FAST = {"warmup": 0, "repetitions": 1, "max_seconds_per_point": None}


def test_a_run_records_each_packages_facts_and_ratios(tiny_package: Path) -> None:
    import onnx

    from llmopt.bench.traffic import mean_decode_context, model_traffic
    from llmopt.evaluate import evaluate
    from llmopt.package import Package
    from llmopt.runtime import kernels

    config = parse_config({
        "packages": {"mine": str(tiny_package), "same": str(tiny_package)},
        "providers": [{"name": "cpu", "options": {"intra_op_threads": 1}}], "run": FAST,
        "matrix": {"targets": ["inprocess"], "prompt_lengths": [8], "new_tokens": [4]},
        "analysis": {"bytes_per_token": True, "perplexity": True, "memory": True,
                     "reference": "same", "compare": {"mine": "same"}}})
    results = run_bench(config, None, progress=None).results
    analysis = results["analysis"]
    mine = analysis["packages"]["mine"]
    assert mine["perplexity"] == pytest.approx(evaluate(tiny_package)["perplexity"])
    assert mine["perplexity_delta_pct"] == pytest.approx(0.0)
    assert mine["peak_rss_bytes"] > 0  # a process of its own, not the bench's
    # bytes of the graph the session ran: on llmopt's CPU kernels where they run here (their
    # layouts pad N to 16 columns), else the package's
    package = Package.open(tiny_package)
    traffic = model_traffic(package.model_path)
    if kernels.library() is not None:
        proto = onnx.load(str(package.model_path), load_external_data=False)
        assert kernels.kernel_model(proto, package.path, threads=1, blobs={}) > 0
        traffic = model_traffic(proto)
    (row,) = [r for r in analysis["rows"] if r["package"] == "mine"]
    assert row["bytes_per_token"] == traffic.bytes_per_token(mean_decode_context(8, 4))
    assert "bandwidth_fraction" not in row  # no bandwidth probe in this run
    (ratio,) = analysis["ratios"]
    assert (ratio["package"], ratio["against"]) == ("mine", "same")
    assert ratio["decode_tokens_per_s"] == pytest.approx(
        row["decode_tokens_per_s"] / next(r["decode_tokens_per_s"] for r in analysis["rows"]
                                          if r["package"] == "same"))
    summary = to_markdown(results)
    assert "## Comparison" in summary and "llmopt mine vs llmopt same" in summary
    assert analysis["bandwidth"] is None
