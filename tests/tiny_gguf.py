"""Tiny GGUF files written locally (no network, no llama.cpp): a random transformers model saved
the way llama.cpp's converter saves it, its weights in one GGUF quantization type.

Metadata comes from transformers' own GGUF key table read backwards, tensor names from its
GGUF-to-transformers name map, so what transformers reads back is the model written (after the
quantization rounding). ``gguf.quants`` has numpy quantizers for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/BF16;
this module adds the K-quants llama.cpp's Q4_K_M files use (super-blocks of 256): Q4_K and Q5_K
(eight 32-weight sub-blocks with 6-bit scales and mins) and Q6_K (sixteen 16-weight sub-blocks
with int8 scales).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

QK_K = 256
# transformers model_type -> llama.cpp architecture name, where they differ
GGUF_ARCH = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# architecture -> (model class, config class, config kwargs): every architecture that both
# transformers reads from GGUF and llmopt exports. Hidden sizes are multiples of 256 so every
# matrix holds whole Q4_K super-blocks. Attributes transformers' GGUF loader does not read
# (its GGUF_CONFIG_MAPPING drops them) keep the config class's default, or the model read back
# would differ from the one written: Qwen3's head_dim 128, the MoE expert widths, Gemma's
# query_pre_attn_scalar, StableLM's rotary fraction, Falcon's original (multi-query) layout.
_COMMON = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "vocab_size": 96}
_GEMMA = {**_COMMON, "head_dim": 64, "sliding_window": 8}
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _COMMON),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _COMMON),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**_COMMON, "head_dim": 128}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {**_COMMON, "pad_token_id": 0}),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", {**_COMMON, "use_qkv_bias": True}),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", _COMMON),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", _GEMMA),
    # six layers: the default pattern (five sliding, one global) holds both kinds
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig", {**_GEMMA, "num_hidden_layers": 6}),
    "bloom": ("BloomForCausalLM", "BloomConfig",
              {"hidden_size": 256, "n_layer": 2, "n_head": 4, "vocab_size": 96}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             {"n_embd": 256, "n_layer": 2, "n_head": 4, "vocab_size": 96}),
    "falcon": ("FalconForCausalLM", "FalconConfig",
               {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "vocab_size": 96, "multi_query": True, "new_decoder_architecture": False}),
    # (1 + w) LayerNorms stored as llama.cpp's w + 1, half the head rotary (the default)
    "nemotron": ("NemotronForCausalLM", "NemotronConfig", _COMMON),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  {**_COMMON, "num_hidden_layers": 1, "num_experts": 4,
                   "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  {**_COMMON, "head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
                   "norm_topk_prob": True}),
}

# architectures transformers 4.x's GGUF loader reads as another model than the file holds, so
# llmopt refuses them from the header there: architecture -> the refusal's words
NEEDS_TRANSFORMERS_5 = {"qwen3_moe": "renormalizes a qwen3moe token's top-k expert weights",
                        "qwen2_moe": "splits a qwen2moe file's stacked experts as 60 experts"}


def build(arch: str, path: str | os.PathLike[str], qtype: str, seed: int = 0,
          overrides: dict[str, str] | None = None) -> Path:
    """Write a tiny random ``arch`` model to the GGUF file ``path``, every matrix in ``qtype``
    except the tensors named in ``overrides`` (``{"attn_v": "Q8_0"}``, as llama.cpp's Q4_K_M
    mixes in Q6_K); norms and biases stay F32, as llama.cpp keeps them."""
    return write(model(arch, seed), path, qtype, overrides)


def model(arch: str, seed: int = 0) -> Any:
    """The tiny random transformers model of ``arch`` that ``build`` writes."""
    import transformers

    from tests import tiny_decoders

    model_name, config_name, kwargs = MODELS[arch]
    config = getattr(transformers, config_name)(tie_word_embeddings=True, bos_token_id=1,
                                                eos_token_id=2, **kwargs)
    return tiny_decoders.random_model(getattr(transformers, model_name), config, seed)


def write(model: Any, path: str | os.PathLike[str], qtype: str,
          overrides: dict[str, str] | None = None,
          tokenizer_from: str | os.PathLike[str] | None = None,
          fields: dict[str, Any] | None = None,
          extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """``model`` (a transformers causal LM of an architecture transformers reads from GGUF)
    as the GGUF file ``path``, with the tokenizer of the GGUF file ``tokenizer_from`` or, by
    default, a byte-level BPE over ASCII characters (enough for the evaluation text).
    ``fields`` adds or replaces ``{arch}.*`` keys and ``extra_tensors`` adds F32 tensors (what
    other llama.cpp conversions store: RoPE factors, experts)."""
    import gguf

    config = model.config
    model_type = str(config.model_type)
    arch = GGUF_ARCH.get(model_type, model_type)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{model_type}")
    for key, value in {**metadata(config), **(fields or {})}.items():
        name = f"{arch}.{key}"
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
    if tokenizer_from is not None:
        _copy_tokenizer(writer, Path(tokenizer_from))
    else:
        _add_tokenizer(writer, int(config.vocab_size))
        writer.add_bos_token_id(int(config.bos_token_id))
        writer.add_eos_token_id(int(config.eos_token_id))
        if getattr(config, "pad_token_id", None) is not None:
            writer.add_pad_token_id(int(config.pad_token_id))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, weights in gguf_tensors(model):
        if name == "output.weight" and tied:
            continue  # a tied LM head: llama.cpp writes token_embd only
        values = _as_llama_cpp(arch, name, weights, config)
        short = name.split(".")[-2]
        kind = gguf.GGMLQuantizationType[(overrides or {}).get(short, qtype)]
        data, raw = encode(values, kind) if values.ndim >= 2 else (values, None)
        writer.add_tensor(name, data, raw_dtype=raw)
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate_weights(path: Path) -> Path:
    """Cut the GGUF file ``path`` inside its tensor data, its header intact: reading any
    weight (or mapping the tensors, as ``gguf.GGUFReader`` does) now fails."""
    import gguf

    size = path.stat().st_size
    data = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    with path.open("r+b") as handle:
        handle.truncate(size - data + 1)
    return path


def foreign(path: Path, arch: str) -> Path:
    """A GGUF file of an architecture MODELS has no model for (one embedding, no weights to
    read: its tensor data cut short)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return truncate_weights(path)


def metadata(config: Any) -> dict[str, Any]:
    """The ``{arch}.*`` keys llama.cpp's converter writes for ``config``: those transformers
    reads back (its GGUF key table read backwards) and the shape keys it drops but llama.cpp
    always writes (head and rotary widths, expert widths, RoPE base), so that a written file
    passes llmopt's header checks the way a real one does."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    model_type = str(config.model_type)
    arch = GGUF_ARCH.get(model_type, model_type)
    mapping = GGUF_CONFIG_MAPPING[model_type if model_type in GGUF_CONFIG_MAPPING else arch]
    keys: dict[str, Any] = {}
    for key, attribute in mapping.items():
        value = getattr(config, attribute, None) if attribute else None
        if value is not None and not isinstance(value, list | dict):
            keys[key] = value
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (int(config.hidden_size) // int(heads))
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    if rope.get("rope_theta") is not None:
        keys.setdefault("rope.freq_base", float(rope["rope_theta"]))
        keys.setdefault("rope.dimension_count",
                        int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    keys.setdefault("attention.key_length", int(head_dim))
    keys.setdefault("attention.value_length", int(head_dim))
    for key, attribute in (("expert_feed_forward_length", "moe_intermediate_size"),
                           ("expert_shared_feed_forward_length",
                            "shared_expert_intermediate_size")):
        if getattr(config, attribute, None):
            keys.setdefault(key, int(getattr(config, attribute)))
    return keys


def gguf_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """``model``'s weights under their GGUF names, as transformers' GGUF name map pairs them;
    MoE experts as llama.cpp stacks them ([experts, rows, cols] per gate, up and down: the
    gate and up halves of transformers 5's fused ``gate_up_proj`` apart, 4.x's modules one
    per expert stacked)."""
    import inspect

    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    arch = GGUF_ARCH.get(str(model.config.model_type), str(model.config.model_type))
    # transformers 5 passes its tensor processor; 4.57 takes the model alone
    if "processor" in inspect.signature(get_gguf_hf_weights_map).parameters:
        names = get_gguf_hf_weights_map(model, TENSOR_PROCESSORS.get(arch, TensorProcessor)())
    else:
        names = get_gguf_hf_weights_map(model)
    state = model.state_dict()
    tensors = []
    for key, hf_name in names.items():
        if hf_name in state:
            values = state[hf_name].detach().float().numpy()
        else:  # transformers 4.x: one module per expert, named without its index
            experts = int(model.config.num_experts)
            values = np.stack([state[hf_name.replace(".experts.", f".experts.{e}.")].detach()
                               .float().numpy() for e in range(experts)])
        if key.endswith(("_gate_exps", "_up_exps")):  # halves of one fused gate_up_proj
            half = values.shape[1] // 2
            values = values[:, :half] if key.endswith("_gate_exps") else values[:, half:]
        name = f"{key}.weight" if key.endswith("_exps") else key
        if name.endswith("ffn_gate_inp_shexp.weight"):
            values = values.reshape(-1)  # llama.cpp's shared-expert gate is a vector
        tensors.append((name, values))
    return tensors


def _add_tokenizer(writer: Any, vocab_size: int) -> None:
    """GPT-2-style byte-level BPE: ``<unk> <s> </s>``, space and newline (as GPT-2 spells
    them), ``th``, printable ASCII (as many as fit); unused ids padded."""
    ascii_ = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    tokens = ["<unk>", "<s>", "</s>", "\u0120", "\u010a", "th", *ascii_][:vocab_size]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab_size - 3))
    writer.add_token_merges(["t h"])  # one merge: transformers needs merges or scores
    writer.add_unk_token_id(0)


def _copy_tokenizer(writer: Any, source: Path) -> None:
    """The ``tokenizer.*`` fields of another GGUF file (a real model's vocabulary)."""
    import gguf

    for field in gguf.GGUFReader(source).fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def _as_llama_cpp(arch: str, name: str, values: np.ndarray, config: Any) -> np.ndarray:
    """What llama.cpp's converter does to a tensor, the inverse of transformers' GGUF
    ``TensorProcessor`` for ``arch``."""
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
        return permute(values, heads)
    if arch in ("gemma2", "gemma3", "nemotron") and name.endswith("norm.weight"):
        return values + 1
    if arch == "gpt2" and name.endswith(("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight",
                                         "attn_output.weight")):
        return values.T
    if arch == "bloom" and "attn_qkv" in name:  # per-head [q, k, v] -> all q, all k, all v
        heads = config.n_head
        return values.reshape(heads, 3, -1, *values.shape[1:]).swapaxes(0, 1).reshape(
            values.shape)
    return values


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama (its converter's ``permute``)."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def encode(values: np.ndarray, kind: Any) -> tuple[np.ndarray, Any]:
    """A [..., rows, cols] float tensor as (data, raw_dtype) for ``GGUFWriter.add_tensor``."""
    import gguf

    values = np.ascontiguousarray(values, dtype=np.float32)
    if kind == gguf.GGMLQuantizationType.F32:
        return values, None
    if kind == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16), None
    encoders = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
    if kind.name in encoders:  # row-wise: stacked experts as one tall matrix
        rows = encoders[kind.name](values.reshape(-1, values.shape[-1]))
        return rows.reshape(*values.shape[:-1], -1), kind
    return gguf.quants.quantize(values, kind), kind


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K blocks of a [rows, cols] matrix (cols a multiple of 256): per 32-weight sub-block
    ``w ~ d * sc * q - dmin * m`` with 6-bit ``sc``/``m`` and fp16 ``d``/``dmin`` per 256.
    Plain min/max ranges (llama.cpp also searches them; the layout is what matters here)."""
    head, q = _k_quant(values, 15)
    pairs = q.reshape(-1, 4, 2, 32)  # sub-blocks 2i (low nibbles) and 2i+1 (high nibbles)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)
    return np.concatenate([head, qs], axis=-1).reshape(values.shape[0], -1)


def quantize_q5_k(values: np.ndarray) -> np.ndarray:
    """Q5_K: Q4_K's layout with a fifth bit per weight (``qh``: bit j of byte l is weight l
    of sub-block j) between the scales and the low nibbles."""
    head, q = _k_quant(values, 31)
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)
    bits = (q >> 4).reshape(-1, 8, 32).astype(np.uint16) << np.arange(8, dtype=np.uint16)[:, None]
    qh = bits.sum(axis=1).astype(np.uint8)
    return np.concatenate([head, qh, qs], axis=-1).reshape(values.shape[0], -1)


def _k_quant(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared part of Q4_K/Q5_K: per super-block the 16-byte head (fp16 ``d``, ``dmin``,
    12 bytes of 6-bit scales and mins) and the codes [super-blocks, 8, 32] in 0..top."""
    cols = values.shape[1]
    if cols % QK_K:
        raise ValueError(f"K-quants need rows of whole {QK_K}-weight super-blocks, not {cols}")
    w = values.reshape(-1, 8, 32)  # [super-blocks, sub-blocks, weights]
    lo = np.minimum(w.min(axis=-1), 0.0)
    hi = np.maximum(w.max(axis=-1), 0.0)
    scale = (hi - lo) / top
    mins = -lo
    d = (scale.max(axis=-1) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)),
                 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(mins, dmin32, out=np.zeros_like(mins), where=dmin32 > 0)),
                0, 63).astype(np.uint8)
    step = (d32 * sc)[..., None]
    offset = (dmin32 * m)[..., None]
    q = np.clip(np.round(np.divide(w + offset, step, out=np.zeros_like(w), where=step > 0)),
                0, top).astype(np.uint8)
    scales = np.concatenate([
        (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
        (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
    ], axis=-1).astype(np.uint8)
    head = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                           scales], axis=-1)
    return head, q


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """Q6_K: per 16-weight sub-block ``w ~ d * sc * (q - 32)``, int8 ``sc``, fp16 ``d`` per
    256, 6-bit ``q``: low nibbles in ``ql`` (128 bytes), high 2 bits in ``qh`` (64 bytes),
    per half of 128 weights as gguf-py's ``Q6_K.dequantize_blocks`` reads them."""
    rows, cols = values.shape
    if cols % QK_K:
        raise ValueError(f"Q6_K needs rows of whole {QK_K}-weight super-blocks, not {cols}")
    w = values.reshape(-1, 16, 16)
    scale = np.abs(w).max(axis=-1) / 31.0
    d = (scale.max(axis=-1) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)),
                 -128, 127).astype(np.int8)
    step = (d32 * sc)[..., None]
    q = (np.clip(np.round(np.divide(w, step, out=np.zeros_like(w), where=step > 0)), -32, 31)
         + 32).astype(np.uint8).reshape(-1, 256)
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32).astype(np.uint16) << (2 * np.arange(
        4, dtype=np.uint16))[:, None]
    qh = high.sum(axis=2).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)],
                          axis=-1).astype(np.uint8).reshape(rows, -1)
