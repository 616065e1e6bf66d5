"""Shape folding of traced graphs, on a graph small enough to read."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from llmopt.exporter.traced_shapes import fold_shapes


def _traced_like() -> onnx.ModelProto:
    """``x.view(x.shape[0], x.shape[1], x.shape[2] // 4, 4)`` the way TorchScript records it.

        x [batch, sequence, 8] -> Shape -> Gather 0, 1, 2 -> (Div 4) -> Unsqueeze -> Concat(.., 4)
                                                                                 -> Reshape(x, .)
    """
    nodes = [helper.make_node("Shape", ["x"], ["shape"])]
    parts = []
    for i in range(3):
        nodes.append(helper.make_node("Gather", ["shape", f"i{i}"], [f"d{i}"], axis=0))
    nodes.append(helper.make_node("Div", ["d2", "four"], ["d2q"]))
    for name in ("d0", "d1", "d2q"):
        nodes.append(helper.make_node("Unsqueeze", [name, "axis0"], [f"{name}u"]))
        parts.append(f"{name}u")
    nodes.append(helper.make_node("Concat", [*parts, "four1"], ["target"], axis=0))
    nodes.append(helper.make_node("Reshape", ["x", "target"], ["y"]))
    inits = [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in range(3)]
    inits += [numpy_helper.from_array(np.array(4, np.int64), "four"),
              numpy_helper.from_array(np.array([4], np.int64), "four1"),
              numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_static_dims_fold_and_dynamic_ones_become_copies() -> None:
    proto = _traced_like()
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    expected = _run(proto, x)
    fold_shapes(proto)
    assert [n.op_type for n in proto.graph.node] == ["Reshape"]
    target = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}[
        proto.graph.node[0].input[1]]
    assert target.tolist() == [0, 0, 2, 4]
    np.testing.assert_array_equal(_run(proto, x), expected)
    other = np.random.default_rng(1).standard_normal((1, 2, 8)).astype(np.float32)
    assert _run(proto, other).shape == (1, 2, 2, 4)


def test_dimensions_the_reshaped_tensor_lacks_stay_computed() -> None:
    """Two target entries are another input's dimensions, not x's: they stay computed (one
    alone would have become -1), while the static one still folds."""
    proto = _traced_like()
    graph = proto.graph
    graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["rows", "cols"]))
    graph.node[0].input[0] = "z"  # d0, d1 from z's shape
    graph.node[3].input[0] = "shape_x"  # d2 from x's (static: 8)
    graph.node.insert(0, helper.make_node("Shape", ["x"], ["shape_x"]))
    graph.output[0].type.tensor_type.shape.dim[0].dim_param = "rows"
    graph.output[0].type.tensor_type.shape.dim[1].dim_param = "cols"
    fold_shapes(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Shape") == 1 and proto.graph.node[0].input[0] == "z", ops
    assert "Div" not in ops  # 8 // 4 folded
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.zeros((2, 3, 8), np.float32),
                           "z": np.zeros((3, 2), np.float32)})[0]
    assert y.shape == (3, 2, 2, 4)
