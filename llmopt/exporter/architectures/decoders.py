"""Decoder-only architectures: a few lines each, mapping transformers weights to llmopt's graph."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llmopt.exporter.decoder import DecoderArch, DecoderNames
from llmopt.exporter.registry import register

_LLAMA_LAYER = DecoderNames(
    embed="model.embed_tokens.weight",
    layer="model.layers.{i}.",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
)


def _window(config: Any) -> int | None:
    """The sliding attention window, where the config turns one on."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


register(DecoderArch(
    name="llama",
    model_types=("llama",),
    names=_LLAMA_LAYER,
    norm="rms",
    positions="rotary",
    notes="Llama 2/3, SmolLM/SmolLM2, TinyLlama and other Llama-architecture models",
))

register(DecoderArch(
    name="mistral",
    model_types=("mistral",),
    names=_LLAMA_LAYER,
    norm="rms",
    positions="rotary",
    sliding_window=_window,
    notes="sliding-window attention where the config sets one",
))

register(DecoderArch(
    name="qwen2",
    model_types=("qwen2",),
    names=_LLAMA_LAYER,  # q/k/v biases are picked up from the state dict
    norm="rms",
    positions="rotary",
    sliding_window=_window,
))

register(DecoderArch(
    name="qwen3",
    model_types=("qwen3",),
    names=replace(_LLAMA_LAYER, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    norm="rms",
    positions="rotary",
    sliding_window=_window,
    notes="Qwen3 dense models (per-head q/k RMSNorm); the MoE variants are not native",
))

register(DecoderArch(
    name="phi3",
    model_types=("phi3",),
    names=DecoderNames(
        embed="model.embed_tokens.weight",
        layer="model.layers.{i}.",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        qkv="self_attn.qkv_proj",
        o="self_attn.o_proj",
        gate_up="mlp.gate_up_proj",
        mlp_out="mlp.down_proj",
        final_norm="model.norm",
    ),
    norm="rms",
    positions="rotary",
    sliding_window=_window,
    notes="partial rotary supported; LongRoPE (128k variants) not yet",
))

register(DecoderArch(
    name="gpt2",
    model_types=("gpt2",),
    names=DecoderNames(
        embed="transformer.wte.weight",
        position_embed="transformer.wpe.weight",
        layer="transformer.h.{i}.",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        qkv="attn.c_attn",
        o="attn.c_proj",
        fc_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
    ),
    norm="layer",
    positions="learned",
    eps_attr="layer_norm_epsilon",
    act_attr="activation_function",
    transposed_linear=True,
))

register(DecoderArch(
    name="granite",
    model_types=("granite",),
    names=_LLAMA_LAYER,
    norm="rms",
    positions="rotary",
    notes="IBM Granite (3.x dense): its embedding, residual, attention and logits multipliers",
))
