"""llmopt's own block quantizer and the MatMulNBits graphs it writes, run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmopt.quantizer import blockwise

RNG = np.random.default_rng(7)


def _run(nodes: list, inits: list, x: np.ndarray, n: int) -> np.ndarray:
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, x.shape[-1]])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])
    graph = helper.make_graph(nodes, "g", [x_info], [y_info], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _weight(k: int, n: int) -> np.ndarray:
    w = RNG.standard_normal((k, n)).astype(np.float32) * 0.05
    w[RNG.integers(0, k, 8), RNG.integers(0, n, 8)] = 0.6  # a few outliers, as real layers have
    return w


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, True), (8, False)])
@pytest.mark.parametrize("k", [64, 96])  # 96: an odd number of blocks (zero point padding)
def test_graph_computes_the_dequantized_weight(bits: int, symmetric: bool, k: int) -> None:
    w = _weight(k, 48)
    blocks = blockwise.quantize(w, bits=bits, block=32, symmetric=symmetric)
    x = RNG.standard_normal((2, 3, k)).astype(np.float32)
    nodes, inits = blockwise.matmul_nbits("mm", ("x", "y"), "w", blocks, accuracy_level=0)
    assert [n.op_type for n in nodes] == ["MatMulNBits"]
    np.testing.assert_allclose(_run(nodes, inits, x, 48), x @ blocks.dequantize(),
                               rtol=1e-4, atol=1e-4)


def test_float_zero_points_run_symmetric_plus_correction() -> None:
    """HQQ-like float zero points: a symmetric MatMulNBits (no zero-point input) that also
    computes x's block sums, and the correction, computing exactly what the float zero points
    mean."""
    k, n = 96, 40
    nblocks = k // 32
    codes = RNG.integers(0, 16, (n, nblocks, 32)).astype(np.uint8)
    scales = RNG.uniform(0.01, 0.05, (n, nblocks)).astype(np.float32)
    zeros = RNG.uniform(0, 15, (n, nblocks)).astype(np.float32)
    blocks = blockwise.Blocks(codes, scales, zeros, bits=4)
    nodes, inits = blockwise.matmul_nbits("mm", ("x", "y"), "w", blocks, accuracy_level=0)
    assert [node.op_type for node in nodes] == ["MatMulNBits", "Split", "MatMul", "Add"]
    assert len(nodes[0].input) == 3  # no zero points: the fast kernel
    # one block-sum column per block beside the N outputs; the only float matrix added is C
    assert {a.name: a.i for a in nodes[0].attribute}["N"] == n + nblocks
    assert sorted(i.dims[:] for i in inits if i.data_type == onnx.TensorProto.FLOAT) == [
        [nblocks, n], [(n + nblocks) * nblocks]]
    x = RNG.standard_normal((1, 5, k)).astype(np.float32)
    want = x @ blocks.dequantize()
    np.testing.assert_allclose(_run(nodes, inits, x, n), want, rtol=1e-4, atol=1e-4)
    # int8 compute (accuracy level 4) stays close too: only activations are rounded
    nodes4, inits4 = blockwise.matmul_nbits("mm", ("x", "y"), "w", blocks, accuracy_level=4)
    got4 = _run(nodes4, inits4, x, n)
    assert np.max(np.abs(got4 - want)) < 0.02 * np.max(np.abs(want))


def test_correct_float_zero_points_rewrites_a_graph_in_place() -> None:
    k, n = 64, 24
    codes = RNG.integers(0, 16, (n, k // 32, 32)).astype(np.uint8)
    scales = RNG.uniform(0.01, 0.05, (n, k // 32)).astype(np.float32)
    zeros = RNG.uniform(0, 15, (n, k // 32)).astype(np.float32)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    inits = [onnx.numpy_helper.from_array(packed, "w.q4"),
             onnx.numpy_helper.from_array(scales.reshape(-1), "w.scales"),
             onnx.numpy_helper.from_array(zeros.reshape(-1), "w.zp")]
    node = helper.make_node("MatMulNBits", ["x", "w.q4", "w.scales", "w.zp"], ["y"],
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=32)
    x = RNG.standard_normal((1, 2, k)).astype(np.float32)
    before = _run([node], inits, x, n)
    graph = helper.make_graph([node], "g", [], [], inits)
    model = helper.make_model(graph)
    assert blockwise.correct_float_zero_points(model) == 1
    assert "w.zp" not in {t.name for t in model.graph.initializer}
    after = _run(list(model.graph.node), list(model.graph.initializer), x, n)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_mse_search_beats_round_to_nearest() -> None:
    w = _weight(256, 64)
    rtn = blockwise.quantize(w, bits=4, method="rtn")
    mse = blockwise.quantize(w, bits=4, method="mse")
    error = {name: float(np.mean((b.dequantize() - w) ** 2)) for name, b in
             (("rtn", rtn), ("mse", mse))}
    assert error["mse"] < 0.97 * error["rtn"], error
    assert rtn.zeros is not None and rtn.zeros.dtype == np.uint8 and rtn.zeros.max() <= 15
    assert rtn.codes.max() <= 15


def test_block_must_divide_the_input_size() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        blockwise.quantize(_weight(48, 8), block=32)


@pytest.mark.parametrize("rows", [5, 0])
def test_the_correction_takes_rows_of_any_rank_and_no_rows(rows: int) -> None:
    """A routed expert multiplies the [tokens, K] rows routed to it, often none: the corrected
    kernel must give [rows, N] for both."""
    k, n = 64, 24
    codes = RNG.integers(0, 16, (n, k // 32, 32)).astype(np.uint8)
    scales = RNG.uniform(0.01, 0.05, (n, k // 32)).astype(np.float32)
    zeros = RNG.uniform(0, 15, (n, k // 32)).astype(np.float32)
    blocks = blockwise.Blocks(codes, scales, zeros, bits=4)
    nodes, inits = blockwise.matmul_nbits("mm", ("x", "y"), "w", blocks, accuracy_level=0)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])
    model = helper.make_model(helper.make_graph(nodes, "g", [x_info], [y_info], inits),
                              ir_version=10, opset_imports=[
                                  helper.make_opsetid("", 18),
                                  helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((rows, k)).astype(np.float32)
    (got,) = session.run(None, {"x": x})
    assert got.shape == (rows, n)
    np.testing.assert_allclose(got, x @ blocks.dequantize(), rtol=1e-4, atol=1e-4)
