"""Quantize on tiny packages: every method produces a working, measured package; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import llmopt
from llmopt.exporter import export
from llmopt.optimizer import optimize
from llmopt.quantizer import QuantizeOptions, quantize
from tests import tiny_decoders
from tests.test_manifest import assert_round_trips


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("q")
    export(tiny_decoders.build("llama", root / "source"), root / "package")
    return root / "package"


@pytest.fixture(scope="module")
def fused(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "package"
    optimize(package, out)
    return out


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path / "model.onnx")).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("options, op", [
    (QuantizeOptions.int8(), "MatMulNBits"),
    (QuantizeOptions.int4(), "MatMulNBits"),
    (QuantizeOptions.int4(algorithm="rtn", symmetric=True), "MatMulNBits"),
    (QuantizeOptions.int4(algorithm="mse", lm_head_bits=4), "MatMulNBits"),
    (QuantizeOptions.int8_dynamic(), "MatMulInteger"),
    (QuantizeOptions.int8_static(), "QuantizeLinear"),
])
@pytest.mark.parametrize("which", ["package", "fused"])
def test_every_method_makes_a_measured_working_package(request: pytest.FixtureRequest,
                                                       which: str, options: QuantizeOptions,
                                                       op: str, tmp_path: Path) -> None:
    parent = request.getfixturevalue(which)
    result = quantize(parent, tmp_path / "q", options)
    assert_round_trips(result)
    ops = _ops(result.path)
    assert op in ops or (op == "MatMulInteger" and "DynamicQuantizeMatMul" in ops), ops
    step = result.manifest["steps"][-1]
    assert step["stage"] == "quantize" and step["method"] == options.method
    if options.method in ("int8", "int4"):  # weight-only: the LM head in lm_head_bits
        assert step["lm_head_bits"] == options.lm_head_bits == _head_bits(result.path)
    else:  # dynamic and static int8 keep it float
        assert any("lm_head" in name for name in step["kept_float"])
    fidelity = result.manifest["fidelity"]
    assert fidelity["perplexity"] > 1 and 0 <= fidelity["top1_agreement"] <= 1
    assert fidelity["greedy_agreement"]["prompts"] == 4
    generator = llmopt.load(result.path)
    assert len(generator.generate("hello world", max_new_tokens=5, ignore_eos=True).token_ids) == 5


def _head_bits(path: Path) -> int | None:
    for node in onnx.load(str(path / "model.onnx")).graph.node:
        if node.op_type == "MatMulNBits" and "lm_head" in node.input[1]:
            return next(a.i for a in node.attribute if a.name == "bits")
    return None


def _zero_point_types(path: Path) -> set[int]:
    model = onnx.load(str(path / "model.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    return {types[n.input[3]] for n in model.graph.node
            if n.op_type == "MatMulNBits" and len(n.input) > 3}


def test_int4_shrinks_the_weights(package: Path, tmp_path: Path) -> None:
    result = quantize(package, tmp_path / "q4", QuantizeOptions.int4())
    sizes = result.manifest["steps"][-1]["size_bytes"]
    assert sizes["after"] < 0.6 * sizes["before"]


@pytest.mark.parametrize("algorithm, corrections", [("hqq", True), ("rtn", False),
                                                    ("mse", False)])
def test_int4_never_leaves_float_zero_points(package: Path, tmp_path: Path, algorithm: str,
                                             corrections: bool) -> None:
    """Float zero points send MatMulNBits down ONNX Runtime's slow path: HQQ's are moved into
    a block-sum correction, RTN and MSE only make integer ones."""
    result = quantize(package, tmp_path / "q4", QuantizeOptions.int4(algorithm=algorithm))
    assert _zero_point_types(result.path) <= {onnx.TensorProto.UINT8}
    step = result.manifest["steps"][-1]
    assert step["algorithm_used"] == algorithm
    assert bool(step.get("zero_point_corrections")) == corrections
    model = onnx.load(str(result.path / "model.onnx"), load_external_data=False)
    added = sum(n.name.endswith("/AddCorrection") for n in model.graph.node)
    nbits = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    # a correction per MatMulNBits but the LM head's (integer zero points there)
    assert added == (nbits - 1 if corrections else 0)
    assert result.manifest["fidelity"]["top1_agreement"] > 0.5


def test_lm_head_can_stay_float(package: Path, tmp_path: Path) -> None:
    result = quantize(package, tmp_path / "q4", QuantizeOptions.int4(lm_head_bits=None))
    assert _head_bits(result.path) is None
    assert any("lm_head" in name for name in result.manifest["steps"][-1]["kept_float"])


def test_evaluate_without_greedy_answers(package: Path, tmp_path: Path) -> None:
    from llmopt.errors import InvalidInputError
    from llmopt.evaluate import evaluate

    result = quantize(package, tmp_path / "q", QuantizeOptions.int8().with_(evaluate=False))
    fidelity = evaluate(result, package, max_length=64, greedy_tokens=0)
    assert fidelity["perplexity"] > 1 and 0 <= fidelity["top1_agreement"] <= 1
    assert "greedy_agreement" not in fidelity
    with pytest.raises(InvalidInputError, match="greedy_tokens=0"):
        evaluate(result, package, greedy_tokens=-1)


def test_quantizing_twice_is_refused(package: Path, tmp_path: Path) -> None:
    once = quantize(package, tmp_path / "once", QuantizeOptions.int8().with_(evaluate=False))
    with pytest.raises(llmopt.UnsupportedError, match="already quantized"):
        quantize(once.path, tmp_path / "twice")


def test_block_size_must_divide_the_hidden_size(package: Path, tmp_path: Path) -> None:
    with pytest.raises(llmopt.InvalidInputError, match="does not divide"):
        quantize(package, tmp_path / "q", QuantizeOptions.int4(block_size=256))
    with pytest.raises(llmopt.InvalidInputError, match="not supported"):
        QuantizeOptions.int4(block_size=48)


def test_missing_calibration_file(package: Path, tmp_path: Path) -> None:
    options = QuantizeOptions.int8_static(calibration_file=str(tmp_path / "nope.txt"))
    with pytest.raises(llmopt.InvalidInputError, match="calibration file"):
        quantize(package, tmp_path / "q", options)


def test_calibration_from_a_file(package: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog . " * 60)
    for method in ("entropy", "percentile"):
        result = quantize(package, tmp_path / method, QuantizeOptions.int8_static(
            calibration=method, calibration_file=str(corpus), samples=4).with_(evaluate=False))
        assert "QuantizeLinear" in _ops(result.path)


def test_gguf_algorithm_needs_a_gguf_source(package: Path, tmp_path: Path) -> None:
    with pytest.raises(llmopt.InvalidInputError, match="not exported from a GGUF"):
        quantize(package, tmp_path / "q", QuantizeOptions.int4(algorithm="gguf"))


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "int3"}, "unknown method"),
    ({"algorithm": "magic"}, "unknown algorithm"),
    ({"calibration": "vibes"}, "unknown calibration"),
    ({"accuracy_level": 9}, "accuracy_level"),
    ({"lm_head_bits": 3}, "lm_head_bits"),
])
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(llmopt.InvalidInputError, match=match):
        QuantizeOptions(**kwargs)


def test_cli_quantize_eval_and_errors(package: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "llmopt.cli.main"]
    ok = subprocess.run([*cli, "quantize", str(package), "-o", str(tmp_path / "q4"),
                         "--method", "int4"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "Fidelity" in ok.stdout and "perplexity" in ok.stdout
    evaluated = subprocess.run([*cli, "eval", str(tmp_path / "q4"), "--against", str(package),
                                "--json"], capture_output=True, text=True, check=False)
    assert evaluated.returncode == 0, evaluated.stderr
    recorded = json.loads((tmp_path / "q4" / "llmopt.json").read_text())["fidelity"]
    measured = json.loads(evaluated.stdout)
    assert measured["perplexity"] == pytest.approx(recorded["perplexity"], rel=1e-6)
    again = subprocess.run([*cli, "quantize", str(tmp_path / "q4"), "-o", str(tmp_path / "x")],
                           capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "already quantized" in again.stderr
    assert "Traceback" not in again.stderr
    bad = subprocess.run([*cli, "quantize", str(package), "-o", str(tmp_path / "y"),
                          "--method", "int4", "--block-size", "256"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "does not divide" in bad.stderr
