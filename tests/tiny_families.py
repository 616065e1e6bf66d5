"""Tiny random models of the families llmopt exports without a native builder (the traced
path), built from configs with local tokenizers, beside ``tiny_decoders`` (the native ones).

Each entry names transformers classes by string, so a family the installed transformers lacks
(4.57 predates some) is skipped by name instead of failing at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as T

from tests import tiny_decoders, tiny_tokenizers

_C = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
_MHA = {k: v for k, v in _C.items() if k != "num_key_value_heads"}
_GPT = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}

# model type -> (model class, config class, config kwargs)
DECODERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "falcon": ("FalconForCausalLM", "FalconConfig",
               {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "new_decoder_architecture": True, "num_kv_heads": 2}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  {**_C, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 64}),
    "bloom": ("BloomForCausalLM", "BloomConfig", {"hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", {**_GPT, "rotary_dim": 8}),
    "codegen": ("CodeGenForCausalLM", "CodeGenConfig", {**_GPT, "rotary_dim": 8}),
    "gpt_neo": ("GPTNeoForCausalLM", "GPTNeoConfig",
                {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "window_size": 8,
                 "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 256}),
    "mpt": ("MptForCausalLM", "MptConfig",
            {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 256}),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", _C),
    "nemotron": ("NemotronForCausalLM", "NemotronConfig", _C),
    "exaone4": ("Exaone4ForCausalLM", "Exaone4Config", _C),
}

_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 64}
# model type -> (config kwargs, tokenizer builder)
ENCODERS: dict[str, tuple[dict[str, Any], Callable[[Path], Any]]] = {
    "modernbert": ({**_BERT, "global_attn_every_n_layers": 2, "local_attention": 8,
                    "pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3,
                    "bos_token_id": 2, "eos_token_id": 3},
                   lambda d: tiny_tokenizers.bert_tokenizer(d, token_types=False)),
    "albert": ({**_BERT, "embedding_size": 16}, tiny_tokenizers.bert_tokenizer),
    # relative positions in log buckets (16: sequences past 8 tokens use the log part),
    # content-to-position and position-to-content attention
    "deberta-v2": ({**_BERT, "type_vocab_size": 2, "relative_attention": True,
                    "position_buckets": 16, "pos_att_type": ["p2c", "c2p"]},
                   tiny_tokenizers.bert_tokenizer),
}


def missing(model_type: str) -> str | None:
    """Why this transformers cannot build the family, or None."""
    if model_type in DECODERS:
        model_class, config_class, _ = DECODERS[model_type]
        absent = [n for n in (model_class, config_class) if not hasattr(T, n)]
        if absent:
            return f"transformers {T.__version__} has no {', '.join(absent)}"
    return None


def build_decoder(model_type: str, directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a tiny random decoder of ``model_type`` (native or traced) and its tokenizer."""
    if model_type in tiny_decoders.CONFIGS:
        return tiny_decoders.build(model_type, directory, seed)
    directory = Path(directory)
    tokenizer = tiny_tokenizers.decoder_tokenizer(directory)
    model_class, config_class, kwargs = DECODERS[model_type]
    config = getattr(T, config_class)(vocab_size=len(tokenizer), **kwargs)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    tiny_decoders.save_random(getattr(T, model_class), config, tokenizer, directory, seed)
    return directory


def build_encoder(model_type: str, directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a tiny random encoder (base model) of ``model_type`` and its tokenizer."""
    directory = Path(directory)
    kwargs, make_tokenizer = ENCODERS[model_type]
    tokenizer = make_tokenizer(directory)
    config = T.AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **kwargs)
    torch.manual_seed(seed)
    model = T.AutoModel.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return directory
