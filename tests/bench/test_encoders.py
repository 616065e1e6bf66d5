"""Encoders: latency per batch and sequence length, sequences/s, speedup, their plot."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from llmopt.bench import parse_config, run_bench
from llmopt.bench.schema import SCHEMA


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmopt.exporter import ExportOptions, export
    from tests.exporter.test_encoders import build

    root = tmp_path_factory.mktemp("bench-encoder")
    source = build("bert", "feature-extraction", root / "source")
    export(source, root / "package", ExportOptions())
    return root / "package"


def test_encoder_sweep(tiny_encoder: Path, tmp_path: Path) -> None:
    config = parse_config({
        "packages": {"bert": str(tiny_encoder)}, "pytorch": {"threads": 1},
        "run": {"warmup": 1, "repetitions": 2},
        "matrix": {"targets": ["pytorch", "inprocess"], "batch_sizes": [1, 4],
                   "prompt_lengths": [8, 16], "concurrency": [1]},
        "sweeps": [{}, {"targets": ["inprocess"], "batch_sizes": [4], "concurrency": [2]}]})
    run = run_bench(config, tmp_path, progress=None)
    jsonschema.validate(run.results, SCHEMA)
    records = {r["id"]: r for r in run.records}
    assert len(records) == 10
    assert {r["status"] for r in records.values()} == {"ok"}, [
        (r["id"], r["error"]) for r in records.values() if r["error"]]
    rec = records["inprocess/bert/cpu/b4/p16/n0/c1"]
    m = rec["metrics"]
    assert m["latency_s"]["n"] == 2 and m["latency_s"]["p50"] > 0
    assert 4 < m["input_tokens_per_sequence"] <= 16  # texts fit the asked length
    # each round's rate is 4 sequences over that round's wall time, so the mean rate lies
    # between the rates of the slowest and the fastest round (a ratio of means would not)
    wall = m["round_wall_s"]
    assert 4 / wall["max"] * 0.999 <= m["sequences_per_s"]["mean"] <= 4 / wall["min"] * 1.001
    assert "ttft_s" not in m
    assert rec["speedup_over_pytorch"]["baseline"] == "pytorch/bert/torch-cpu/b4/p16/n0/c1"
    assert records["inprocess/bert/cpu/b4/p16/n0/c2"]["requests"] == 4
    summary = (tmp_path / "summary.md").read_text()
    assert "latency p50 ms" in summary
    assert (tmp_path / "plots" / "encoder_latency_vs_batch.png").is_file()
    assert (tmp_path / "plots" / "throughput_vs_concurrency.png").is_file()


def test_encoder_comparison_records_cosine_and_ratios(tiny_encoder: Path, tmp_path: Path) -> None:
    from llmopt.bench.report import to_markdown
    from llmopt.quantizer import QuantizeOptions, quantize

    int8 = tmp_path / "int8"
    quantize(tiny_encoder, int8, QuantizeOptions.int8_dynamic().with_(evaluate=False))
    config = parse_config({
        "packages": {"fp32": str(tiny_encoder), "int8": str(int8)},
        "run": {"warmup": 0, "repetitions": 1},
        "matrix": {"targets": ["inprocess"], "batch_sizes": [2], "prompt_lengths": [8]},
        "analysis": {"cosine": True, "reference": "fp32", "compare": {"int8": "fp32"}}})
    run = run_bench(config, None, progress=None)
    jsonschema.validate(run.results, SCHEMA)
    facts = run.results["analysis"]["packages"]
    assert facts["fp32"]["cosine_min"] == pytest.approx(1.0, abs=1e-6)  # itself
    assert 0.5 < facts["int8"]["cosine_min"] <= facts["int8"]["cosine_mean"] < 1.0 + 1e-6
    assert facts["int8"]["cosine_sentences"] == 50
    (ratio,) = run.results["analysis"]["ratios"]
    assert ratio["against"] == "fp32" and ratio["sequences_per_s"] > 0
    assert "vs fp32" in to_markdown(run.results)


def test_onnx_runtime_dynamic_int8_is_recorded_as_a_quantize_step(tiny_encoder: Path,
                                                                   tmp_path: Path) -> None:
    """The reference int8 made with ONNX Runtime's own quantize_dynamic is labelled by what it
    is (a bench table once called it by its parent's float type)."""
    import onnx

    from llmopt.bench.matrix import describe
    from llmopt.bench.prepare import ort_quantize_dynamic
    from llmopt.package import Package

    out = ort_quantize_dynamic(tiny_encoder, tmp_path / "ort-int8")
    package = Package.open(out)
    assert package.manifest.stages == ("export", "quantize")
    assert package.manifest.last_step["options"]["tool"] == (
        "onnxruntime.quantization.quantize_dynamic")
    ops = {node.op_type for node in onnx.load(str(package.model_path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert describe("ort", package).precision == "int8_dynamic"
