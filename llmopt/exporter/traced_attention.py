"""One fused attention node per layer in traced decoder graphs.

While the traced builder traces a model, transformers' attention dispatch (``AttentionInterface``)
points at :func:`fused_attention`, whose core is an autograd function that runs eager attention in
PyTorch and exports as ONNX Runtime's ``com.microsoft::MultiHeadAttention``, in place of the
MatMul/Softmax/repeat_kv chain eager or SDPA attention traces into (a dozen nodes and two
[B,H,S,T] tensors per layer). The mask is transformers' additive (eager) one, built once per
forward and passed as the node's ``attention_bias``, so causal, padding and sliding-window
patterns stay exactly what the model builds. What the node cannot express (logit soft-capping,
attention sinks, value heads wider or narrower than query heads, no mask) falls back to the
model's own eager attention, layer by layer.

    query [B,H,S,D]        key, value [B,kvH,T,D]           mask [B,1,S,T] (additive)
         |                  (cache already appended)              |
    Transpose, Reshape           |                                |
    [B,S,H*D]            Unsqueeze, Expand, Reshape               |
         |               [B,H,T,D] (only when kvH < H)            |
         +-----------> MultiHeadAttention(num_heads=H, scale) <---+
                                 |
                        [B,S,H*D] -> Reshape -> [B,S,H,D]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

NAME = "llmopt_fused"


class _MultiHeadAttention(torch.autograd.Function):
    """Eager attention when run, one ``MultiHeadAttention`` node when exported."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                scale: float) -> torch.Tensor:
        groups = heads // kv_heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        weights = torch.matmul(query, key.transpose(2, 3)) * scale + mask
        return torch.matmul(weights.softmax(-1), value).transpose(1, 2)

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, mask: Any, heads: int, kv_heads: int,
                 head_dim: int, scale: float) -> Any:
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor

        def const(values: list[int]) -> Any:
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.long))

        groups = heads // kv_heads

        def repeat(x: Any) -> Any:  # kv head j serves query heads j*groups .. j*groups+groups-1
            if groups == 1:
                return x
            x = g.op("Unsqueeze", x, const([2]))
            x = g.op("Expand", x, const([1, 1, groups, 1, 1]))
            return g.op("Reshape", x, const([0, heads, -1, head_dim]))

        q = g.op("Reshape", g.op("Transpose", query, perm_i=[0, 2, 1, 3]),
                 const([0, 0, heads * head_dim]))
        none = _optional_input_placeholder_tensor(g)
        out = g.op("com.microsoft::MultiHeadAttention", q, repeat(key), repeat(value), none, none,
                   mask, num_heads_i=heads, scale_f=scale)
        return g.op("Reshape", out, const([0, 0, heads, head_dim]))


def fused_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query [B,H,S,D]``, ``key``/``value [B,kvH,T,D]``,
    an additive mask ``[B,1,S,T]`` -> ``([B,S,H,D], None)``."""
    heads, kv_heads, head_dim = int(query.shape[1]), int(key.shape[1]), int(query.shape[3])
    if (kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or getattr(module, "sinks", None) is not None or attention_mask is None
            or attention_mask.dtype == torch.bool or dropout or value.shape[3] != head_dim
            or heads % kv_heads):
        return _eager(module)(module, query, key, value, attention_mask, scaling=scaling,
                              dropout=dropout, **kwargs)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(head_dim)
    mask = attention_mask[:, :, :, : key.shape[2]]
    out = _MultiHeadAttention.apply(query, key, value, mask.to(query.dtype), heads, kv_heads,
                                    head_dim, scale)
    return out, None


def _eager(module: Any) -> Any:
    """The model's own eager attention (soft-capping, sinks and scaling as the model does them)."""
    own = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if own is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return own


@contextmanager
def fused_attention_for(model: Any) -> Iterator[None]:
    """``model`` dispatches its attention to :func:`fused_attention` (with transformers' additive
    masks) inside the block, and to what it used before after it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, fused_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    config = model.config
    before = {"": config._attn_implementation}
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if sub is not None:
            before[key] = sub._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
