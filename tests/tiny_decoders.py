"""Tiny decoder models built from configs (2 layers, hidden 64), saved with a local tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers as T

from tests.tiny_tokenizers import decoder_tokenizer

_COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 256,
}

_MHA = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}

# architecture -> (model class, config); every registered decoder must appear here
CONFIGS = {
    "llama": (T.LlamaForCausalLM, lambda v: T.LlamaConfig(vocab_size=v, **_COMMON)),
    "mistral": (T.MistralForCausalLM,
                lambda v: T.MistralConfig(vocab_size=v, sliding_window=8, **_COMMON)),
    "qwen2": (T.Qwen2ForCausalLM, lambda v: T.Qwen2Config(vocab_size=v, **_COMMON)),
    "qwen3": (T.Qwen3ForCausalLM,
              lambda v: T.Qwen3Config(vocab_size=v, head_dim=16, **_COMMON)),
    "granite": (T.GraniteForCausalLM,
                lambda v: T.GraniteConfig(vocab_size=v, embedding_multiplier=2.0,
                                          residual_multiplier=0.5, attention_multiplier=0.2,
                                          logits_scaling=4.0, **_COMMON)),
    "phi": (T.PhiForCausalLM,
            lambda v: T.PhiConfig(vocab_size=v, partial_rotary_factor=0.5, **_COMMON)),
    "phi3": (T.Phi3ForCausalLM,
             lambda v: T.Phi3Config(vocab_size=v, partial_rotary_factor=0.5, **_COMMON)),
    "opt": (T.OPTForCausalLM,
            lambda v: T.OPTConfig(vocab_size=v, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256,
                                  word_embed_proj_dim=64)),
    "gpt_bigcode": (T.GPTBigCodeForCausalLM,
                    lambda v: T.GPTBigCodeConfig(vocab_size=v, n_embd=64, n_layer=2, n_head=4,
                                                 n_positions=256, multi_query=True)),
    "gemma": (T.GemmaForCausalLM,
              lambda v: T.GemmaConfig(vocab_size=v, head_dim=16, **_COMMON)),
    # tied head (the default), biases everywhere, a window shorter than the validation prompts
    "starcoder2": (T.Starcoder2ForCausalLM,
                   lambda v: T.Starcoder2Config(vocab_size=v, sliding_window=8, **_COMMON)),
    # untied head (the default); clip_qkv below the projections' range, so the Clip bites
    "olmo": (T.OlmoForCausalLM, lambda v: T.OlmoConfig(vocab_size=v, clip_qkv=1.5, **_COMMON)),
    # both layer types, a window shorter than the validation prompts, soft-capping on, a
    # query_pre_attn_scalar that is not head_dim
    "gemma2": (T.Gemma2ForCausalLM,
               lambda v: T.Gemma2Config(vocab_size=v, head_dim=16, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"],
                                        query_pre_attn_scalar=32, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=8.0, **_COMMON)),
    "gpt_neox": (T.GPTNeoXForCausalLM,
                 lambda v: T.GPTNeoXConfig(vocab_size=v, rotary_pct=0.25, **_MHA)),
    # plus q/k norms, the sliding layers' own RoPE base, linear scaling on the global layers
    "gemma3_text": (T.Gemma3ForCausalLM,
                    lambda v: T.Gemma3TextConfig(
                        vocab_size=v, head_dim=16, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=32, rope_local_base_freq=100.0,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}, **_COMMON)),
    # norm_topk_prob as in Qwen3-30B-A3B (the config class defaults it off)
    "qwen3_moe": (T.Qwen3MoeForCausalLM,
                  lambda v: T.Qwen3MoeConfig(vocab_size=v, head_dim=16, num_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=32,
                                             norm_topk_prob=True, **_COMMON)),
    "mixtral": (T.MixtralForCausalLM,
                lambda v: T.MixtralConfig(vocab_size=v, num_local_experts=4,
                                          num_experts_per_tok=2, **_COMMON)),
    # sequential with qkv biases here; the parallel and qk_layernorm variants in test_decoders
    "stablelm": (T.StableLmForCausalLM,
                 lambda v: T.StableLmConfig(vocab_size=v, partial_rotary_factor=0.25,
                                            use_qkv_bias=True, **_COMMON)),
    # no pre-norms; q/k norms over heads * head_dim (64), not head_dim (16)
    "olmo2": (T.Olmo2ForCausalLM, lambda v: T.Olmo2Config(vocab_size=v, **_COMMON)),
    "gpt2": (T.GPT2LMHeadModel,
             lambda v: T.GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4,
                                    n_positions=256)),
}


LONGROPE_SWITCH = 16  # original_max_position_embeddings of the LongRoPE variant
# variants of registered architectures, built like CONFIGS: Phi-3.5/Phi-4-mini 128k's LongRoPE
# (with partial rotary, as Phi-4-mini) switching at 16 tokens, so short prompts, long prompts
# and decode steps crossing the switch all run in the tests
VARIANTS = {
    "phi3-longrope": (T.Phi3ForCausalLM, lambda v: T.Phi3Config(
        vocab_size=v, partial_rotary_factor=0.75, original_max_position_embeddings=LONGROPE_SWITCH,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5],
                      "long_factor": [3.0, 5.0, 8.0, 13.0, 21.0, 34.0]}, **_COMMON)),
}


def build(arch: str, directory: str | os.PathLike[str], seed: int = 0,
          safe_serialization: bool = True, make_tokenizer: Any = decoder_tokenizer,
          **options: Any) -> Path:
    """Save a tiny random ``arch`` model and its tokenizer (``make_tokenizer(directory)``, a
    builder of tests/tiny_tokenizers.py) into ``directory``; ``options`` set config attributes
    on top of ``CONFIGS[arch]`` (variants such as ``qk_layernorm=True``)."""
    directory = Path(directory)
    tokenizer = make_tokenizer(directory)
    model_class, make_config = {**CONFIGS, **VARIANTS}[arch]
    config = make_config(len(tokenizer))
    for name, value in options.items():
        setattr(config, name, value)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = save_random(model_class, config, tokenizer, directory, seed)
    if not safe_serialization:  # transformers 5 always writes safetensors; make a pickled copy
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def save_random(model_class: Any, config: Any, tokenizer: Any, directory: Path,
                seed: int) -> Any:
    """A seeded random ``model_class(config)`` saved in ``directory``, with weights larger than
    the default init so every layer matters."""
    model = random_model(model_class, config, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    return model


def random_model(model_class: Any, config: Any, seed: int) -> Any:
    """A seeded random ``model_class(config)`` with weights larger than the default init
    (matrices N(0, 0.2), vectors U(0.5, 1.5)), so every layer matters."""
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
            else:
                param.uniform_(0.5, 1.5)
    return model
