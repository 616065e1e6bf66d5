"""A small ONNX graph builder with stable, namespaced node names.

Nodes are named after their scope and op (``/model/layers.0/attn/qkv/MatMul``), outputs after
their node (``.../MatMul/output_0``), so later passes (fusion, quantization) and people reading
a graph can find things by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
MS_DOMAIN = "com.microsoft"
# ONNX Runtime 1.31's CPU SkipLayerNormalization (the LayerNorm form, not the RMS one) is about
# 4x slower than the Add + LayerNormalization it replaces on more than one row
# (bench/results/skip_layer_norm.md): float32 graphs, which are for the CPU, keep the two ops.
SKIP_LAYER_NORM_CPU = ("not fused in float32: ONNX Runtime's CPU SkipLayerNormalization measured "
                       "about 4x slower than Add + LayerNormalization "
                       "(bench/results/skip_layer_norm.md); float16 graphs fuse it")

ONNX_DTYPE = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


class GraphBuilder:
    """Collects nodes, initializers and I/O, then builds an ``onnx.ModelProto``."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = []
        self._node_names: Counter[str] = Counter()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._uses_ms_domain = False
        # model metadata: what a runtime may read from the session (get_modelmeta())
        self.metadata: dict[str, str] = {}

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def input(self, name: str, dtype: Any, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _elem(dtype), list(shape)))
        return name

    def output(self, name: str, dtype: Any, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, _elem(dtype), list(shape)))

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add a named initializer (weights keep their source names for readability)."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer, shared between all nodes that use the same value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._consts:
            name = f"/const/{array.dtype.name}_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def op(
        self,
        op_type: str,
        *inputs: str,
        outputs: int = 1,
        output_names: Sequence[str] | None = None,
        domain: str = "",
        name: str | None = None,
        **attrs: Any,
    ) -> Any:
        """Add a node; returns its output name (or a list of names when ``outputs > 1``)."""
        base = "/" + "/".join([*self._scope, name or op_type])
        self._node_names[base] += 1
        node_name = base if self._node_names[base] == 1 else f"{base}_{self._node_names[base] - 1}"
        if output_names is None:
            output_names = [f"{node_name}/output_{i}" for i in range(outputs)]
        if domain == MS_DOMAIN:
            self._uses_ms_domain = True
        node = helper.make_node(
            op_type, list(inputs), list(output_names), name=node_name, domain=domain or None,
            **{k: v for k, v in attrs.items() if v is not None},
        )
        self.nodes.append(node)
        return output_names[0] if len(output_names) == 1 else list(output_names)

    def build(self, graph_name: str, opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, self.inputs, self.outputs, initializer=self.initializers
        )
        opsets = [helper.make_opsetid("", opset)]
        if self._uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="llmopt")
        model.ir_version = min(model.ir_version, 10)
        if self.metadata:
            helper.set_model_props(model, self.metadata)
        return model


def _elem(dtype: Any) -> int:
    if isinstance(dtype, int):
        return dtype
    return ONNX_DTYPE[np.dtype(dtype)]
