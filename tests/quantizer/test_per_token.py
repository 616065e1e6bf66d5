"""int8 per token (the encoder preset): the subgraph computes exactly per-token x per-channel
int8, smoothing changes nothing in float, and quantize() picks it for encoders by default;
split activations compute exactly a per-tensor code plus its residual's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import llmopt
from llmopt.exporter import ExportOptions, export
from llmopt.quantizer import QuantizeOptions, default_options, per_token, quantize
from llmopt.runtime.session import cpu_session
from tests.exporter.test_encoders import build
from tests.test_manifest import assert_round_trips


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded BERT exported for feature extraction."""
    root = tmp_path_factory.mktemp("bert")
    export(build("bert", "feature-extraction", root / "source"), root / "package",
           ExportOptions(task="feature-extraction"))
    return root / "package"


def _one_matmul(weight: np.ndarray, opset: int, split: bool = False) -> bytes:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], "/layer/MatMul")
    replace = per_token.replace_matmul_split if split else per_token.replace_matmul
    nodes, inits = replace(node, weight, None, opset)
    k, n = weight.shape
    graph = helper.make_graph(
        nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    return model.SerializeToString()


def _reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-token symmetric int8 activations x per-column int8 weights, in numpy."""
    codes, scale = per_token.quantize_columns(weight)
    step = np.maximum(np.abs(x).max(axis=-1, keepdims=True), per_token.EPS) / 127
    q = np.clip(np.rint(x / step), -128, 127)
    return (q @ codes.astype(np.float64)) * scale * step


@pytest.mark.parametrize("opset", [17, 18])
def test_subgraph_is_per_token_int8(tmp_path: Path, opset: int) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 48)).astype(np.float32)
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    x[0, 0] *= 100  # one outlier token: a per-tensor scale would flatten the others
    x[1, 2] = 0  # an all-zero row stays zero
    path = tmp_path / "one.onnx"
    path.write_bytes(_one_matmul(weight, opset))
    (got,) = cpu_session(path).run(None, {"x": x})
    np.testing.assert_allclose(got, _reference(x, weight), rtol=1e-4, atol=1e-4)
    assert np.all(got[1, 2] == 0)
    exact = x @ weight
    quiet = np.abs(exact[0, 1:] - got[0, 1:]).max() / np.abs(exact[0, 1:]).max()
    assert quiet < 0.02, quiet  # the outlier row did not cost the others their resolution


@pytest.mark.parametrize("split", [False, True])
def test_the_gemms_are_unsigned_by_unsigned(split: bool) -> None:
    """ONNX Runtime's u8 x s8 GEMM saturates on CPUs without VNNI (vpmaddubsw's int16 pairs):
    the weights go in as uint8 with zero point 128, the same codes shifted, so every x86 CPU
    computes them exactly. (On an AVX2 CPU the outlier test above fails without this; on a
    VNNI one only this test does.)"""
    from onnx import numpy_helper

    weight = np.random.default_rng(1).normal(size=(64, 48)).astype(np.float32)
    model = onnx.load_from_string(_one_matmul(weight, 18, split=split))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(gemms) == (2 if split else 1)
    codes, _ = per_token.quantize_columns(weight)
    for gemm in gemms:
        weights, zero = inits[gemm.input[1]], inits[gemm.input[5]]
        assert weights.dtype == np.uint8 and zero.dtype == np.uint8 and int(zero) == 128
        np.testing.assert_array_equal(weights.astype(np.int16) - 128, codes)


def _split_reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear's u8 code of ``x``, then its residual's at 1/254 of the step,
    both against per-column int8 weights, in numpy."""
    codes, scale = per_token.quantize_columns(weight)
    step = (max(x.max(), 0) - min(x.min(), 0)) / 255
    zero = np.clip(np.rint(-min(x.min(), 0) / step), 0, 255)
    q = np.clip(np.rint(x / step) + zero, 0, 255)
    residual = x - (q - zero) * np.float32(step)
    fine = np.float32(step) * np.float32(1 / 254)
    r = np.clip(np.rint(residual / fine) + 128, 0, 255)
    activation = (q - zero) * np.float64(np.float32(step)) + (r - 128) * np.float64(fine)
    return (activation @ codes.astype(np.float64)) * scale


def test_split_activations_leave_only_the_weights_rounding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 48)).astype(np.float32)
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    x[0, 0] *= 100  # the same outlier token: one scale for the tensor, yet no lost resolution
    path = tmp_path / "split.onnx"
    path.write_bytes(_one_matmul(weight, 18, split=True))
    session = cpu_session(path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and "DynamicQuantizeLinear" in ops
    (got,) = session.run(None, {"x": x})
    np.testing.assert_allclose(got, _split_reference(x, weight), rtol=1e-4, atol=1e-3)
    codes, scale = per_token.quantize_columns(weight)
    weights_only = x @ (codes * scale)  # float activations, the same int8 weights
    split_error = np.abs(got[0, 1:] - weights_only[0, 1:]).max()
    per_token_error = np.abs(_reference(x, weight)[0, 1:] - weights_only[0, 1:]).max()
    assert split_error < per_token_error / 2, (split_error, per_token_error)
    assert split_error < 2e-3 * np.abs(weights_only[0, 1:]).max()


def test_split_activations_package(encoder: Path, tmp_path: Path) -> None:
    options = QuantizeOptions.int8_encoder(split_activations=True)
    assert (options.smooth_alpha, options.keep_float) == (None, ())
    result = quantize(encoder, tmp_path / "q", options)
    step = result.manifest["steps"][-1]
    assert step["split_activations"] is True and step["smooth_alpha"] is None
    nodes = onnx.load(str(result.path / "model.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("MatMulIntegerToFloat") == 2 * step["quantized_matmuls"] > 0
    assert not [n for n in nodes if n.name.endswith("/Smooth")]
    per_tok = quantize(encoder, tmp_path / "p", QuantizeOptions.int8_encoder())
    split_min = result.manifest["fidelity"]["cosine_min"]
    assert split_min >= 0.999 and split_min >= per_tok.manifest["fidelity"]["cosine_min"]
    with pytest.raises(llmopt.InvalidInputError, match="int8_per_token"):
        QuantizeOptions.int8().with_(split_activations=True)


def test_smoothing_moves_scale_into_the_weight() -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(16, 8)).astype(np.float32)
    amax = np.abs(rng.normal(size=16)).astype(np.float32) * 50
    s = per_token.smoothing(amax, weight, 0.5)
    x = rng.normal(size=(3, 16)).astype(np.float32)
    np.testing.assert_allclose((x / s) @ (s[:, None] * weight), x @ weight, rtol=1e-4,
                               atol=1e-4)
    spread = np.ptp(np.log(amax))
    assert np.ptp(np.log(amax / s)) < spread  # the activation's channels are flatter


def test_the_per_token_preset(encoder: Path, tmp_path: Path) -> None:
    parent = llmopt.Package.open(encoder)
    # encoders default to weight-only int8 (fast on llmopt's CPU kernels, test_kernels.py)
    assert default_options(parent) == QuantizeOptions.int8()
    result = quantize(parent, tmp_path / "q", QuantizeOptions.int8_encoder())
    assert_round_trips(result)
    step = result.manifest["steps"][-1]
    assert step["method"] == "int8_per_token" and step["smooth_alpha"] == 0.5
    assert step["kept_float"] == [] and step["quantized_matmuls"] > 0  # no layer 3 here
    ops = [n.op_type for n in onnx.load(str(result.path / "model.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == step["quantized_matmuls"]
    fidelity = result.manifest["fidelity"]
    assert fidelity["cosine_min"] >= 0.99, fidelity


def test_without_smoothing_one_layer_float(encoder: Path, tmp_path: Path) -> None:
    options = QuantizeOptions.int8_encoder(smooth_alpha=None,
                                           keep_float=("layer.0.output.dense.",))
    result = quantize(encoder, tmp_path / "q", options)
    step = result.manifest["steps"][-1]
    assert len(step["kept_float"]) == 1 and step["smooth_alpha"] is None
    nodes = onnx.load(str(result.path / "model.onnx")).graph.node
    assert [n.op_type for n in nodes].count("MatMulIntegerToFloat") == step["quantized_matmuls"]
    assert not [n for n in nodes if n.name.endswith("/Smooth")]
    assert result.manifest["fidelity"]["cosine_min"] >= 0.99


def test_decoders_are_refused(tmp_path: Path) -> None:
    from tests import tiny_decoders

    package = export(tiny_decoders.build("llama", tmp_path / "source"), tmp_path / "package")
    assert default_options(package) == QuantizeOptions.int8()
    with pytest.raises(llmopt.UnsupportedError, match="encoders"):
        quantize(package, tmp_path / "q", QuantizeOptions.int8_encoder().with_(evaluate=False))


def test_bad_smooth_alpha() -> None:
    with pytest.raises(llmopt.InvalidInputError, match="smooth_alpha"):
        QuantizeOptions.int8_encoder(smooth_alpha=1.5)


def test_cli_presets_for_an_encoder(encoder: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "llmopt.cli.main"]
    run = subprocess.run([*cli, "quantize", str(encoder), "-o", str(tmp_path / "q"),
                          "--no-eval"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    step = llmopt.Package.open(tmp_path / "q").manifest["steps"][-1]
    assert step["method"] == "int8"  # the default, as for decoders
    bad = subprocess.run([*cli, "quantize", str(encoder), "-o", str(tmp_path / "x"),
                          "--smooth-alpha", "2"], capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "smooth_alpha" in bad.stderr and "Traceback" not in bad.stderr
    split = subprocess.run([*cli, "quantize", str(encoder), "-o", str(tmp_path / "s"),
                            "--split-activations", "--no-eval"], capture_output=True, text=True,
                           check=False)
    assert split.returncode == 0, split.stderr
    step = llmopt.Package.open(tmp_path / "s").manifest["steps"][-1]
    assert step["split_activations"] is True and step["kept_float"] == []
    wrong = subprocess.run([*cli, "quantize", str(encoder), "-o", str(tmp_path / "w"),
                            "--method", "int4", "--split-activations"], capture_output=True,
                           text=True, check=False)
    assert wrong.returncode == 1 and "--method int8-per-token" in wrong.stderr
    assert "Traceback" not in wrong.stderr
