"""Bidirectional encoders (BERT and its descendants) as one ONNX graph.

Inputs ``input_ids [B,S]``, ``attention_mask [B,S]`` and, where the model has more than one
token type, ``token_type_ids [B,S]``; the output is ``last_hidden_state [B,S,H]`` for
feature extraction or ``logits [B,num_labels]`` for text classification, always float32.
Sequences are right-padded (the encoder convention); padded keys are masked out.

As for decoders, the graph is emitted by a small architecture description rather than traced,
and validated against PyTorch. It is emitted from normalized weights (:class:`EncoderWeights`),
taken from a transformers state dict at export or from a package's own initializers, which carry
BERT's names whatever the source architecture (``encoder.layer.{i}.attention.qkv.weight``), when
``optimize`` re-emits the graph in its fused form:

- no fusions (export): opset 18 primitives only, so any ONNX runtime can run it.
- with ``fusions``, each independently: ``skip_norm`` (ONNX Runtime's ``SkipLayerNormalization``
  for every add + LayerNorm, the projection bias folded in), ``attention`` (opset-23
  ``Attention``), ``activation`` (ONNX Runtime's ``BiasGelu`` / ``FastGelu``, the bias folded
  in). ``norm`` does not apply: LayerNormalization is already one op. All of them: 10 nodes a
  layer instead of 30.

How the source model pools token states into a sentence embedding (sentence-transformers'
``modules.json``) goes into the manifest layout, so a runtime can reproduce it without the graph
hard-coding one choice.
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
from llmopt.exporter.decoder import Norm
from llmopt.exporter.graph import MS_DOMAIN, OPSET, GraphBuilder
from llmopt.exporter.ops import Initializers, Linear
from llmopt.exporter.ops import activation as _activation
from llmopt.exporter.ops import concat_linear as _concat
from llmopt.exporter.ops import state_linear as _linear
from llmopt.exporter.ops import to_numpy as _array

TASKS = ("feature-extraction", "text-classification")
F32 = np.float32
I64 = np.int64
MASK_MIN = float(np.finfo(np.float32).min)
FUSED_OPSET = 23
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
POOLING_MODES = {  # sentence-transformers Pooling config key -> llmopt pooling name
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weighted_mean",
    "pooling_mode_lasttoken": "last",
}

# Initializer names of the normalized weights: BERT's, for every architecture, so that later
# stages find each weight by name. ``{i}`` is the layer index.
WORD_EMBED = "embeddings.word_embeddings.weight"
POSITION_EMBED = "embeddings.position_embeddings.weight"
TOKEN_TYPE_EMBED = "embeddings.token_type_embeddings.weight"
EMBED_NORM = "embeddings.LayerNorm"
EMBED_PROJECT = "embeddings_project"
RELATIVE_BIAS = "encoder.relative_attention_bias.by_distance"
LAYER = "encoder.layer.{i}."
QKV = "attention.qkv"
ATTN_OUT = "attention.output.dense"
ATTN_NORM = "attention.output.LayerNorm"
FC_IN = "intermediate.dense"
FC_OUT = "output.dense"
MLP_NORM = "output.LayerNorm"
HEAD_DENSE = "classifier.dense"
HEAD_OUT = "classifier.out"


@dataclass(frozen=True)
class EncoderNames:
    """Where each weight lives in the base model's state dict. ``{i}`` is the layer index.

    Every layer is post-norm: ``x = norm(x + attn(x))``, then ``x = norm(x + mlp(x))``.
    ``embed_project``: a Linear from the embedding size to the hidden size after the embedding
    norm (ELECTRA, where the two differ; absent from the state dict where they do not).
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
    embed_project: str | None = None


@dataclass(frozen=True)
class ClassifierHead:
    """A sequence-classification head on the first token: ``out(activation(dense(x[:, 0])))``.

    Names are keys of the full model's state dict; ``{body}`` stands for the base model's
    prefix (``bert.``), since some heads (BERT's pooler) live inside the base model.
    """

    dense: str
    out: str
    activation: str  # "tanh" | "relu" | "gelu"


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
    # a bias on every layer's attention scores that depends on key - query only (MPNet):
    # (base model, longest sequence L) -> [2L-1, heads], row r for key - query = r - (L-1)
    relative_bias: Callable[[Any, int], np.ndarray] | None = None
    kind: str = "encoder"
    builder: str = "native"

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
    positions: str = "absolute"  # EncoderArch.positions
    head_activation: str = "tanh"  # EncoderArch.head.activation


def read_dims(arch: EncoderArch, config: Any, type_input: bool) -> EncoderDims:
    """Dims from ``config``; ``type_input``: whether the graph takes ``token_type_ids``."""
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
        type_input=type_input,
        positions=arch.positions,
        head_activation=arch.head.activation,
    )


def max_sequence_length(arch: EncoderArch, dims: EncoderDims) -> int:
    """Longest input: RoBERTa-style positions start after the padding index."""
    if arch.positions == "padded":
        return dims.max_positions - dims.pad_token_id - 1
    return dims.max_positions


# ---------------------------------------------------------------------------------------------
# weights, normalized: the graph emitter never sees architecture-specific names


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


def weights_from_state(arch: EncoderArch, dims: EncoderDims, state: Mapping[str, Any],
                       head: tuple[Linear, Linear] | None) -> EncoderWeights:
    """Normalize the base model's state dict through the architecture's names.

    A model whose token types are never fed (RoBERTa: a single type) has type 0's row folded
    into the position table, so it costs nothing at run time.
    """
    n = arch.names

    def norm(prefix: str) -> Norm:
        return Norm(_array(state[f"{prefix}.weight"]), _array(state[f"{prefix}.bias"]))

    positions = _array(state[f"{n.position_embed}.weight"])
    types = _array(state[f"{n.token_type_embed}.weight"]) if n.token_type_embed else None
    if types is not None and not dims.type_input:
        positions, types = positions + types[0], None
    layers = []
    for i in range(dims.num_layers):
        p = n.layer.format(i=i)
        layers.append(EncoderLayerWeights(
            qkv=_qkv_weights(state, p, n, dims.head_dim),
            o=_linear(state, p + n.o, False),
            attn_norm=norm(p + n.attn_norm),
            fc_in=_linear(state, p + n.fc_in, False),
            fc_out=_linear(state, p + n.fc_out, False),
            mlp_norm=norm(p + n.mlp_norm),
        ))
    project = (_linear(state, n.embed_project, False)
               if n.embed_project and f"{n.embed_project}.weight" in state else None)
    return EncoderWeights(_array(state[f"{n.word_embed}.weight"]), positions, types,
                          norm(n.embed_norm), layers, head, project)


def weights_from_onnx(tensors: Mapping[str, np.ndarray], num_layers: int) -> EncoderWeights:
    """Recover the weights from an llmopt encoder graph's initializers (by their stable names),
    so later stages can re-emit the graph in another form."""

    found = Initializers(tensors)
    get, need, linear = found.get, found.need, found.linear

    def norm(name: str) -> Norm:
        return Norm(need(f"{name}.weight"), get(f"{name}.bias"))

    layers = []
    for i in range(num_layers):
        p = LAYER.format(i=i)
        layers.append(EncoderLayerWeights(linear(p + QKV), linear(p + ATTN_OUT),
                                          norm(p + ATTN_NORM), linear(p + FC_IN),
                                          linear(p + FC_OUT), norm(p + MLP_NORM)))
    head = (linear(HEAD_DENSE), linear(HEAD_OUT)) if f"{HEAD_OUT}.weight" in tensors else None
    project = linear(EMBED_PROJECT) if f"{EMBED_PROJECT}.weight" in tensors else None
    return EncoderWeights(need(WORD_EMBED), need(POSITION_EMBED), get(TOKEN_TYPE_EMBED),
                          norm(EMBED_NORM), layers, head, project, get(RELATIVE_BIAS))


def _qkv_weights(state: Mapping[str, Any], prefix: str, n: EncoderNames,
                 head_dim: int) -> Linear:
    """q, k and v as one [H, 3H] projection, with 1/sqrt(head_dim) folded into q."""
    q = _linear(state, prefix + n.q, False)
    scale = 1.0 / math.sqrt(head_dim)
    q = Linear(q.weight * scale, None if q.bias is None else q.bias * scale)
    return _concat([q, _linear(state, prefix + n.k, False), _linear(state, prefix + n.v, False)])


# ---------------------------------------------------------------------------------------------
# graph


def build_encoder(dims: EncoderDims, weights: EncoderWeights, dtype: Any = F32,
                  fusions: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """Emit the encoder graph, with a classification head on the first token where
    ``weights.head`` has one, in primitive or fused form (see the module docstring).

    One post-norm layer; each ``[...]`` becomes one op when its fusion is on::

        h = [attention](Split(qkv(x)))         attention: Attention (opset 23)
        x = [LayerNorm(o(h) + bias + x)]       skip_norm: SkipLayerNormalization
        y = fc_out([GELU(fc_in(x) + bias)])    activation: BiasGelu / FastGelu
        x = [LayerNorm(y + bias + x)]          skip_norm
    """
    d, dt = dims, np.dtype(dtype)
    skip_fused = "skip_norm" in fusions
    b = GraphBuilder()
    input_ids = b.input("input_ids", I64, ["batch", "sequence"])
    attention_mask = b.input("attention_mask", I64, ["batch", "sequence"])
    token_type_ids = (b.input("token_type_ids", I64, ["batch", "sequence"])
                      if weights.token_type_embed is not None else None)
    if weights.head is None:
        output = "last_hidden_state"
        b.output(output, F32, ["batch", "sequence", d.hidden])
    else:
        output = "logits"
        b.output(output, F32, ["batch", weights.head[1].weight.shape[1]])

    def w(name: str, array: np.ndarray) -> str:
        return b.weight(name, array.astype(dt))

    def linear(x: str, lin: Linear, name: str, scope: str, bias: bool = True) -> str:
        """x @ weight (+ bias, unless a fused consumer takes the bias)."""
        with b.scope(scope):
            y = b.op("MatMul", x, w(f"{name}.weight", lin.weight))
            if bias and lin.bias is not None:
                y = b.op("Add", y, w(f"{name}.bias", lin.bias))
        return y

    def add_norm(x: str, residual: str, bias: tuple[str, Linear] | None, norm: Norm, *,
                 name: str, scope: str) -> str:
        """LayerNorm(x + bias + residual): one SkipLayerNormalization when fused."""
        gamma = w(f"{name}.weight", norm.weight)
        beta = w(f"{name}.bias", norm.bias if norm.bias is not None
                 else np.zeros_like(norm.weight))
        if skip_fused:
            extra = []
            if bias is not None and bias[1].bias is not None:
                extra.append(w(f"{bias[0]}.bias", bias[1].bias))
            with b.scope(scope):  # post-norm: the sum (optional output 3) is not needed
                return str(b.op("SkipLayerNormalization", x, residual, gamma, beta, *extra,
                                domain=MS_DOMAIN, epsilon=d.eps))
        total = b.op("Add", residual, x, name=f"{scope.removesuffix('_norm')}_residual")
        with b.scope(scope):
            return b.op("LayerNormalization", total, gamma, beta, axis=-1, epsilon=d.eps)

    with b.scope("encoder"):
        with b.scope("embed"):
            tokens, positions = _embeddings(b, d, weights, input_ids=input_ids,
                                            token_type_ids=token_type_ids, dt=dt)
        x = add_norm(tokens, positions, None, weights.embed_norm, name=EMBED_NORM,
                     scope="embed_norm")
        if weights.embed_project is not None:  # [B,S,E] -> [B,S,H]
            x = linear(x, weights.embed_project, EMBED_PROJECT, "embed_project")
        with b.scope("attn_mask"):
            mask = (_attention_mask(b, attention_mask) if "attention" in fusions
                    else _attention_bias(b, attention_mask))
            if weights.relative_bias is not None:  # one [B,h,S,S] bias for every layer
                table = w(RELATIVE_BIAS, weights.relative_bias)
                mask = _with_relative_bias(b, mask, table, attention_mask,
                                           weights.relative_bias.shape[0], fused="attention"
                                           in fusions, dt=dt)
        for i, layer in enumerate(weights.layers):
            p = LAYER.format(i=i)
            with b.scope(f"layers.{i}"):
                with b.scope("attn"):
                    qkv = linear(x, layer.qkv, p + QKV, "qkv")
                    if "attention" in fusions:
                        attn = _fused_attention(b, qkv, mask, d, dt)
                    else:
                        attn = _attention(b, qkv, mask, d, dt)
                    attn = linear(attn, layer.o, p + ATTN_OUT, "o", bias=not skip_fused)
                x = add_norm(attn, x, (p + ATTN_OUT, layer.o), layer.attn_norm,
                             name=p + ATTN_NORM, scope="attn_norm")
                with b.scope("mlp"):
                    fused_act = "activation" in fusions and d.activation.startswith("gelu")
                    y = linear(x, layer.fc_in, p + FC_IN, "fc_in", bias=not fused_act)
                    if fused_act:
                        y = _fused_gelu(b, y, w(f"{p}{FC_IN}.bias", layer.fc_in.bias)
                                        if layer.fc_in.bias is not None else None, d.activation)
                    else:
                        y = _activation(b, y, d.activation, dt)
                    y = linear(y, layer.fc_out, p + FC_OUT, "fc_out", bias=not skip_fused)
                x = add_norm(y, x, (p + FC_OUT, layer.fc_out), layer.mlp_norm,
                             name=p + MLP_NORM, scope="mlp_norm")

    if weights.head is not None:
        dense, out = weights.head
        with b.scope("classifier"):
            first = b.op("Gather", x, b.const(0), axis=1)  # [B,H]: the [CLS] / <s> token
            y = linear(first, dense, HEAD_DENSE, "dense")
            if d.head_activation == "gelu":
                y = _activation(b, y, "gelu", dt)
            else:
                y = b.op("Tanh" if d.head_activation == "tanh" else "Relu", y)
            x = linear(y, out, HEAD_OUT, "out")
    if dt != np.dtype(F32):
        b.op("Cast", x, to=onnx.TensorProto.FLOAT, output_names=[output], name="output")
    else:
        b.op("Identity", x, output_names=[output], name="output")
    opset = FUSED_OPSET if "attention" in fusions else OPSET
    return b.build("llmopt_encoder", opset=opset)


def _embeddings(b: GraphBuilder, d: EncoderDims, weights: EncoderWeights, *,
                input_ids: str, token_type_ids: str | None, dt: np.dtype) -> tuple[str, str]:
    r"""(word (+ token type) embeddings, position embeddings), summed by the embedding norm.

    ::

        input_ids ─Gather(word) ─────────────────────────────────┬─▶ tokens
        token_type_ids ─Gather(token types) ─────────────────────Add
        absolute: Shape[1] ─Slice(position table)[S,H] ──────────────▶ positions
        padded:   input_ids ≠ pad ─CumSum·mask + pad ─Gather ────────▶ positions
    """
    x = b.op("Gather", b.weight(WORD_EMBED, weights.word_embed.astype(dt)), input_ids)
    if weights.token_type_embed is not None and token_type_ids is not None:
        x = b.op("Add", x, b.op("Gather", b.weight(TOKEN_TYPE_EMBED,
                                                   weights.token_type_embed.astype(dt)),
                                token_type_ids))
    table = b.weight(POSITION_EMBED, weights.position_embed.astype(dt))
    if d.positions == "padded":
        with b.scope("position_ids"):
            pad = b.const(d.pad_token_id)
            not_pad = b.op("Cast", b.op("Not", b.op("Equal", input_ids, pad)),
                           to=onnx.TensorProto.INT64)
            positions = b.op("Add", b.op("Mul", b.op("CumSum", not_pad, b.const(1)), not_pad),
                             pad)
        return x, b.op("Gather", table, positions)
    seq = b.op("Shape", input_ids, start=1, end=2)
    return x, b.op("Slice", table, b.const([0]), seq, b.const([0]))  # [S,H]


def _attention_bias(b: GraphBuilder, attention_mask: str) -> str:
    """[B,1,1,S] float32 bias: 0 for real keys, float32-min for padding."""
    keep = b.op("Unsqueeze", b.op("Cast", attention_mask, to=onnx.TensorProto.BOOL),
                b.const([1, 2]))
    return b.op("Where", keep, b.const(0.0, F32), b.const(MASK_MIN, F32))


def _attention_mask(b: GraphBuilder, attention_mask: str) -> str:
    """[B,1,S,S] boolean: query s may attend key t where t is a real token or t = s.

    A padded query always sees itself, so no row is ever fully masked: some attention kernels
    turn a fully masked row into NaN, which the next layer would spread to every query of the
    sequence (a masked key still multiplies its value by 0, and 0 * NaN is NaN). Real queries
    are unaffected; padded outputs are never read.
    """
    keep = b.op("Unsqueeze", b.op("Cast", attention_mask, to=onnx.TensorProto.BOOL),
                b.const([1, 2]))  # [B,1,1,S]
    seq = b.op("Squeeze", b.op("Shape", attention_mask, start=1, end=2), b.const([0]))
    index = b.op("Range", b.const(0), seq, b.const(1))
    same = b.op("Equal", b.op("Unsqueeze", index, b.const([1])),
                b.op("Unsqueeze", index, b.const([0])))  # [S,S]
    return b.op("Or", keep, same)


def _with_relative_bias(b: GraphBuilder, mask: str, table: str, attention_mask: str,
                        rows: int, *, fused: bool, dt: np.dtype) -> str:
    r"""The padding mask with a relative position bias looked up by key - query.

    ::

        Range(S) ─Sub(key - query)[S,S] + (L-1) ─Gather(table[2L-1,h])[S,S,h]
                 ─Transpose[h,S,S] ─Unsqueeze[1,h,S,S] = rel
        primitive: bias[B,1,1,S] + Cast32(rel)              ─▶ [B,h,S,S] float32
        fused:     Where(mask[B,1,S,S], rel, dtype min)    ─▶ [B,h,S,S] in the graph's dtype
    """
    seq = b.op("Squeeze", b.op("Shape", attention_mask, start=1, end=2), b.const([0]))
    index = b.op("Range", b.const(0), seq, b.const(1))
    distance = b.op("Sub", b.op("Unsqueeze", index, b.const([0])),
                    b.op("Unsqueeze", index, b.const([1])))  # [S,S]: key - query
    rel = b.op("Gather", table, b.op("Add", distance, b.const((rows - 1) // 2)))
    rel = b.op("Unsqueeze", b.op("Transpose", rel, perm=[2, 0, 1]), b.const([0]))
    if fused:
        return b.op("Where", mask, rel, b.const(float(np.finfo(dt).min), dt))
    if dt != np.dtype(F32):
        rel = b.op("Cast", rel, to=onnx.TensorProto.FLOAT)
    return b.op("Add", mask, rel)


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


def _fused_attention(b: GraphBuilder, qkv: str, mask: str, d: EncoderDims, dt: np.dtype) -> str:
    """qkv ─Split─ q, k, v [B,S,H] ─Attention(mask)─▶ out [B,S,H]: opset 23's one op, q already
    scaled; in float16 its softmax runs in float32."""
    q, k, v = b.op("Split", qkv, b.const([d.hidden] * 3), axis=-1, outputs=3)
    precision = onnx.TensorProto.FLOAT if dt != np.dtype(F32) else None
    return str(b.op("Attention", q, k, v, mask, q_num_heads=d.num_heads,
                    kv_num_heads=d.num_heads, scale=1.0, softmax_precision=precision))


def _fused_gelu(b: GraphBuilder, x: str, bias: str | None, kind: str) -> str:
    """ONNX Runtime's one-op GELU with the preceding bias add folded in: ``FastGelu`` (tanh
    approximation, optional bias) or ``BiasGelu`` (erf; ``Gelu`` without a bias)."""
    if kind in TANH_GELUS:
        return str(b.op("FastGelu", x, *([bias] if bias else []), domain=MS_DOMAIN))
    if kind == "gelu":
        if bias is None:
            return str(b.op("Gelu", x, domain=MS_DOMAIN))
        return str(b.op("BiasGelu", x, bias, domain=MS_DOMAIN))
    raise UnsupportedError(f"activation {kind!r} has no fused form",
                           fix="supported fused activations: gelu, " + ", ".join(TANH_GELUS))


# ---------------------------------------------------------------------------------------------
# model -> graph and layout; package -> fused graph


def classifier_weights(arch: EncoderArch, model: Any) -> tuple[Linear, Linear] | None:
    """The classification head's (dense, out), or ``None`` for a bare base model."""
    if model.base_model is model:
        return None
    state = model.state_dict()
    body = f"{model.base_model_prefix}."
    dense, out = (name.format(body=body) for name in (arch.head.dense, arch.head.out))
    if f"{out}.weight" not in state:
        return None
    return _linear(state, dense, False), _linear(state, out, False)


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
    types = arch.names.token_type_embed
    type_vocab = 0 if types is None else state[f"{types}.weight"].shape[0]
    dims = read_dims(arch, model.config, arch.token_types == "input" and type_vocab > 1)
    head = classifier_weights(arch, model)
    weights = weights_from_state(arch, dims, state, head)
    if arch.relative_bias is not None:
        weights.relative_bias = arch.relative_bias(model.base_model,
                                                   max_sequence_length(arch, dims))
    proto = build_encoder(dims, weights, dtype)
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
        "num_labels": None if head is None else int(head[1].weight.shape[1]),
        "dtype": np.dtype(dtype).name,
        **pooling(model, classifier=head is not None),
    }
    return proto, layout


def reemit_encoder(package: Any, tensors: Mapping[str, np.ndarray], fusions: frozenset[str],
                   dtype: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``package``'s encoder graph emitted again from its initializers ``tensors`` with
    ``fusions``, in ``dtype``; and why each requested fusion that cannot fire does not."""
    from transformers import AutoConfig

    from llmopt.exporter import registry

    arch = registry.find(str(package.manifest["model_type"]), package.task)
    if not isinstance(arch, EncoderArch):
        raise UnsupportedError(f"{package.path} is not an encoder package")
    layout = package.manifest.get("encoder") or {}
    config = AutoConfig.from_pretrained(str(package.path))
    dims = read_dims(arch, config, "token_type_ids" in layout.get("inputs", ()))
    weights = weights_from_onnx(tensors, dims.num_layers)
    classifier = package.task == "text-classification"
    labels = package.manifest.get("labels") or {}
    if (weights.head is not None) != classifier or (
            weights.head is not None and labels
            and weights.head[1].weight.shape[1] != len(labels)):
        raise UnsupportedError(f"{package.path}: the graph's head does not match its task "
                               f"{package.task!r} and labels",
                               fix="re-export the package with `llmopt export`")
    notes = {}
    if "norm" in fusions:
        notes["norm"] = "not applicable: LayerNormalization is already one op"
    if "activation" in fusions and not dims.activation.startswith("gelu"):
        notes["activation"] = f"not applicable: {dims.activation} is already one op"
    return build_encoder(dims, weights, np.dtype(dtype), fusions), notes
