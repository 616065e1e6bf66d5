"""A GGUF file's header (its metadata and tensor table, never its tensor data) and the refusals
decided from it, before transformers parses the file or dequantizes a weight.

transformers' GGUF loader reads a fixed table of metadata keys per architecture
(``GGUF_CONFIG_MAPPING``) and fills every other config attribute with the config class's
default. Where llama.cpp stored something that table drops (a RoPE scaling, a rotary or head
width, expert widths, a layout variant), transformers builds a different model from the same
weights: it loads, runs, and computes something else, or fails after minutes of dequantizing.
:func:`check` compares what the header says with what transformers would build from it and
refuses each such file with an :class:`~llmopt.errors.UnsupportedError` naming the fix.

The header is parsed here rather than by ``gguf.GGUFReader``, which also maps every tensor and
turns each metadata array (a 49k-token vocabulary) into numpy views: seconds for a real model,
against milliseconds for the keys and the tensor table alone.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.errors import SourceError, UnsupportedError

# GGUF value types (gguf.GGUFValueType) -> struct format of one value
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
# the GGUF types llmopt exports from (transformers dequantizes them with gguf-py); int4 reuses
# the 4-bit ones' blocks exactly (llmopt.quantizer.gguf.REUSED)
GGUF_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "F16", "BF16",
              "F32")
_SMALL_ARRAY = 4096  # numeric arrays up to this long are kept (per-layer head counts)
# llama.cpp architecture -> transformers model_type, where they differ (transformers' loader
# renames these in load_gguf_checkpoint)
TRANSFORMERS_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text",
                      "gemma4": "gemma4_text", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
# architectures transformers reads from GGUF that llmopt's package contract has no place for
NOT_EXPORTABLE = {"t5": "an encoder-decoder", "t5encoder": "a T5 encoder",
                  "umt5": "an encoder-decoder"}
# the tensors llama.cpp stores a RoPE scaling in, which transformers' loader never maps
ROPE_TENSORS = {"rope_freqs.weight": "Llama 3.1-style RoPE frequency factors",
                "rope_factors_long.weight": "LongRoPE long factors",
                "rope_factors_short.weight": "LongRoPE short factors"}


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself: ``fields`` (metadata key -> value, arrays longer
    than a few thousand items left out) and ``tensors`` (name -> (GGML type id, shape))."""

    path: Path
    fields: dict[str, Any]
    tensors: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """The architecture's own key (``rope.freq_base`` -> ``llama.rope.freq_base``)."""
        return self.fields.get(f"{self.architecture}.{key}", default)


def read(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header of the GGUF file ``path``; a file cut short or not GGUF is a
    :class:`~llmopt.errors.SourceError`."""
    path = Path(path)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        try:
            return _parse(path, m)
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise SourceError(
                f"could not read GGUF file {path.name}: its header is unreadable ({exc})",
                fix="re-download the file; it is truncated or not a GGUF model",
            ) from None


def _parse(path: Path, m: mmap.mmap) -> GGUFHeader:
    if m[:4] != b"GGUF":
        raise ValueError("no GGUF magic bytes")
    order = "<" if struct.unpack_from("<I", m, 4)[0] & 0xFFFF else ">"  # big-endian files
    version, tensor_count, kv_count = struct.unpack_from(order + "IQQ", m, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} predates the 64-bit layout gguf-py reads")
    offset = 24
    fields: dict[str, Any] = {}

    def string(at: int) -> tuple[str, int]:
        (size,) = struct.unpack_from(order + "Q", m, at)
        end = at + 8 + size
        if end > len(m):
            raise ValueError("a string runs past the end of the file")
        return m[at + 8:end].decode("utf-8"), end

    def value(kind: int, at: int) -> tuple[Any, int]:
        if kind in _SCALARS:
            fmt = order + _SCALARS[kind]
            return struct.unpack_from(fmt, m, at)[0], at + struct.calcsize(fmt)
        if kind == _STRING:
            return string(at)
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = struct.unpack_from(order + "IQ", m, at)
        at += 12
        if item in _SCALARS:
            size = struct.calcsize(_SCALARS[item])
            items = (list(struct.unpack_from(f"{order}{count}{_SCALARS[item]}", m, at))
                     if count <= _SMALL_ARRAY else None)
            return items, at + size * count
        values = []
        for _ in range(count):  # strings (a vocabulary) or nested arrays: walk their lengths
            one, at = value(item, at)
            if count <= _SMALL_ARRAY:
                values.append(one)
        return (values if count <= _SMALL_ARRAY else None), at

    for _ in range(kv_count):
        key, offset = string(offset)
        (kind,) = struct.unpack_from(order + "I", m, offset)
        fields[key], offset = value(kind, offset + 4)
    tensors = {}
    for _ in range(tensor_count):
        name, offset = string(offset)
        (dims,) = struct.unpack_from(order + "I", m, offset)
        shape = struct.unpack_from(f"{order}{dims}Q", m, offset + 4)
        kind, _data_offset = struct.unpack_from(order + "IQ", m, offset + 4 + 8 * dims)
        offset += 4 + 8 * dims + 12
        tensors[name] = (int(kind), tuple(reversed(shape)))  # numpy order, as gguf-py gives
    return GGUFHeader(path, fields, tensors)


def check(header: GGUFHeader) -> None:
    """Refuse, from the header alone, a file transformers cannot read, would read as another
    model than the one stored, or llmopt cannot export."""
    arch = header.architecture
    model_type = _transformers_model_type(header)
    _check_exportable(header, arch, model_type)
    _check_tensor_types(header)
    _check_rope_scaling(header, arch, model_type)
    _check_layout(header, arch)
    _check_dropped_shapes(header, arch, model_type)


def _transformers_model_type(header: GGUFHeader) -> str:
    """The model_type transformers gives the file (load_gguf_checkpoint's renames)."""
    arch = header.architecture
    name = header.fields.get("general.name")
    if arch == "llama" and name == "mistral":  # transformers' exact-name test
        return "mistral"
    if arch in ("t5", "t5encoder") and isinstance(name, str) and "umt5" in name.lower():
        return "umt5"
    return TRANSFORMERS_NAMES.get(arch, arch)


def _config_mapping(arch: str, model_type: str) -> dict[str, str | None] | None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    table: dict[str, Any] = GGUF_CONFIG_MAPPING
    mapping: dict[str, str | None] | None = table.get(model_type, table.get(arch))
    return mapping


def _refuse(header: GGUFHeader, what: str, fix: str) -> UnsupportedError:
    import transformers

    return UnsupportedError(f"{header.path.name}: transformers {transformers.__version__}'s "
                            f"GGUF loader would build another model than the file holds: {what}",
                            fix=fix)


def _check_exportable(header: GGUFHeader, arch: str, model_type: str) -> None:
    import transformers

    from llmopt.exporter.traced import RECURRENT

    if _config_mapping(arch, model_type) is None:
        raise UnsupportedError(
            f"transformers {transformers.__version__} cannot read {arch!r} models from GGUF "
            f"files ({header.path.name})",
            fix="export the model's Hugging Face checkpoint (a directory or hub id) instead, "
            "or upgrade transformers if a newer one reads this architecture",
        )
    reason = NOT_EXPORTABLE.get(arch) or ("a recurrent model (its state is no KV cache)"
                                          if model_type in RECURRENT else None)
    if reason:
        raise UnsupportedError(
            f"{header.path.name} holds {reason} ({arch!r}), which llmopt does not export",
            fix="export a decoder-only or encoder model; see the README's Supported models",
        )


def _check_tensor_types(header: GGUFHeader) -> None:
    """A tensor type gguf-py cannot dequantize (transformers loads GGUF weights through it)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize


    kinds: dict[int, list[str]] = {}
    for name, (kind, _) in header.tensors.items():
        kinds.setdefault(kind, []).append(name)
    refused = []
    for kind_id, names in kinds.items():
        label = f"type {kind_id}"
        try:
            kind = GGMLQuantizationType(kind_id)
            label = kind.name
            dequantize(np.zeros(GGML_QUANT_SIZES[kind][1], np.uint8), kind)  # one zero block
        except (NotImplementedError, ValueError, KeyError):
            refused.append(f"{label} ({len(names)} tensors, e.g. {names[0]})")
    if refused:
        from importlib.metadata import version

        raise UnsupportedError(
            f"{header.path.name} holds GGUF tensor types that gguf {version('gguf')} cannot "
            f"dequantize for transformers: {', '.join(refused)}",
            fix="upgrade gguf (pip install -U gguf), or use a file of this model in a type it "
            f"reads ({', '.join(GGUF_TYPES)})",
        )


def _check_rope_scaling(header: GGUFHeader, arch: str, model_type: str) -> None:
    """transformers rebuilds a RoPE scaling from GGUF for gpt-oss only; every other file with
    one loads with plain RoPE, wrong from the first position the scaling changes."""
    if model_type == "gpt_oss":
        return
    kind = header.get("rope.scaling.type")
    factor = header.get("rope.scaling.factor")
    scaled = (kind not in (None, "", "none")) or (factor not in (None, 0.0, 1.0))
    stored = [f"{label} ({name})" for name, label in ROPE_TENSORS.items()
              if name in header.tensors]
    if scaled or stored:
        what = (f"{kind or 'a'} RoPE scaling (factor {factor})" if scaled else
                ", ".join(stored))
        raise _refuse(header, f"{what} is dropped: the model would run with plain RoPE",
                      fix="export the model's Hugging Face checkpoint (its config keeps the "
                      "RoPE scaling) instead of the GGUF file")


def _check_layout(header: GGUFHeader, arch: str) -> None:
    """Layout variants transformers' config for the architecture cannot express."""
    names = header.tensors
    if arch == "llama" and (header.get("expert_count") or any(
            "_exps." in n or "ffn_gate_inp" in n for n in names)):
        raise _refuse(header, "a mixture-of-experts model stored as 'llama' (Mixtral-style) "
                      "would load as a dense Llama without its experts",
                      fix="export the model's Hugging Face checkpoint (MixtralForCausalLM) "
                      "instead of the GGUF file")
    if arch == "falcon" and ((header.get("attention.head_count_kv") or 1) > 1 or any(
            ".attn_norm_2." in n for n in names)):
        raise _refuse(header, "a new-architecture Falcon (grouped KV heads, two layer norms: "
                      "Falcon-40B/180B) would load as the original layout, its fused QKV "
                      "rows in the wrong order", fix="export the model's Hugging Face "
                      "checkpoint instead of the GGUF file")
    if arch == "stablelm" and any(".attn_q_norm." in n for n in names):
        raise _refuse(header, "StableLM's per-head q/k norms (qk_layernorm) are dropped",
                      fix="export the model's Hugging Face checkpoint instead of the GGUF file")


def _check_dropped_shapes(header: GGUFHeader, arch: str, model_type: str) -> None:
    """Each width or constant the header states against what transformers' config would hold
    (read from the keys transformers maps, the rest the config class's defaults)."""
    config = _transformers_config(header, arch, model_type)
    if config is None:
        return
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    rope = _rope_parameters(config)
    stated = {
        "head width (attention.key_length)": (header.get("attention.key_length"), head_dim),
        "rotary width (rope.dimension_count, a partial rotary)": (
            header.get("rope.dimension_count"),
            int(head_dim * rope.get("partial_rotary_factor", 1.0)) if head_dim else None),
        "RoPE base (rope.freq_base)": (header.get("rope.freq_base"), rope.get("rope_theta")),
        "expert width (expert_feed_forward_length)": (
            header.get("expert_feed_forward_length"),
            getattr(config, "moe_intermediate_size", None)),
        "shared expert width (expert_shared_feed_forward_length)": (
            header.get("expert_shared_feed_forward_length"),
            getattr(config, "shared_expert_intermediate_size", None)),
        "attention soft-capping (attn_logit_softcapping)": (
            header.get("attn_logit_softcapping"),
            getattr(config, "attn_logit_softcapping", None)),
        "final soft-capping (final_logit_softcapping)": (
            header.get("final_logit_softcapping"),
            getattr(config, "final_logit_softcapping", None)),
        "learned positions (context_length)": (
            header.get("context_length") if hasattr(config, "n_positions") else None,
            getattr(config, "n_positions", None)),
    }
    wrong = [f"{what}: the file says {file}, transformers would use {built}"
             for what, (file, built) in stated.items()
             if file is not None and built is not None and not _same(file, built)]
    if model_type == "qwen3_moe" and getattr(config, "norm_topk_prob", True) is False:
        wrong.append("llama.cpp renormalizes a qwen3moe token's top-k expert weights, "
                     "transformers would not (norm_topk_prob=False)")
    experts = header.get("expert_count")
    if model_type == "qwen2_moe" and experts not in (None, 60) and _transformers_major() < 5:
        wrong.append(f"transformers 4.x splits a qwen2moe file's stacked experts as 60 experts "
                     f"whatever expert_count says ({experts}; transformers >= 5 reads it)")
    if wrong:
        raise _refuse(header, "; ".join(wrong), fix="export the model's Hugging Face "
                      "checkpoint (its config.json states these) instead of the GGUF file")


def _transformers_config(header: GGUFHeader, arch: str, model_type: str) -> Any:
    """The config transformers builds for the file: its mapped keys (the tokenizer's ids
    included), the rest the config class's defaults."""
    from transformers import CONFIG_MAPPING
    from transformers.integrations import ggml
    from transformers.utils import logging

    if model_type not in CONFIG_MAPPING:
        return None
    defaults = getattr(ggml, "GGUF_CONFIG_DEFAULTS_MAPPING", {})  # transformers 5 only
    kwargs: dict[str, Any] = dict(defaults.get(model_type, {}))
    every: dict[str, Any] = ggml.GGUF_CONFIG_MAPPING
    tables: list[tuple[str, dict[str, Any]]] = [
        (f"{arch}.", _config_mapping(arch, model_type) or {}),
        ("tokenizer.", every.get("tokenizer", {}))]
    for prefix, mapping in tables:
        for key, attribute in mapping.items():
            value = header.fields.get(prefix + key)
            if attribute and value is not None and not isinstance(value, list):
                kwargs[attribute] = value
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a default config's warnings are not the user's business
    try:
        return CONFIG_MAPPING[model_type](**kwargs)
    except Exception:  # noqa: BLE001  (transformers' own load reports what it cannot build)
        return None
    finally:
        logging.set_verbosity(verbosity)


def _rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE base and rotary fraction of the global layers (transformers 5 ``rope_parameters``,
    per layer type for Gemma 3; 4.x attributes)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope = dict(rope.get("full_attention", rope))
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None))
    fraction = getattr(config, "partial_rotary_factor", None)
    if fraction is not None:
        rope.setdefault("partial_rotary_factor", fraction)
    return rope


def _same(file: Any, built: Any) -> bool:
    try:
        return abs(float(file) - float(built)) <= 1e-6 * max(1.0, abs(float(built)))
    except (TypeError, ValueError):
        return bool(file == built)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".", 1)[0])
