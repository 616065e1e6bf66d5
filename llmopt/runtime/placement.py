"""Where ONNX Runtime placed each node of a session, by provider.

ONNX Runtime assigns every node to the first registered provider with a kernel for it and puts
the rest on the next one, down to CPU, without an error. ONNX Runtime 1.31 records that
assignment when the session option :data:`RECORD_PLACEMENT` is "1" and returns it from
``InferenceSession.get_provider_graph_assignment_info()`` as subgraphs, each with its
provider's name and its nodes (name, op type, domain).

Under a GPU provider some small nodes land on CPU on purpose (shape arithmetic that feeds
another node's shape); :data:`COMPUTE_OPS` are the ops whose placement on CPU costs real time
(and a host-device copy of their inputs each step), so only they count as a fallback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmopt.runtime.providers import ORT_NAMES

RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"

COMPUTE_OPS = frozenset({
    "MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul", "QLinearMatMul", "Conv", "Einsum",
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding", "Softmax",
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "Gelu", "FastGelu", "BiasGelu",
    "MoE", "QMoE",
})


@dataclass(frozen=True)
class Placement:
    """Op-type counts per provider (short names: ``cuda``, ``cpu``...). Empty when the
    onnxruntime build does not record placement."""

    ops: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_assignment(cls, subgraphs: Iterable[Any]) -> Placement:
        """From ``get_provider_graph_assignment_info()``'s subgraphs (anything with
        ``ep_name`` and ``get_nodes()`` whose nodes have ``op_type``)."""
        reverse = {v: k for k, v in ORT_NAMES.items()}
        counts: dict[str, Counter[str]] = {}
        for subgraph in subgraphs:
            provider = reverse.get(subgraph.ep_name, subgraph.ep_name)
            counts.setdefault(provider, Counter()).update(
                node.op_type for node in subgraph.get_nodes())
        return cls({p: dict(c.most_common()) for p, c in counts.items()})

    def compute_ops_on(self, provider: str) -> dict[str, int]:
        """The :data:`COMPUTE_OPS` placed on ``provider``, with their counts."""
        return {op: n for op, n in self.ops.get(provider, {}).items() if op in COMPUTE_OPS}

    def nodes_on(self, provider: str) -> int:
        return sum(self.ops.get(provider, {}).values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {p: dict(c) for p, c in self.ops.items()}


def node_placement(session: Any) -> Placement:
    """The session's placement (empty where onnxruntime predates the recording)."""
    read = getattr(session, "get_provider_graph_assignment_info", None)
    if read is None:
        return Placement()
    try:
        return Placement.from_assignment(read())
    except Exception:  # noqa: BLE001  (not recorded: an older build or the option unset)
        return Placement()
