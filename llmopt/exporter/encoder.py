"""Bidirectional encoders (BERT and its descendants) as one ONNX graph.

Inputs ``input_ids [B,S]``, ``attention_mask [B,S]`` and, where the model has more than one
token type, ``token_type_ids [B,S]``; the output is ``last_hidden_state [B,S,H]`` for
feature extraction or ``logits [B,num_labels]`` for text classification, always float32.
Sequences are right-padded (the encoder convention); padded keys are masked out.

As for decoders, the graph is emitted from the weights by a small architecture description
rather than traced, and validated against PyTorch. How the source model pools token states
into a sentence embedding (sentence-transformers' ``modules.json``) goes into the manifest
layout, so a runtime can reproduce it without the graph hard-coding one choice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from llmopt.errors import UnsupportedError
from llmopt.exporter.ops import Linear
from llmopt.exporter.ops import activation as _activation
from llmopt.exporter.ops import concat_linear as _concat
from llmopt.exporter.ops import state_linear as _linear
from llmopt.exporter.ops import to_numpy as _array
from llmopt.exporter.graph import GraphBuilder

TASKS = ("feature-extraction", "text-classification")
F32 = np.float32
I64 = np.int64
MASK_MIN = float(np.finfo(np.float32).min)
POOLING_MODES = {  # sentence-transformers Pooling config key -> llmopt pooling name
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weighted_mean",
    "pooling_mode_lasttoken": "last",
}


@dataclass(frozen=True)
class EncoderNames:
    """Where each weight lives in the base model's state dict. ``{i}`` is the layer index.

    Every layer is post-norm: ``x = norm(x + attn(x))``, then ``x = norm(x + mlp(x))``.
    """

    word_embed: str
    position_embed: str
    embed_norm: str
    layer: str
    q: str
    k: str
    v: str
    o: str
    attn_norm: str
    fc_in: str
    fc_out: str
    mlp_norm: str
    token_type_embed: str | None = None


@dataclass(frozen=True)
class ClassifierHead:
    """A sequence-classification head on the first token: ``out(activation(dense(x[:, 0])))``.

    Names are keys of the full model's state dict; ``{body}`` stands for the base model's
    prefix (``bert.``), since some heads (BERT's pooler) live inside the base model.
    """

    dense: str
    out: str
    activation: str  # "tanh" | "relu"


@dataclass(frozen=True)
class EncoderArch:
    """An encoder architecture: its weight names, positions, token types and head."""

    name: str
    model_types: tuple[str, ...]
    names: EncoderNames
    head: ClassifierHead
    positions: str = "absolute"  # "absolute" (0..S-1) | "padded" (RoBERTa: pad + cumsum)
    token_types: str = "input"  # "input" where the type vocab > 1 | "folded" (always type 0)
    eps_attr: str | None = "layer_norm_eps"
    default_eps: float = 1e-12
    act_attr: str = "hidden_act"
    tolerance: float = 1e-4
    min_transformers: str = "4.57"
    tasks: tuple[str, ...] = TASKS
    notes: str = ""
    extra_checks: tuple[Callable[[Any], None], ...] = field(default=())
    kind: str = "encoder"

    def emit(self, model: Any, dtype: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
        return emit(self, model, dtype)

    def validate(self, model: Any, session: Any, layout: dict[str, Any], tokenizer: Any,
                 tolerance: float, generation_tokens: int) -> dict[str, Any]:
        from llmopt.exporter.validate import validate_encoder

        return validate_encoder(model, session, layout, tokenizer, tolerance, generation_tokens)


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


def read_dims(arch: EncoderArch, config: Any, state: Mapping[str, Any]) -> EncoderDims:
    for check in arch.extra_checks:
        check(config)
    if getattr(config, "is_decoder", False):
        raise UnsupportedError(
            f"this {config.model_type} is configured as a causal decoder (is_decoder=True)",
            fix="export it as an encoder with is_decoder=False, or use a decoder architecture",
        )
    position_type = getattr(config, "position_embedding_type", None) or "absolute"
    if position_type != "absolute":
        raise UnsupportedError(
            f"position_embedding_type {position_type!r} is not supported (only 'absolute')",
            fix="export a model with absolute position embeddings",
        )
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    if hidden % heads:
        raise UnsupportedError(f"hidden size {hidden} is not a multiple of {heads} heads")
    type_names = arch.names.token_type_embed
    type_vocab = 0 if type_names is None else state[f"{type_names}.weight"].shape[0]
    pad = getattr(config, "pad_token_id", None)
    return EncoderDims(
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        head_dim=hidden // heads,
        hidden=hidden,
        eps=float(getattr(config, arch.eps_attr) if arch.eps_attr else arch.default_eps),
        activation=str(getattr(config, arch.act_attr)),
        max_positions=int(config.max_position_embeddings),
        pad_token_id=int(pad) if pad is not None else 0,
        type_input=arch.token_types == "input" and type_vocab > 1,
    )


def max_sequence_length(arch: EncoderArch, dims: EncoderDims) -> int:
    """Longest input: RoBERTa-style positions start after the padding index."""
    if arch.positions == "padded":
        return dims.max_positions - dims.pad_token_id - 1
    return dims.max_positions


# ---------------------------------------------------------------------------------------------
# graph


def build_encoder(
    arch: EncoderArch,
    dims: EncoderDims,
    state: Mapping[str, Any],
    head: list[tuple[str, Linear]] | None,
    dtype: Any = F32,
) -> onnx.ModelProto:
    """Emit the encoder graph for ``state`` (the base model's state dict), with ``head``
    (``[(name, dense), (name, out)]``) as a classification head on the first token, or without
    one for feature extraction."""
    names = arch.names
    dt = np.dtype(dtype)
    d = dims
    b = GraphBuilder()
    input_ids = b.input("input_ids", I64, ["batch", "sequence"])
    attention_mask = b.input("attention_mask", I64, ["batch", "sequence"])
    token_type_ids = b.input("token_type_ids", I64, ["batch", "sequence"]) if d.type_input else None
    if head is None:
        output = "last_hidden_state"
        b.output(output, F32, ["batch", "sequence", d.hidden])
    else:
        output = "logits"
        b.output(output, F32, ["batch", head[1][1].weight.shape[1]])

    def tensor(key: str) -> np.ndarray:
        return _array(state[key]).astype(dt)

    def linear(x: str, lin: Linear, name: str, scope: str) -> str:
        with b.scope(scope):
            y = b.op("MatMul", x, b.weight(f"{name}.weight", lin.weight.astype(dt)))
            if lin.bias is not None:
                y = b.op("Add", y, b.weight(f"{name}.bias", lin.bias.astype(dt)))
        return y

    def norm(x: str, prefix: str, scope: str) -> str:
        weight = b.weight(f"{prefix}.weight", tensor(f"{prefix}.weight"))
        bias = b.weight(f"{prefix}.bias", tensor(f"{prefix}.bias"))
        with b.scope(scope):
            return b.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=d.eps)

    with b.scope("encoder"):
        with b.scope("embed"):
            x = _embeddings(b, arch, d, state, input_ids=input_ids,
                            token_type_ids=token_type_ids, dt=dt)
        x = norm(x, names.embed_norm, "embed_norm")
        with b.scope("attn_mask"):
            bias = _attention_bias(b, attention_mask)
        for i in range(d.num_layers):
            prefix = names.layer.format(i=i)
            with b.scope(f"layers.{i}"):
                with b.scope("attn"):
                    qkv = _qkv_weights(state, prefix, names, d.head_dim)
                    qkv_out = linear(x, qkv, prefix + "attention.qkv", "qkv")
                    attn = _attention(b, qkv_out, bias, d, dt)
                    attn = linear(attn, _linear(state, prefix + names.o, False),
                                  prefix + names.o, "o")
                x = norm(b.op("Add", x, attn, name="attn_residual"), prefix + names.attn_norm,
                         "attn_norm")
                with b.scope("mlp"):
                    fc_in, fc_out = prefix + names.fc_in, prefix + names.fc_out
                    y = linear(x, _linear(state, fc_in, False), fc_in, "fc_in")
                    y = _activation(b, y, d.activation, dt)
                    y = linear(y, _linear(state, fc_out, False), fc_out, "fc_out")
                x = norm(b.op("Add", x, y, name="mlp_residual"), prefix + names.mlp_norm,
                         "mlp_norm")

    if head is not None:
        with b.scope("classifier"):
            first = b.op("Gather", x, b.const(0), axis=1)  # [B,H]: the [CLS] / <s> token
            y = linear(first, head[0][1], head[0][0], "dense")
            y = b.op("Tanh" if arch.head.activation == "tanh" else "Relu", y)
            x = linear(y, head[1][1], head[1][0], "out")
    if dt != np.dtype(F32):
        b.op("Cast", x, to=onnx.TensorProto.FLOAT, output_names=[output], name="output")
    else:
        b.op("Identity", x, output_names=[output], name="output")
    return b.build("llmopt_encoder")


def _embeddings(b: GraphBuilder, arch: EncoderArch, d: EncoderDims, state: Mapping[str, Any], *,
                input_ids: str, token_type_ids: str | None, dt: np.dtype) -> str:
    r"""Word + position (+ token type) embeddings, before the embedding LayerNorm.

    ::

        input_ids ─Gather(word)──────────────────────────────┐
        absolute: Shape[1] ─Slice(position table)[S,H] ──────Add─┐
        padded:   input_ids ≠ pad ─CumSum·mask + pad ─Gather ┘   │
        token_type_ids ─Gather(token types) ─────────────────────Add ─▶ x

    A model whose token types are never fed (RoBERTa: a single type) has type 0's row folded
    into the position table, so it costs nothing at run time.
    """
    n = arch.names
    x = b.op("Gather", b.weight(f"{n.word_embed}.weight", _array(state[f"{n.word_embed}.weight"])
                                .astype(dt)), input_ids)
    table = _array(state[f"{n.position_embed}.weight"])
    table_name = f"{n.position_embed}.weight"
    types = _array(state[f"{n.token_type_embed}.weight"]) if n.token_type_embed else None
    if types is not None and not d.type_input:
        table = table + types[0]
        table_name += "+token_type_0"
    table_ = b.weight(table_name, table.astype(dt))
    if arch.positions == "padded":
        with b.scope("position_ids"):
            pad = b.const(d.pad_token_id)
            not_pad = b.op("Cast", b.op("Not", b.op("Equal", input_ids, pad)),
                           to=onnx.TensorProto.INT64)
            positions = b.op("Add", b.op("Mul", b.op("CumSum", not_pad, b.const(1)), not_pad),
                             pad)
        positions_ = b.op("Gather", table_, positions)
    else:
        seq = b.op("Shape", input_ids, start=1, end=2)
        positions_ = b.op("Slice", table_, b.const([0]), seq, b.const([0]))  # [S,H]
    x = b.op("Add", x, positions_)
    if types is not None and token_type_ids is not None:
        x = b.op("Add", x, b.op("Gather", b.weight(f"{n.token_type_embed}.weight",
                                                   types.astype(dt)), token_type_ids))
    return x


def _qkv_weights(state: Mapping[str, Any], prefix: str, n: EncoderNames,
                 head_dim: int) -> Linear:
    """q, k and v as one [H, 3H] projection, with 1/sqrt(head_dim) folded into q."""
    q = _linear(state, prefix + n.q, False)
    scale = 1.0 / math.sqrt(head_dim)
    q = Linear(q.weight * scale, None if q.bias is None else q.bias * scale)
    return _concat([q, _linear(state, prefix + n.k, False), _linear(state, prefix + n.v, False)])


def _attention_bias(b: GraphBuilder, attention_mask: str) -> str:
    """[B,1,1,S] float32 bias: 0 for real keys, float32-min for padding."""
    keep = b.op("Unsqueeze", b.op("Cast", attention_mask, to=onnx.TensorProto.BOOL),
                b.const([1, 2]))
    return b.op("Where", keep, b.const(0.0, F32), b.const(MASK_MIN, F32))


def _attention(b: GraphBuilder, qkv: str, bias: str, d: EncoderDims, dt: np.dtype) -> str:
    r"""Bidirectional multi-head attention over the fused, pre-scaled qkv projection.

    ::

        qkv ─Split─┬ q ─Reshape[B,S,h,D]─Transpose[B,h,S,D] ───────┐
                   ├ k ─Reshape[B,S,h,D]─Transpose[B,h,D,S] ───────MatMul─Add(bias)─Softmax─┐
                   └ v ─Reshape[B,S,h,D]─Transpose[B,h,S,D] ──────────────────────────────MatMul
                                                            out ◀─Reshape[B,S,H]─Transpose ◀┘

    In float16 the scores are cast to float32 for the bias and Softmax.
    """
    heads, dim = d.num_heads, d.head_dim
    q, k, v = b.op("Split", qkv, b.const([d.hidden] * 3), axis=-1, outputs=3)
    shape = b.const([0, 0, heads, dim])
    q = b.op("Transpose", b.op("Reshape", q, shape), perm=[0, 2, 1, 3])
    k = b.op("Transpose", b.op("Reshape", k, shape), perm=[0, 2, 3, 1])
    v = b.op("Transpose", b.op("Reshape", v, shape), perm=[0, 2, 1, 3])
    scores = b.op("MatMul", q, k)
    if dt != np.dtype(F32):
        scores = b.op("Cast", scores, to=onnx.TensorProto.FLOAT)
    probs = b.op("Softmax", b.op("Add", scores, bias), axis=-1)
    if dt != np.dtype(F32):
        probs = b.op("Cast", probs, to=onnx.TensorProto.FLOAT16)
    out = b.op("MatMul", probs, v)
    return b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.const([0, 0, d.hidden]))


# ---------------------------------------------------------------------------------------------
# model -> graph and layout


def classifier_weights(arch: EncoderArch, model: Any) -> list[tuple[str, Linear]] | None:
    """The classification head's named (dense, out), or ``None`` for a bare base model."""
    if model.base_model is model:
        return None
    state = model.state_dict()
    body = f"{model.base_model_prefix}."
    dense, out = (name.format(body=body) for name in (arch.head.dense, arch.head.out))
    if f"{out}.weight" not in state:
        return None
    return [(dense, _linear(state, dense, False)), (out, _linear(state, out, False))]


def pooling(model: Any, classifier: bool) -> dict[str, Any]:
    """How the source turns token states into one vector: sentence-transformers' modules where
    the model directory has them, else ``cls`` for classifiers and ``mean`` otherwise."""
    default = {"pooling": "cls" if classifier else "mean", "normalize": False,
               "pooling_from": "default"}
    modules_file = _source_file(str(getattr(model, "name_or_path", "") or ""), "modules.json")
    if classifier or modules_file is None:
        return default
    try:
        modules = json.loads(modules_file.read_text())
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        pool = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
        if pool is None:
            return default
        config = json.loads((modules_file.parent / pool["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return default
    mode = config.get("pooling_mode")
    modes = [mode] if isinstance(mode, str) else [
        name for key, name in POOLING_MODES.items() if config.get(key)
    ]
    return {
        "pooling": "+".join(modes) or default["pooling"],
        "normalize": "Normalize" in kinds,
        "pooling_from": "sentence-transformers",
        "other_modules": [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")],
    }


def _source_file(source: str, filename: str) -> Path | None:
    """``filename`` in a local model directory, or in the local hub cache (never downloads)."""
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, filename)
    except Exception:  # noqa: BLE001  (a malformed id or cache: pooling falls back to default)
        return None
    return Path(cached) if isinstance(cached, str) else None


def emit(arch: EncoderArch, model: Any, dtype: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The ONNX graph of ``model`` and its input/output and pooling layout for the manifest."""
    state = model.base_model.state_dict()
    dims = read_dims(arch, model.config, state)
    head = classifier_weights(arch, model)
    proto = build_encoder(arch, dims, state, head, dtype)
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if dims.type_input else [])
    layout = {
        "inputs": inputs,
        "output": "logits" if head is not None else "last_hidden_state",
        "padding_side": "right",
        "pad_token_id": dims.pad_token_id,
        "hidden_size": dims.hidden,
        "num_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "max_positions": max_sequence_length(arch, dims),
        "num_labels": None if head is None else int(head[1][1].weight.shape[1]),
        "dtype": np.dtype(dtype).name,
        **pooling(model, classifier=head is not None),
    }
    return proto, layout
