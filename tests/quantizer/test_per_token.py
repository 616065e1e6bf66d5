"""int8 per token (the encoder preset): the subgraph computes exactly per-token x per-channel
int8, smoothing changes nothing in float, and quantize() picks it for encoders by default."""

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


def _one_matmul(weight: np.ndarray, opset: int) -> bytes:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], "/layer/MatMul")
    nodes, inits = per_token.replace_matmul(node, weight, None, opset)
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


def test_encoders_get_the_per_token_preset_by_default(encoder: Path, tmp_path: Path) -> None:
    parent = llmopt.Package.open(encoder)
    assert default_options(parent) == QuantizeOptions.int8_encoder()
    result = quantize(parent, tmp_path / "q")
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


def test_cli_picks_the_encoder_preset(encoder: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "llmopt.cli.main"]
    run = subprocess.run([*cli, "quantize", str(encoder), "-o", str(tmp_path / "q"),
                          "--no-eval"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    step = llmopt.Package.open(tmp_path / "q").manifest["steps"][-1]
    assert step["method"] == "int8_per_token"
    bad = subprocess.run([*cli, "quantize", str(encoder), "-o", str(tmp_path / "x"),
                          "--smooth-alpha", "2"], capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "smooth_alpha" in bad.stderr and "Traceback" not in bad.stderr
