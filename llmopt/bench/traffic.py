"""Bytes a decoder reads from memory per generated token, counted from its ONNX graph.

Decode at batch 1 is bound by memory traffic: every weight matrix is streamed once per step,
plus the KV cache of every earlier position. Counting those bytes from the package (not from
a parameter count) gives the figure to set against the machine's read bandwidth
(:mod:`llmopt.bench.bandwidth`): ``bytes/token x tokens/s`` is the bandwidth a run used.

What one decode step reads:

- every initializer, in full (4-bit codes, scales, zero points, float corrections, the LM
  head, norms), except lookup tables;
- of a lookup table, one row: a tensor used only as the data of a ``Gather`` (an embedding)
  or as the cos/sin cache of a rotary or attention node reads the row of the current token or
  position;
- the KV cache: ``kv_bytes_per_position`` for every position before the new token, summed
  over the ``past_key_values``-style inputs (their element type is the cache's).

An initializer shared by a lookup and a MatMul (tied embeddings) counts in full once.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Inputs of these ops that hold per-position tables: only the current position's row is read.
POSITION_TABLES = {"RotaryEmbedding": (2, 3), "GroupQueryAttention": (7, 8)}
PAST_PREFIXES = ("past_key_values", "past_key", "past_value", "past.")


@dataclass(frozen=True)
class Traffic:
    """Bytes read per decode step of one sequence."""

    weight_bytes: int            # initializers streamed in full
    lookup_row_bytes: int        # one row of each lookup table
    kv_bytes_per_position: int   # KV cache bytes per earlier position, over all layers

    def bytes_per_token(self, context: float) -> float:
        """Bytes read to produce one token with ``context`` positions already cached."""
        return self.weight_bytes + self.lookup_row_bytes + self.kv_bytes_per_position * context

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_decode_context(prompt_tokens: int, new_tokens: int) -> float:
    """The average number of cached positions over the decode steps of a request: the step
    making token ``i`` (1-based, the first comes from prefill) sees ``prompt + i - 1``."""
    if new_tokens <= 1:
        return float(prompt_tokens)
    return prompt_tokens + new_tokens / 2


def model_traffic(model: str | os.PathLike[str] | Any,
                  symbols: Mapping[str, int] | None = None) -> Traffic:
    """The :class:`Traffic` of an ONNX model file (external data is not read: sizes come from
    the tensor shapes) or of a loaded ``ModelProto``. ``symbols`` gives the values of symbolic
    cache dimensions other than batch and sequence (GenAI's models name the head size
    ``kv_cache_dim``)."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(
        str(Path(model)), load_external_data=False)
    graph = proto.graph
    sizes = {t.name: _tensor_bytes(t.data_type, t.dims) for t in graph.initializer}
    rows = {t.name: (t.dims[0] if t.dims else 1) for t in graph.initializer}
    uses: dict[str, set[str]] = defaultdict(set)  # initializer -> "lookup" / "full"
    for node in graph.node:
        tables = POSITION_TABLES.get(node.op_type, ())
        for index, name in enumerate(node.input):
            if name not in sizes:
                continue
            is_row = (node.op_type == "Gather" and index == 0 and _axis(node) == 0) \
                or index in tables
            uses[name].add("lookup" if is_row else "full")
    weight = lookup = 0
    for name, size in sizes.items():
        if uses.get(name) == {"lookup"}:
            lookup += math.ceil(size / max(rows[name], 1))
        else:
            weight += size
    kv = sum(_position_bytes(value, symbols or {}) for value in graph.input
             if value.name.startswith(PAST_PREFIXES))
    return Traffic(weight, lookup, kv)


def _position_bytes(value: Any, symbols: Mapping[str, int]) -> int:
    """One position's bytes of a cache input laid out [batch, kv_heads, sequence, head_dim]."""
    tensor = value.type.tensor_type
    dims = list(tensor.shape.dim)
    if len(dims) != 4:
        raise ValueError(f"cache input {value.name} has {len(dims)} dimensions, expected "
                         "[batch, kv_heads, sequence, head_dim]")
    sizes = []
    for dim in (dims[1], dims[3]):
        size = dim.dim_value or symbols.get(dim.dim_param)
        if not size:
            raise ValueError(f"cache input {value.name}: dimension {dim.dim_param!r} is "
                             "symbolic; pass its value in symbols")
        sizes.append(int(size))
    return _tensor_bytes(tensor.elem_type, sizes)


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _tensor_bytes(data_type: int, dims: Any) -> int:
    import onnx

    count = math.prod(int(d) for d in dims)
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return math.ceil(count / 2)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    return count * itemsize
