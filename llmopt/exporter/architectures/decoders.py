"""Decoder-only architectures: a few lines each, mapping transformers weights to llmopt's graph."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from llmopt.errors import UnsupportedError
from llmopt.exporter.architecture import register
from llmopt.exporter.decoder import DecoderArch, DecoderNames, stack_experts

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

# GPT-2 and GPT-BigCode name their weights alike (GPT-2's are Conv1D, [in, out])
_GPT2_LAYER = DecoderNames(
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
    notes="Phi-3/3.5/4-mini: partial rotary; LongRoPE (the 128k variants) with both tables in "
          "the graph, chosen per call",
))

register(DecoderArch(
    name="gpt2",
    model_types=("gpt2",),
    names=_GPT2_LAYER,
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


def _opt_pre_norm(config: Any) -> None:
    """OPT-350m alone normalizes after each block and projects its 512-wide embeddings to 1024."""
    if not getattr(config, "do_layer_norm_before", True) or getattr(
            config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise UnsupportedError(
            "OPT with post-block norms or projected embeddings (opt-350m) has no native builder",
            fix="export another OPT size (125m, 1.3b, 2.7b, 6.7b, ...), all pre-norm")
    if not getattr(config, "layer_norm_elementwise_affine", True):
        raise UnsupportedError("OPT without LayerNorm weights has no native builder",
                               fix="export a checkpoint with layer_norm_elementwise_affine=true")


register(DecoderArch(
    name="opt",
    model_types=("opt",),
    names=DecoderNames(
        embed="model.decoder.embed_tokens.weight",
        position_embed="model.decoder.embed_positions.weight",
        layer="model.decoder.layers.{i}.",
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        fc_in="fc1",
        mlp_out="fc2",
        final_norm="model.decoder.final_layer_norm",
    ),
    norm="layer",
    positions="learned",
    eps=1e-5,
    act_attr="activation_function",
    position_offset=2,
    extra_checks=(_opt_pre_norm,),
    notes="Meta OPT (pre-norm sizes: 125m, 1.3b and up); its position table's 2-row offset is "
          "dropped at export",
))


def _bigcode_multi_query(config: Any) -> None:
    """GPT-BigCode's multi-head variant interleaves q, k and v per head in ``c_attn``, which the
    native graph does not read; its multi-query models (one KV head) are the ones people run."""
    if not getattr(config, "multi_query", True):
        raise UnsupportedError("GPT-BigCode with multi_query=false has no native builder",
                               fix="use a multi-query checkpoint (StarCoder, SantaCoder)")


register(DecoderArch(
    name="gpt_bigcode",
    model_types=("gpt_bigcode",),
    names=_GPT2_LAYER,
    norm="layer",
    positions="learned",
    eps_attr="layer_norm_epsilon",
    act_attr="activation_function",
    kv_heads=lambda config: 1,  # multi-query
    extra_checks=(_bigcode_multi_query,),
    notes="StarCoder 1, SantaCoder, WizardCoder and other multi-query GPT-BigCode models",
))


register(DecoderArch(
    name="gemma",
    model_types=("gemma",),
    names=_LLAMA_LAYER,
    norm="rms",
    positions="rotary",
    norm_offset=1.0,
    scale_embeddings=True,
    notes="Gemma: (1 + w) RMSNorm weights and the sqrt(hidden) embedding scale folded in; GeGLU",
))


register(DecoderArch(
    name="starcoder2",
    model_types=("starcoder2",),
    names=DecoderNames(
        embed="model.embed_tokens.weight",
        layer="model.layers.{i}.",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        fc_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        final_norm="model.norm",
    ),  # biases everywhere (use_bias) are picked up from the state dict
    norm="layer",
    positions="rotary",
    eps_attr="norm_epsilon",
    sliding_window=_window,
    notes="StarCoder2: LayerNorm and projections with biases, plain GELU MLP, sliding window",
))


register(DecoderArch(
    name="olmo",
    model_types=("olmo",),
    names=_LLAMA_LAYER,  # the norm names are unused: OLMo's LayerNorms have no parameters
    norm="layer",
    positions="rotary",
    eps=1e-5,  # hard-coded in OlmoLayerNorm; the config has no epsilon
    norm_weights=False,
    notes="OLMo 1: parameter-free LayerNorm, clip_qkv (a Clip after the q/k/v projection)",
))


def _sliding_layers(config: Any) -> tuple[bool, ...] | None:
    """Which layers attend through the sliding window (Gemma 2/3's ``layer_types``)."""
    types = getattr(config, "layer_types", None)
    return None if types is None else tuple(t == "sliding_attention" for t in types)


def _causal(config: Any) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedError(
            "bidirectional attention (an embedding variant) is not a causal decoder",
            fix="export it with --builder traced, or use the causal checkpoint")


_GEMMA2_LAYER = replace(_LLAMA_LAYER, mlp_norm="pre_feedforward_layernorm",
                        attn_post_norm="post_attention_layernorm",
                        mlp_post_norm="post_feedforward_layernorm")

register(DecoderArch(
    name="gemma2",
    model_types=("gemma2",),
    norm="rms",
    positions="rotary",
    norm_offset=1.0,
    scale_embeddings=True,
    names=_GEMMA2_LAYER,
    act_attr="hidden_activation",
    sliding_window=_window,
    sliding_layers=_sliding_layers,
    extra_checks=(_causal,),
    notes="Gemma 2: pre and post norms, attention and logit soft-capping, alternating "
          "sliding-window and global layers",
))


register(DecoderArch(
    name="phi",
    model_types=("phi",),
    names=DecoderNames(
        embed="model.embed_tokens.weight",
        layer="model.layers.{i}.",
        attn_norm="input_layernorm",  # no mlp_norm: the MLP reads this norm's output too
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.dense",
        fc_in="mlp.fc1",
        mlp_out="mlp.fc2",
        final_norm="model.final_layernorm",
        q_norm="self_attn.q_layernorm",  # present when qk_layernorm is on
        k_norm="self_attn.k_layernorm",
    ),
    norm="layer",
    positions="rotary",
    eps_attr="layer_norm_eps",
    parallel_residual=lambda config: True,
    notes="Phi-1/1.5/2: attention and MLP in parallel from one LayerNorm, partial rotary",
))

register(DecoderArch(
    name="gpt_neox",
    model_types=("gpt_neox",),
    names=DecoderNames(
        embed="gpt_neox.embed_in.weight",
        layer="gpt_neox.layers.{i}.",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        qkv="attention.query_key_value",
        o="attention.dense",
        fc_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out",  # transformers 5 calls it lm_head
    ),
    norm="layer",
    positions="rotary",
    eps_attr="layer_norm_eps",
    qkv_per_head=True,
    parallel_residual=lambda config: bool(getattr(config, "use_parallel_residual", True)),
    notes="GPT-NeoX / Pythia: packed per-head qkv, parallel or sequential residual, partial "
          "rotary (rotary_pct)",
))


register(DecoderArch(
    name="gemma3_text",
    model_types=("gemma3_text",),
    norm="rms",
    positions="rotary",
    norm_offset=1.0,
    scale_embeddings=True,
    names=replace(_GEMMA2_LAYER, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    act_attr="hidden_activation",
    sliding_window=_window,
    sliding_layers=_sliding_layers,
    extra_checks=(_causal,),
    notes="Gemma 3 text: Gemma 2's blocks plus per-head q/k norms and a RoPE table of its own "
          "for the sliding layers",
))



def _mixtral_4x(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """transformers 4's Mixtral: ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate, up, down)."""
    return stack_experts(state, "block_sparse_moe", "mlp", gate="w1", up="w3", down="w2")


register(DecoderArch(
    name="mixtral",
    model_types=("mixtral",),
    names=replace(_LLAMA_LAYER, gate=None, up=None, mlp_out="", router="mlp.gate",
                  experts="mlp.experts"),
    norm="rms",
    positions="rotary",
    sliding_window=_window,
    state_upgrade=_mixtral_4x,
    notes="Mixtral: top-k routed SwiGLU experts (ONNX Runtime's MoE op once optimized)",
))


register(DecoderArch(
    name="stablelm",
    model_types=("stablelm",),
    names=replace(_LLAMA_LAYER, q_norm="self_attn.q_layernorm", k_norm="self_attn.k_layernorm"),
    norm="layer",
    positions="rotary",
    eps_attr="layer_norm_eps",
    parallel_residual=lambda config: bool(getattr(config, "use_parallel_residual", False)),
    notes="StableLM (2): LayerNorm, partial rotary, optional qkv biases, parallel residual "
          "(one norm) and qk_layernorm (one LayerNorm per head)",
))


register(DecoderArch(
    name="olmo2",
    model_types=("olmo2",),
    names=replace(_LLAMA_LAYER,  # attn_norm and mlp_norm are unused: no pre-norms
                  attn_post_norm="post_attention_layernorm",
                  mlp_post_norm="post_feedforward_layernorm",
                  q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    norm="rms",
    positions="rotary",
    pre_norms=False,
    notes="OLMo 2: norms on the attention and MLP outputs only; q/k RMSNorm over the whole "
          "projection, before rotary",
))


def _qwen_moe_4x(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """transformers 4's Qwen MoE: ``mlp.experts.{e}.gate_proj/up_proj/down_proj``."""
    return stack_experts(state, "mlp", "mlp", gate="gate_proj", up="up_proj", down="down_proj")


def _every_layer_sparse(config: Any) -> None:
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise UnsupportedError(
            "Qwen MoE with dense layers (mlp_only_layers, decoder_sparse_step) has no native "
            "builder", fix="export it with --builder traced")


register(DecoderArch(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    names=replace(_LLAMA_LAYER, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", gate=None,
                  up=None, mlp_out="", router="mlp.gate", experts="mlp.experts"),
    norm="rms",
    positions="rotary",
    sliding_window=_window,
    state_upgrade=_qwen_moe_4x,
    extra_checks=(_every_layer_sparse,),
    notes="Qwen3 MoE: Qwen3's attention, top-k routed SwiGLU experts (MoE op once optimized "
          "when norm_topk_prob is set)",
))
