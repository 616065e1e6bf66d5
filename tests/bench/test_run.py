"""The bench end to end on a tiny package: outputs, schema, failures, compare."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llmopt.bench import parse_config, run_bench
from llmopt.bench.schema import SCHEMA
from llmopt.cli.main import main
from llmopt.runtime import kernels

FAST = {"warmup": 0, "repetitions": 2, "max_seconds_per_point": 30}


def _config(package: Path, **matrix: Any) -> Any:
    base = {"batch_sizes": [1], "prompt_lengths": [8], "new_tokens": [4]}
    return parse_config({"name": "t", "packages": {"tiny": str(package)},
                         "providers": [{"name": "cpu", "options": {"intra_op_threads": 1}}],
                         "pytorch": {"threads": 1}, "run": FAST, "matrix": {**base, **matrix}})


@pytest.fixture(scope="module")
def cli_run(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-out")
    code = main(["bench", "--package", f"tiny={tiny_package}", "--target", "pytorch",
                 "--target", "inprocess", "--batch-sizes", "1,2", "--prompt-lengths", "8,16",
                 "--new-tokens", "4", "--concurrency", "1,2", "--warmup", "1",
                 "--repetitions", "2", "--threads", "1", "--out", str(out)])
    assert code == 0
    return out


def test_cli_writes_every_output(cli_run: Path) -> None:
    results = json.loads((cli_run / "results.json").read_text())
    jsonschema.validate(results, SCHEMA)
    records = results["records"]
    assert results["schema_version"] == 1
    assert {r["status"] for r in records} == {"ok"}
    # pytorch: 2 batch x 2 prompt at concurrency 1; inprocess: also at concurrency 2
    assert len(records) == 4 + 8
    rows = list(csv.DictReader(io.StringIO((cli_run / "results.csv").read_text())))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    summary = (cli_run / "summary.md").read_text()
    assert "| inprocess | tiny (fp32) | cpu | 2 | 16 | 4 | 2 |" in summary
    plots = sorted(p.name for p in (cli_run / "plots").iterdir())
    assert plots == ["latency_vs_batch.png", "speedup_over_pytorch.png",
                     "throughput_latency_pareto.png", "throughput_vs_concurrency.png",
                     "ttft_itl_distributions.png"]
    for name in plots:
        assert (cli_run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_records_hold_consistent_measurements(cli_run: Path) -> None:
    results = json.loads((cli_run / "results.json").read_text())
    fp = results["fingerprint"]
    assert fp["cpu"]["logical_cores"] >= 1 and "avx2" in fp["cpu"]["isa"]
    assert len(fp["load_average"]) == 3 and fp["versions"]["llmopt"]
    # which build of llmopt's kernels ran: two runs on one machine can differ by it
    assert fp["cpu_kernels"] == kernels.status() != ""
    assert f"llmopt CPU kernels: {fp['cpu_kernels']}" in (cli_run / "summary.md").read_text()
    for rec in results["records"]:
        m, w = rec["metrics"], rec["workload"]
        sequences = w["batch_size"] * w["concurrency"] * rec["rounds"]
        assert m["ttft_s"]["n"] == sequences
        assert m["output_tokens_per_request"] == w["batch_size"] * w["new_tokens"]
        assert m["ttft_s"]["p50"] <= m["e2e_s"]["p50"]
        assert m["e2e_s"]["p50"] <= m["e2e_s"]["p90"] <= m["e2e_s"]["p99"]
        assert len(rec["samples"]["e2e_s"]) == rec["requests"]
        assert rec["memory"]["peak_rss_bytes"] > 0
        if rec["target"] == "inprocess":
            assert rec["in_effect"]["session"]["active"][0] == "cpu"
            if w["concurrency"] == 1:
                assert rec["speedup_over_pytorch"]["baseline"].startswith("pytorch/tiny/")
        else:
            assert rec["in_effect"]["threads"] == 1


def test_compare_prints_ratios(cli_run: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    results = json.loads((cli_run / "results.json").read_text())
    slower = json.loads(json.dumps(results))
    for rec in slower["records"]:
        rec["metrics"]["e2e_s"]["p50"] *= 2
    slower["fingerprint"]["versions"]["onnxruntime"] = "0.0.1"
    (tmp_path / "b.json").write_text(json.dumps(slower))
    assert main(["bench", "compare", str(cli_run / "results.json"),
                 str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime: " in out and "-> 0.0.1" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("inprocess/tiny/cpu/b1/p8/n4/c1"))
    assert line.split()[1:3] == ["TTFT", "p50"]
    e2e = [ln for ln in out.splitlines() if "e2e p50" in ln]
    assert e2e and all(ln.split()[-2:] == ["2.000", "worse"] for ln in e2e)


def test_compare_rejects_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.json").write_text('{"hello": 1}')
    assert main(["bench", "compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 1
    assert "is not llmopt bench results" in capsys.readouterr().err


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(
        tiny_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmopt.bench.targets.inprocess import InProcessTarget

    original = InProcessTarget.decode

    def flaky(self: Any, prompts: list[list[int]], new_tokens: int, issued: float) -> Any:
        if len(prompts) == 2:
            raise RuntimeError("simulated crash in batch 2")
        return original(self, prompts, new_tokens, issued)

    monkeypatch.setattr(InProcessTarget, "decode", flaky)
    config = parse_config({
        "name": "t", "packages": {"tiny": str(tiny_package)}, "run": FAST,
        "server": {"address": "127.0.0.1:9", "startup_timeout_s": 1},
        "matrix": {"targets": ["inprocess", "server"], "batch_sizes": [1, 2, 3],
                   "prompt_lengths": [8], "new_tokens": [4]}})
    run = run_bench(config, tmp_path / "out", plots=False, progress=None)
    status = {r["id"]: r for r in run.records}
    crashed = status["inprocess/tiny/cpu/b2/p8/n4/c1"]
    assert crashed["status"] == "failed" and crashed["metrics"] is None
    assert crashed["error"]["message"] == "RuntimeError: simulated crash in batch 2"
    assert crashed["error"]["phase"] == "measure"
    # the points after it ran
    assert status["inprocess/tiny/cpu/b3/p8/n4/c1"]["status"] == "ok"
    assert status["inprocess/tiny/cpu/b3/p8/n4/c1"]["rounds"] == 2
    for batch in (1, 2, 3):  # nothing listens there: every server point failed at load
        rec = status[f"server/tiny/cpu/b{batch}/p8/n4/c1"]
        assert rec["status"] == "failed" and rec["error"]["phase"] == "load"
        assert "127.0.0.1:9" in rec["error"]["message"]
    jsonschema.validate(run.results, SCHEMA)
    assert "simulated crash" in (tmp_path / "out" / "summary.md").read_text()


def test_time_budget_stops_a_point_early(tiny_package: Path) -> None:
    config = parse_config({"packages": {"tiny": str(tiny_package)},
                           "run": {"warmup": 0, "repetitions": 5, "max_seconds_per_point": 1e-6},
                           "matrix": {"prompt_lengths": [8], "new_tokens": [2]}})
    (rec,) = run_bench(config, None, progress=None).records
    assert rec["rounds"] == 1 and rec["budget_exhausted"] is True


def test_a_prompt_lookup_package_counts_every_token_of_a_drafted_step(
        tiny_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that confirms drafts makes several tokens at once: each is counted and
    time-stamped. (The tiny model copies nothing, so the drafts come from its own answer.)"""
    import llmopt
    from llmopt.runtime import generator as generator_module

    runner: Any = llmopt.load(tiny_package)
    answer: list[int] = []
    ids_of: dict[int, list[int]] = {}
    drafted: list[int] = []

    def draft(sequence: Any, count: int) -> list[int]:
        tokens = [int(t) for t in sequence]  # the runtime hands an array
        for start, ids in ids_of.items():  # the prompt is known by its length
            if tokens[:start] == ids[:start]:
                done = len(tokens) - start
                drafted.append(len(answer[done:done + count]))
                return answer[done:done + count]
        return []

    config = parse_config({"name": "t", "packages": {
        "tiny": {"path": str(tiny_package), "prompt_lookup": 3}},
        "providers": [{"name": "cpu", "options": {"intra_op_threads": 1}}], "run": FAST,
        "matrix": {"targets": ["inprocess"], "batch_sizes": [1], "prompt_lengths": [8],
                   "new_tokens": [9]}})
    from llmopt.bench import prompts
    from llmopt.runtime.sampling import SamplingParams

    prompt = prompts.decoder_prompts(runner.tokenizer, 8, 1)[0]
    answer.extend(runner.generate(prompt, SamplingParams(max_new_tokens=9,
                                                         ignore_eos=True)).token_ids)
    ids_of[len(prompt)] = prompt
    monkeypatch.setattr(generator_module, "prompt_lookup", draft)
    (rec,) = run_bench(config, None, progress=None).records
    assert rec["status"] == "ok", rec.get("error")
    assert rec["metrics"]["output_tokens_per_request"] == 9
    assert sum(drafted) >= 9  # steps of several tokens ran
    with pytest.raises(Exception, match="prompt_lookup must be an integer from 0 to 7"):
        parse_config({"packages": {"tiny": {"path": str(tiny_package), "prompt_lookup": 9}}})


def test_request_rate_runs_open_loop(tiny_package: Path) -> None:
    config = _config(tiny_package, targets=["inprocess"], concurrency=[2], request_rates=[50.0])
    (rec,) = run_bench(config, None, progress=None).records
    assert rec["status"] == "ok" and rec["in_effect"]["engine"] is not None
    assert rec["id"].endswith("/c2/r50") and rec["requests"] == 4


@pytest.mark.skipif(importlib.util.find_spec("llmopt.cli.cmd_serve") is None
                    or importlib.util.find_spec("llmopt.client") is None,
                    reason="this llmopt has no server or client yet")
def test_served_target_through_a_server_the_harness_starts(tiny_package: Path,
                                                           tmp_path: Path) -> None:
    config = parse_config({
        "packages": {"tiny": str(tiny_package), "gone": str(tmp_path / "not-built")},
        "providers": [{"name": "cpu", "options": {"intra_op_threads": 1}}], "run": FAST,
        "matrix": {"targets": ["inprocess", "server"], "batch_sizes": [1, 2],
                   "prompt_lengths": [8], "new_tokens": [4], "concurrency": [1, 2]}})
    run = run_bench(config, None, allow_missing=True, progress=None)
    skipped = [r for r in run.records if r["package"] == "gone"]
    assert len(skipped) == 8 and {r["status"] for r in skipped} == {"skipped"}
    served = [r for r in run.records if r["target"] == "server" and r["package"] == "tiny"]
    assert len(served) == 4 and {r["status"] for r in served} == {"ok"}, [
        r["error"] for r in served]
    for rec in served:
        assert rec["in_effect"]["started_by_harness"] is True
        assert list(rec["in_effect"]["model"]["providers"]) == ["cpu"]
        assert rec["memory"]["server_peak_rss_bytes"] > 0
        w = rec["workload"]
        assert rec["metrics"]["output_tokens_per_request"] == w["batch_size"] * 4
        assert rec["metrics"]["ttft_s"]["n"] == w["batch_size"] * w["concurrency"] * 2


def test_a_round_on_another_runtime_starts_after_a_settle_pause(
        tiny_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interleaved rounds pause before switching runtime (the last one's threads spin on and
    would share the cores with the next round's first request), never between two rounds of
    the same runtime."""
    import llmopt.bench.runner as runner

    real_sleep = runner.time.sleep
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        real_sleep(0)

    monkeypatch.setattr(runner.time, "sleep", sleep)
    config = parse_config({
        "name": "t", "packages": {"tiny": str(tiny_package)},
        "providers": [{"name": "cpu", "options": {"intra_op_threads": 1}}],
        "pytorch": {"threads": 1}, "run": {**FAST, "settle_s": 0.125},
        "matrix": {"targets": ["pytorch", "inprocess"], "batch_sizes": [1, 2],
                   "prompt_lengths": [8], "new_tokens": [2]}})
    run = run_bench(config, None, progress=None)
    assert {r["status"] for r in run.records} == {"ok"}
    # 2 rounds x (pytorch b1, pytorch b2, inprocess b1, inprocess b2): pytorch -> inprocess in
    # each round, inprocess -> pytorch between them, and the first round of all
    assert pauses.count(0.125) == 4
