"""The traced builder: the PyTorch module itself traced to ONNX, for any architecture
transformers can run that has no native builder.

It produces the package contract the native builders produce, so the Generator, the engine, the
server and the bench run it unchanged, and it is validated the same way:

- decoders: ``input_ids``, ``attention_mask``, ``position_ids``, ``logits_to_keep`` and
  ``past_key_values.{i}.key|value [B,kvH,P,D]`` -> ``logits`` and ``present.{i}.key|value``,
  one graph for prefill and decode (dynamic batch, sequence and past);
- encoders: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model has token
  types) -> ``last_hidden_state`` (feature extraction) or ``logits`` (classification).

The tracer is TorchScript's (``torch.onnx.export(dynamo=False)``): it takes seconds, needs no
extra package and follows transformers' mask and cache code as traced shape arithmetic. A
module around the model turns flat cache tensors into a ``DynamicCache`` (full layers, so a
sliding-window model keeps every position, as native graphs do, and masks the rest) and back.
Attention traces as one fused node per layer (:mod:`llmopt.exporter.traced_attention`) and the
shape arithmetic left static by the config is folded (:mod:`llmopt.exporter.traced_shapes`).
Under transformers 4.x the masks and the mixture-of-experts loops are made traceable for the
duration of the trace (:mod:`llmopt.exporter.traced_compat`).
Whether a model can be traced is decided from its config, before any weight is loaded
(:func:`check_config`); whether the trace computes what the model computes is decided by
validation, as for every export.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import UnsupportedError
from llmopt.exporter.pooling import pooling
from llmopt.exporter.traced_compat import check_experts, tracing_compat
from llmopt.package import Package

log = logging.getLogger("llmopt.exporter")
OPSET = 18
DECODER_TASKS = ("text-generation",)
ENCODER_TASKS = ("feature-extraction", "text-classification")
# model types whose layers keep a recurrent or convolution state instead of (or beside) a KV
# cache: the package's cache contract has no place for it
RECURRENT = ("mamba", "mamba2", "rwkv", "jamba", "falcon_mamba", "falcon_h1", "zamba", "zamba2",
             "recurrent_gemma", "xlstm", "bamba", "granitemoehybrid", "lfm2", "lfm2_moe",
             "qwen3_next", "nemotron_h", "minimax", "plamo2", "olmo3_hybrid")
DYNAMIC_ROPE = ("dynamic", "longrope", "su")
NATIVE_DYNAMIC_ROPE = ("dynamic",)  # the native builder emits LongRoPE's two tables
MIN_TRANSFORMERS = "4.57"
# the example shapes the trace runs on: neither 0 nor 1, so no dimension is taken for constant
_BATCH, _SEQUENCE, _PAST = 2, 3, 4


@dataclass(frozen=True)
class TracedArch:
    """The traced builder for one transformers ``model_type``, with the registry's interface."""

    name: str
    kind: str  # "decoder" | "encoder"
    tolerance: float = 1e-3
    min_transformers: str = MIN_TRANSFORMERS
    builder: str = "traced"
    notes: str = "traced from the PyTorch module (torch.onnx TorchScript export)"

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def tasks(self) -> tuple[str, ...]:
        return DECODER_TASKS if self.kind == "decoder" else ENCODER_TASKS

    def emit(self, model: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
        if np.dtype(dtype) != np.float32:
            raise UnsupportedError(
                "the traced builder exports float32 only",
                fix="export in float32, then `llmopt optimize --level 3` for float16",
            )
        if self.kind == "decoder":
            return _emit_decoder(model)
        return _emit_encoder(model)

    def reemit(self, package: Package, tensors: Any, fusions: frozenset[str], dtype: str,
               gqa: bool | None = None) -> tuple[Any, dict[str, str]]:
        """A traced graph has no normalized weights to emit again from: ``optimize`` hands it
        to ONNX Runtime's fusions instead."""
        raise UnsupportedError(
            f"{package.path} was made by the traced builder, whose graph cannot be re-emitted",
            fix="optimize it at level 2 (float32; ONNX Runtime fuses it), or export with "
            "--builder native where the architecture has one",
        )

    def validate(self, model: Any, session: Any, layout: dict[str, Any], tokenizer: Any,
                 tolerance: float, generation_tokens: int) -> dict[str, Any]:
        from llmopt.exporter.validate import TorchReference, validate_decoder, validate_encoder

        if self.kind == "decoder":
            return validate_decoder(TorchReference(model), session, layout, tokenizer, tolerance,
                                    generation_tokens)
        return validate_encoder(model, session, layout, tokenizer, tolerance, generation_tokens)


def kind_for_task(task: str) -> str:
    return "decoder" if task in DECODER_TASKS else "encoder"


def check_config(config: Any, task: str) -> None:
    """Refuse, from the config alone, what the traced builder cannot export; the error names the
    fix. Nothing here loads a weight."""
    model_type = str(config.model_type)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedError(
            f"{model_type} is an encoder-decoder model; llmopt exports decoder-only and "
            "encoder-only models",
            fix="export a decoder-only or encoder model; encoder-decoder (seq2seq) export is "
            "not implemented yet",
        )
    layer_types = {str(t) for t in getattr(config, "layer_types", None) or ()}
    recurrent = layer_types - {"full_attention", "sliding_attention", "chunked_attention",
                               "attention", "global", "local"}
    if model_type in RECURRENT or recurrent:
        raise UnsupportedError(
            f"{model_type} keeps a recurrent state beside (or instead of) a KV cache, which the "
            "package's cache contract cannot hold",
            fix="export an attention-only model",
        )
    mapping = _auto_mapping(task)
    if model_type not in mapping:
        what = {"text-generation": "a causal language model",
                "feature-extraction": "a base model",
                "text-classification": "a sequence classifier"}[task]
        raise UnsupportedError(
            f"transformers has no {what} class for model type {model_type!r} (task {task})",
            fix="pass another --task, or export a model transformers can run for this task",
        )
    check_rope(config)
    check_experts(config)


def check_rope(config: Any, native: bool = False) -> None:
    """Refuse RoPE scalings that change with sequence length: the trace fixes one choice. The
    native builder emits LongRoPE's two tables and chooses per call; neither exports dynamic."""
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    rope_type = str(rope.get("rope_type", rope.get("type", "default"))) \
        if isinstance(rope, dict) else "default"
    if rope_type in (NATIVE_DYNAMIC_ROPE if native else DYNAMIC_ROPE):
        how = "is not exported yet" if native else "cannot be traced into one graph"
        raise UnsupportedError(
            f"RoPE scaling {rope_type!r} changes with sequence length and {how}",
            fix=("export with --builder native (its LongRoPE families: phi3), or a variant with "
                 "static RoPE" if rope_type != "dynamic" else
                 "export a variant with static RoPE (e.g. the 4k-context model)"),
        )


def default_task(model_type: str) -> str | None:
    """The task transformers' auto classes suggest for a model type, or None."""
    if model_type in _auto_mapping("text-generation"):
        return "text-generation"
    if model_type in _auto_mapping("feature-extraction"):
        return "feature-extraction"
    return None


def _auto_mapping(task: str) -> Any:
    from transformers.models.auto import modeling_auto as auto

    return {
        "text-generation": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "feature-extraction": auto.MODEL_MAPPING_NAMES,
        "text-classification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }[task]


def prepare(model: Any) -> None:
    """Put ``model`` in the form the trace follows: mixture-of-experts layers compute the chosen
    experts by gathering their weights (transformers' ``batched_mm``), not by a Python loop
    over the experts the example tokens happened to pick."""
    config = model.config
    if hasattr(config, "_experts_implementation") and _has_experts(config):
        config._experts_implementation = "batched_mm"


def _has_experts(config: Any) -> bool:
    return any(getattr(config, name, None) for name in (
        "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))


# ---------------------------------------------------------------------------------------------
# decoders


def _cache_tensors(cache: Any) -> list[Any]:
    """Keys and values of a transformers cache, layer by layer, across cache API versions."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):
        return [t for pair in zip(cache.key_cache, cache.value_cache, strict=True) for t in pair]
    return [t for pair in cache for t in pair]


def _make_cache(past: tuple[Any, ...]) -> Any:
    from transformers import DynamicCache

    # no config: every layer a full one, even a sliding-window model's (its mask does the rest)
    return DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])


def _decoder_module(model: Any) -> Any:
    import torch

    takes = set(inspect.signature(model.forward).parameters)
    cache_name = "cache" if "cache" in takes else "past_key_values"  # transformers >= 5.2

    class Decoder(torch.nn.Module):
        """Flat tensors in and out around the transformers model."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                    logits_to_keep: Any, *past: Any) -> tuple[Any, ...]:
            seq = input_ids.shape[1]
            # logits of the last K positions, K = 0 for all (transformers' meaning)
            start = torch.where(logits_to_keep > 0, seq - logits_to_keep,
                                torch.zeros_like(logits_to_keep))
            keep = torch.arange(0, seq, dtype=torch.long)
            keep = keep[keep >= start]
            kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                      cache_name: _make_cache(past), "use_cache": True}
            if "position_ids" in takes:
                kwargs["position_ids"] = position_ids
            if "logits_to_keep" in takes:
                kwargs["logits_to_keep"] = keep
            out = self.model(**kwargs)
            logits = out.logits if "logits_to_keep" in takes else out.logits[:, keep]
            return (logits.float(), *_cache_tensors(out.past_key_values))

    return Decoder()


def probe_cache(model: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's cache, read from a real forward pass, so
    families that name these differently in their configs need no special case."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2,
                                                                                  dtype=torch.long),
                    use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise UnsupportedError(
            f"{model.config.model_type} returned no KV cache, so it is not exported as a "
            "decoder",
            fix="pass --task feature-extraction (or text-classification) for an encoder",
        )
    tensors = _cache_tensors(cache)
    if not tensors or any(t is None or t.dim() != 4 for t in tensors):
        raise UnsupportedError(
            f"{model.config.model_type}'s cache is not one [batch, heads, sequence, head_dim] "
            "key and value tensor per layer",
            fix="export an attention-only decoder",
        )
    shape = tensors[0].shape
    if any(t.shape[1:] != shape[1:] or t.shape[2] != 2 for t in tensors):
        raise UnsupportedError(
            f"{model.config.model_type}'s layers keep caches of different shapes",
            fix="export a model whose layers all cache the same key/value shape",
        )
    return len(tensors) // 2, int(shape[1]), int(shape[3])


def _emit_decoder(model: Any) -> tuple[Any, dict[str, Any]]:
    import torch

    from llmopt.exporter.traced_attention import fused_attention_for
    from llmopt.exporter.traced_shapes import fold_shapes

    prepare(model)
    layers, kv_heads, head_dim = probe_cache(model)
    names = ["input_ids", "attention_mask", "position_ids", "logits_to_keep"]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(3, vocab, (_BATCH, _SEQUENCE), generator=generator)
    mask = torch.ones(_BATCH, _PAST + _SEQUENCE, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row, so the mask is not all ones
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -_SEQUENCE:]
    past = [torch.randn(_BATCH, kv_heads, _PAST, head_dim, generator=generator)
            for _ in past_names]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "logits_sequence"},
        **{name: {0: "batch", 2: "past_sequence"} for name in past_names},
        **{name: {0: "batch", 2: "total_sequence"} for name in present_names},
    }
    module, example = _decoder_module(model), (ids, mask, positions, torch.tensor(0), *past)
    with torch.no_grad():
        vocab_out = int(module.eval()(*example)[0].shape[-1])
    with fused_attention_for(model), tracing_compat(model):
        proto = _trace(module, example, [*names, *past_names], ["logits", *present_names], axes)
    _declare_outputs(proto, {"logits": ["batch", "logits_sequence", vocab_out],
                             **{name: ["batch", kv_heads, "total_sequence", head_dim]
                                for name in present_names}})
    fold_shapes(proto)
    _keep_inputs(proto, {"position_ids": (7, ["batch", "sequence"]),
                         "logits_to_keep": (7, [])})
    _order_inputs(proto, [*names[:3], *past_names, "logits_to_keep"])  # the native order
    layout = {
        "num_layers": layers,
        "num_attention_heads": int(getattr(model.config, "num_attention_heads", kv_heads)
                                   or kv_heads),
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "layout": "batch, kv_heads, sequence, head_dim",
        "past_key": "past_key_values.{i}.key",
        "past_value": "past_key_values.{i}.value",
        "present_key": "present.{i}.key",
        "present_value": "present.{i}.value",
        "max_positions": _max_positions(model.config),
        "sliding_window": getattr(model.config, "sliding_window", None) or None,
        "rope_attention_scaling": 1.0,
    }
    return proto, layout


def _max_positions(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 2048


# ---------------------------------------------------------------------------------------------
# encoders


def _emit_encoder(model: Any) -> tuple[Any, dict[str, Any]]:
    import torch

    config = model.config
    takes = set(inspect.signature(model.forward).parameters)
    type_vocab = int(getattr(config, "type_vocab_size", 0) or 0)
    types = "token_type_ids" in takes and type_vocab > 1
    classifier = model.base_model is not model
    output = "logits" if classifier else "last_hidden_state"
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            out = self.model(**dict(zip(inputs, tensors, strict=True)))
            return (out.logits if classifier else out.last_hidden_state).float()

    generator = torch.Generator().manual_seed(0)
    pad = int(getattr(config, "pad_token_id", None) or 0)
    ids = torch.randint(3, int(config.vocab_size), (_BATCH, 5), generator=generator)
    mask = torch.ones(_BATCH, 5, dtype=torch.long)
    mask[1, 3:] = 0
    ids[1, 3:] = pad
    example = [ids, mask] + ([torch.zeros_like(ids)] if types else [])
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes[output] = {0: "batch"} if classifier else {0: "batch", 1: "sequence"}
    with tracing_compat(model):
        proto = _trace(Encoder(), tuple(example), inputs, [output], axes)
    layout = {
        "inputs": inputs,
        "output": output,
        "padding_side": "right",
        "pad_token_id": pad,
        "hidden_size": int(config.hidden_size),
        "num_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "num_attention_heads": int(getattr(config, "num_attention_heads", 0) or 0),
        "max_positions": _max_positions(config),
        "num_labels": int(config.num_labels) if classifier else None,
        "dtype": "float32",
        **pooling(model, classifier=classifier),
    }
    return proto, layout


# ---------------------------------------------------------------------------------------------


def _trace(module: Any, args: tuple[Any, ...], input_names: list[str], output_names: list[str],
           axes: dict[str, dict[int, str]]) -> Any:
    """``module`` traced by TorchScript into an ONNX model proto (weights included)."""
    import onnx
    import torch

    # torch.onnx.export restores the wrapper's training mode when it is done, and a new
    # wrapper is in training mode: that would leave the model's dropout on for validation
    module.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings: validation is the real check
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(module, args, str(path), input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        except Exception as exc:  # noqa: BLE001  (torch.onnx raises many unrelated types)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UnsupportedError(
                f"tracing the PyTorch model to ONNX failed: {type(exc).__name__}: {first[:300]}",
                fix="report the model; a native builder may support it",
            ) from None
        proto = onnx.load(str(path))
    _name_weights(proto)
    return proto


def _name_weights(proto: Any) -> None:
    """Name each MatMul weight after the module it belongs to (``model.layers.0.mlp.up_proj.
    weight``, ``lm_head.weight``): constant folding leaves transposed weights as ``onnx::MatMul_N``,
    and later stages (the quantizer's LM-head choice, ``keep_float``) find weights by name."""
    initializers = {t.name: t for t in proto.graph.initializer}
    renamed: dict[str, str] = {}
    taken = set(initializers)
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        old = node.input[1]
        if old not in initializers or old in renamed or not old.startswith("onnx::"):
            continue
        scope = node.name.strip("/").split("/")[1:-1]  # drop the wrapper's "model" and the op
        new = ".".join([*scope, "weight"]) if scope else old
        if new in taken:
            continue
        renamed[old] = new
        taken.add(new)
        initializers[old].name = new
    if renamed:
        for node in proto.graph.node:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]


def _keep_inputs(proto: Any, wanted: dict[str, tuple[int, list[Any]]]) -> None:
    """Declare contract inputs the trace dropped because the model ignores them (BLOOM has no
    position ids): callers feed every input of the contract."""
    from onnx import helper

    present = {i.name for i in proto.graph.input}
    for name, (elem, shape) in wanted.items():
        if name not in present:
            proto.graph.input.append(helper.make_tensor_value_info(name, elem, shape))


def _declare_outputs(proto: Any, shapes: dict[str, list[Any]]) -> None:
    """Write the contract's output shapes into the graph: shape inference does not see through
    the fused attention node, and the runtime reads the vocabulary from ``logits``."""
    for output in proto.graph.output:
        if output.name not in shapes:
            continue
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for value in shapes[output.name]:
            dim = dims.add()
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = int(value)


def _order_inputs(proto: Any, order: list[str]) -> None:
    inputs = {i.name: i for i in proto.graph.input}
    ordered = [inputs[name] for name in order if name in inputs]
    rest = [i for i in proto.graph.input if i.name not in order]
    del proto.graph.input[:]
    proto.graph.input.extend([*ordered, *rest])
