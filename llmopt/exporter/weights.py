"""The normalized weights and dimensions the graph emitters read.

A description (``decoder.py``, ``encoder.py``) reads a transformers config and state dict into
these types; the graph emitters (``decoder_graph.py``, ``encoder_graph.py``) read only these
types, never architecture-specific names; ``optimize`` rebuilds them from a package's own
initializers to emit the graph again. Kept apart from both sides so neither imports the other's
module for its types.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmopt.exporter.ops import Linear


@dataclass(frozen=True)
class DecoderDims:
    """The shape of a decoder, read from its transformers config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    eps: float
    activation: str
    max_positions: int
    sliding_window: int | None
    rotary_dim: int
    attention_scale: float
    layer_scales: tuple[float, ...]  # extra per-layer attention scaling (GPT-2 option)
    rope_scaling: float = 1.0  # multiplies cos/sin (transformers' attention_scaling)
    # Granite's config multipliers; 1.0 elsewhere. Folded into the weights (embed table,
    # o/down projections, LM head) by weights_from_state, so the graph needs no extra ops.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # per layer, whether ``sliding_window`` applies; () = every layer (when there is a window)
    sliding_layers: tuple[bool, ...] = ()
    attn_softcap: float = 0.0  # Gemma 2: scores -> tanh(scores / cap) * cap before the mask
    final_softcap: float = 0.0  # Gemma 2: the same on the logits
    rope_scaling_local: float = 1.0  # attention_scaling of the sliding layers' own RoPE table
    parallel_residual: bool = False  # see DecoderArch.parallel_residual
    # mixture of experts: 0 experts for a dense MLP
    num_experts: int = 0
    experts_per_token: int = 0
    normalize_top_k: bool = True  # renormalize the top-k routing weights to sum to 1
    clip_qkv: float | None = None  # q, k and v clamped to [-c, c] after projection (OLMo)
    # LongRoPE: the long inverse frequencies replace the short ones when max(position_ids) + 1
    # exceeds this (the pretraining context, original_max_position_embeddings); None elsewhere
    long_rope_after: int | None = None

    def window(self, layer: int) -> int | None:
        """The attention window of ``layer``, or None for full attention."""
        if self.sliding_layers and not self.sliding_layers[layer]:
            return None
        return self.sliding_window


@dataclass
class Norm:
    weight: np.ndarray  # [dim], or [heads, head_dim] for a norm with its own weights per head
    bias: np.ndarray | None = None


@dataclass
class MoeWeights:
    """A mixture-of-experts MLP: each expert a gated MLP, ``down(act(gate(x)) * up(x))``."""

    router: Linear  # [hidden, experts]
    gate_up: np.ndarray  # [experts, hidden, 2 * inter]: gate then up, each expert's MatMul weight
    down: np.ndarray  # [experts, inter, hidden]


@dataclass
class LayerWeights:
    attn_norm: Norm | None  # None: the block has no pre-norms (OLMo 2)
    qkv: Linear  # q, k and v projections side by side
    o: Linear
    mlp_norm: Norm | None
    mlp_in: Linear | None  # gate and up side by side (gated MLP), or the plain first projection
    mlp_out: Linear | None  # both None: the layer's MLP is its experts only (Mixtral)
    gated: bool
    q_norm: Norm | None = None  # norm over head_dim, before rotary (Qwen3, Phi-2, StableLM)
    k_norm: Norm | None = None
    attn_post_norm: Norm | None = None  # on the attention output, before the residual add
    mlp_post_norm: Norm | None = None  # on the MLP output, before the residual add
    # parallel block whose MLP reads the attention norm's output: mlp_norm is attn_norm
    shared_norm: bool = False
    moe: MoeWeights | None = None


@dataclass
class DecoderWeights:
    embed: np.ndarray  # [vocab, hidden]
    position_embed: np.ndarray | None
    layers: list[LayerWeights]
    final_norm: Norm
    lm_head: Linear  # [hidden, vocab]
    inv_freq: np.ndarray | None
    inv_freq_local: np.ndarray | None = None  # the sliding layers' own RoPE table (Gemma 3)
    long_inv_freq: np.ndarray | None = None  # LongRoPE's long factors (inv_freq: the short ones)


@dataclass(frozen=True)
class EncoderDims:
    """The shape of an encoder, read from its transformers config."""

    num_layers: int
    num_heads: int
    head_dim: int
    hidden: int
    eps: float
    activation: str
    max_positions: int
    pad_token_id: int
    type_input: bool
    positions: str = "absolute"  # EncoderArch.positions
    head_activation: str = "tanh"  # EncoderArch.head.activation


@dataclass
class EncoderLayerWeights:
    qkv: Linear  # q (scaled by 1/sqrt(head_dim)), k and v side by side: [H, 3H]
    o: Linear
    attn_norm: Norm
    fc_in: Linear
    fc_out: Linear
    mlp_norm: Norm


@dataclass
class EncoderWeights:
    word_embed: np.ndarray  # [vocab, H]
    position_embed: np.ndarray  # [positions, H]; type 0's row added where types are not fed
    token_type_embed: np.ndarray | None  # [types, H], where token_type_ids is an input
    embed_norm: Norm
    layers: list[EncoderLayerWeights]
    head: tuple[Linear, Linear] | None  # (dense, out) of a classification head
    embed_project: Linear | None = None  # [E, H] after the embedding norm, where E != H
    relative_bias: np.ndarray | None = None  # [2L-1, heads]: see EncoderArch.relative_bias
