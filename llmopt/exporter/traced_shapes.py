"""Shape arithmetic folded out of traced graphs.

TorchScript records every ``tensor.shape[i]`` a model reads as ``Shape -> Gather`` and every
``view(*shape, -1, head_dim)`` as ``Unsqueeze``/``Concat`` of those, even where the dimension is a
constant of the config (heads, head_dim, hidden) or a dimension the reshaped tensor already has
(batch, sequence): a dozen nodes per layer that ONNX Runtime runs on every step. ONNX Runtime's
symbolic shape inference knows, for each such integer tensor, its value as a list of sympy
expressions; from that:

- an int64 tensor whose value is all integers becomes an initializer (its producers then die);
- a ``Reshape`` target whose symbolic entries equal the input's own dimension at the same place
  becomes a constant with ``0`` ("copy this dimension") there, and one remaining entry ``-1``;
- nodes nothing reads any more are removed.

Dimensions that really change (batch, sequence, past) stay computed. Validation against PyTorch
follows every export, so a folding that was wrong could not pass unnoticed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger("llmopt.exporter")
_INT64 = 7
# ops whose int64 outputs may be shape arithmetic worth folding
_ARITHMETIC = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Add", "Sub",
               "Mul", "Div", "Floor", "Ceil", "Mod", "Neg", "Constant", "ConstantOfShape",
               "Reshape", "Identity", "Range", "Expand"}


def fold_shapes(proto: Any) -> Any:
    """``proto`` with its static shape arithmetic folded (in place; also returned). A graph that
    symbolic shape inference cannot read is returned unchanged."""
    if any(a.type in (5, 10) for node in proto.graph.node for a in node.attribute):
        return proto  # subgraphs read outer names no node input lists: leave control flow be
    try:
        inference = _infer(proto)
    except Exception as exc:  # noqa: BLE001  (ONNX Runtime's inference raises anything)
        log.info("shape folding skipped: symbolic shape inference failed (%s)", exc)
        return proto
    before = len(proto.graph.node)
    constants = _fold_constants(proto, inference)
    reshapes = _fold_reshapes(proto, inference)
    _remove_dead(proto)
    log.info("shape folding: %d constants, %d reshapes; %d -> %d nodes", constants, reshapes,
             before, len(proto.graph.node))
    return proto


def _infer(proto: Any) -> Any:
    """ONNX Runtime's symbolic shape inference run over ``proto``, kept for its ``sympy_data_``
    (the values of the small integer tensors), which its public ``infer_shapes`` drops."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, False, True, 0)
    inference._preprocess(proto)
    while inference.run_:
        inference._infer_impl()
    return inference


def _integers(value: Any) -> list[int] | None:
    import sympy

    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, list | tuple | np.ndarray) and np.ndim(item) > 0:
            return None
        try:
            number = sympy.sympify(item)
        except (sympy.SympifyError, TypeError, ValueError):
            return None
        if not number.is_Integer:
            return None
        out.append(int(number))
    return out


def _static_shape(inference: Any, name: str) -> list[int] | None:
    info = inference.known_vi_.get(name)
    if info is None or info.type.tensor_type.elem_type != _INT64:
        return None
    dims = info.type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):
        return None
    return [d.dim_value for d in dims]


def _fold_constants(proto: Any, inference: Any) -> int:
    from onnx import numpy_helper

    outputs = {o.name for o in proto.graph.output}
    kept, folded = [], []
    for node in proto.graph.node:
        name = node.output[0] if len(node.output) == 1 else None
        shape = _static_shape(inference, name) if name else None
        values = (_integers(inference.sympy_data_[name])
                  if node.op_type in _ARITHMETIC and name in inference.sympy_data_
                  and name not in outputs and shape is not None else None)
        if values is None or shape is None or len(values) != int(np.prod(shape)):
            kept.append(node)
            continue
        folded.append(numpy_helper.from_array(np.array(values, np.int64).reshape(shape), name))
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    proto.graph.initializer.extend(folded)
    return len(folded)


def _fold_reshapes(proto: Any, inference: Any) -> int:
    """``Reshape(x, [batch, sequence, -1, 64])`` -> ``Reshape(x, [0, 0, -1, 64])`` when ``x`` is
    ``[batch, sequence, ...]``: the target no longer needs ``x``'s shape computed."""
    import sympy
    from onnx import numpy_helper

    initializers = {t.name for t in proto.graph.initializer}
    count = 0
    for node in proto.graph.node:
        if node.op_type != "Reshape" or node.input[1] in initializers:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target = inference.sympy_data_.get(node.input[1])
        if not isinstance(target, list) or node.input[0] not in inference.known_vi_:
            continue
        source = inference._get_sympy_shape(node, 0)
        folded: list[int | None] = []
        for i, entry in enumerate(target):
            value = sympy.sympify(entry)
            if value.is_Integer:
                if int(value) == 0:  # "copy" already: keep the graph's meaning, fold nothing
                    folded = []
                    break
                folded.append(int(value))
            elif i < len(source) and sympy.simplify(sympy.sympify(source[i]) - value) == 0:
                folded.append(0)
            else:
                folded.append(None)
        if not folded:
            continue
        if folded.count(None) == 1 and -1 not in folded:
            folded[folded.index(None)] = -1
        if None in folded:
            continue
        name = f"{node.input[1]}_static"
        proto.graph.initializer.append(numpy_helper.from_array(np.array(folded, np.int64), name))
        node.input[1] = name
        count += 1
    return count


def _remove_dead(proto: Any) -> None:
    graph = proto.graph
    needed = {o.name for o in graph.output}
    alive = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            alive.append(node)
            needed.update(node.input)
    alive.reverse()
    del graph.node[:]
    graph.node.extend(alive)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    produced = {o for node in graph.node for o in node.output}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)
