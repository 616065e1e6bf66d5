"""The encoder graph, emitted from normalized weights (:class:`EncoderWeights`) in one of two
forms. Its initializers carry BERT's names whatever the source architecture
(``encoder.layer.{i}.attention.qkv.weight``), so ``optimize`` finds each weight again:

- no fusions (export): opset 18 primitives only, so any ONNX runtime can run it.
- with ``fusions``, each independently: ``skip_norm`` (ONNX Runtime's ``SkipLayerNormalization``
  for every add + LayerNorm, the projection bias folded in; float16 only, see
  ``SKIP_LAYER_NORM_CPU``), ``attention`` (opset-23
  ``Attention``), ``activation`` (ONNX Runtime's ``BiasGelu`` / ``FastGelu``, the bias folded
  in). ``norm`` does not apply: LayerNormalization is already one op. All of them: 10 nodes a
  layer instead of 30 (13 in float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from llmopt.errors import UnsupportedError
from llmopt.exporter.graph import MS_DOMAIN, OPSET, GraphBuilder
from llmopt.exporter.ops import Linear
from llmopt.exporter.ops import activation as _activation
from llmopt.exporter.weights import EncoderDims, EncoderLayerWeights, EncoderWeights, Norm

F32 = np.float32
I64 = np.int64
MASK_MIN = float(np.finfo(np.float32).min)
FUSED_OPSET = 23
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

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


def build_encoder(dims: EncoderDims, weights: EncoderWeights, dtype: Any = F32,
                  fusions: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """Emit the encoder graph, with a classification head on the first token where
    ``weights.head`` has one, in primitive or fused form (see the module docstring).

    One post-norm layer; each ``[...]`` becomes one op when its fusion is on::

        h = [attention](Split(qkv(x)))         attention: Attention (opset 23)
        x = [LayerNorm(o(h) + bias + x)]       skip_norm: SkipLayerNormalization (float16)
        y = fc_out([GELU(fc_in(x) + bias)])    activation: BiasGelu / FastGelu
        x = [LayerNorm(y + bias + x)]          skip_norm
    """
    return _EncoderGraph(dims, dtype, fusions).build(weights)


class _EncoderGraph:
    """One :func:`build_encoder` call: the builder and the choices every step reads, and the
    steps in graph order (inputs, embeddings, attention mask, layers, head, output)."""

    def __init__(self, dims: EncoderDims, dtype: Any, fusions: frozenset[str]) -> None:
        self.d = dims
        self.dt = np.dtype(dtype)
        self.fusions = fusions
        # float32 keeps Add + LayerNormalization: faster on the CPU (SKIP_LAYER_NORM_CPU)
        self.skip_fused = "skip_norm" in fusions and self.dt != np.float32
        self.b = GraphBuilder()

    def build(self, weights: EncoderWeights) -> onnx.ModelProto:
        b, d, dt = self.b, self.d, self.dt
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
        with b.scope("encoder"):
            with b.scope("embed"):
                tokens, positions = _embeddings(b, d, weights, input_ids=input_ids,
                                                token_type_ids=token_type_ids, dt=dt)
            x = self.add_norm(tokens, positions, None, weights.embed_norm, name=EMBED_NORM,
                              scope="embed_norm")
            if weights.embed_project is not None:  # [B,S,E] -> [B,S,H]
                x = self.linear(x, weights.embed_project, EMBED_PROJECT, "embed_project")
            with b.scope("attn_mask"):
                mask = self._mask(weights, attention_mask)
            for i, layer in enumerate(weights.layers):
                with b.scope(f"layers.{i}"):
                    x = self._layer(LAYER.format(i=i), layer, x, mask)
        if weights.head is not None:
            with b.scope("classifier"):
                x = self._classifier(x, *weights.head)
        if dt != np.dtype(F32):
            b.op("Cast", x, to=onnx.TensorProto.FLOAT, output_names=[output], name="output")
        else:
            b.op("Identity", x, output_names=[output], name="output")
        opset = FUSED_OPSET if "attention" in self.fusions else OPSET
        return b.build("llmopt_encoder", opset=opset)

    def _mask(self, weights: EncoderWeights, attention_mask: str) -> str:
        """The padding mask (a float bias, or booleans for the fused Attention), with the
        relative position bias shared by every layer where the model has one."""
        b, fused = self.b, "attention" in self.fusions
        mask = _attention_mask(b, attention_mask) if fused else _attention_bias(b, attention_mask)
        if weights.relative_bias is not None:  # one [B,h,S,S] bias for every layer
            table = self.w(RELATIVE_BIAS, weights.relative_bias)
            mask = _with_relative_bias(b, mask, table, attention_mask,
                                       weights.relative_bias.shape[0], fused=fused, dt=self.dt)
        return mask

    def _layer(self, p: str, layer: EncoderLayerWeights, x: str, mask: str) -> str:
        """One post-norm layer on ``x`` (initializer names under ``p``)."""
        b, d, dt, skip_fused = self.b, self.d, self.dt, self.skip_fused
        with b.scope("attn"):
            qkv = self.linear(x, layer.qkv, p + QKV, "qkv")
            if "attention" in self.fusions:
                attn = _fused_attention(b, qkv, mask, d, dt)
            else:
                attn = _attention(b, qkv, mask, d, dt)
            attn = self.linear(attn, layer.o, p + ATTN_OUT, "o", bias=not skip_fused)
        x = self.add_norm(attn, x, (p + ATTN_OUT, layer.o), layer.attn_norm,
                          name=p + ATTN_NORM, scope="attn_norm")
        with b.scope("mlp"):
            fused_act = "activation" in self.fusions and d.activation.startswith("gelu")
            y = self.linear(x, layer.fc_in, p + FC_IN, "fc_in", bias=not fused_act)
            if fused_act:
                y = _fused_gelu(b, y, self.w(f"{p}{FC_IN}.bias", layer.fc_in.bias)
                                if layer.fc_in.bias is not None else None, d.activation)
            else:
                y = _activation(b, y, d.activation, dt)
            y = self.linear(y, layer.fc_out, p + FC_OUT, "fc_out", bias=not skip_fused)
        return self.add_norm(y, x, (p + FC_OUT, layer.fc_out), layer.mlp_norm,
                             name=p + MLP_NORM, scope="mlp_norm")

    def _classifier(self, x: str, dense: Linear, out: Linear) -> str:
        """``out(activation(dense(x[:, 0])))``: the head on the first token."""
        b = self.b
        first = b.op("Gather", x, b.const(0), axis=1)  # [B,H]: the [CLS] / <s> token
        y = self.linear(first, dense, HEAD_DENSE, "dense")
        if self.d.head_activation == "gelu":
            y = _activation(b, y, "gelu", self.dt)
        else:
            y = b.op("Tanh" if self.d.head_activation == "tanh" else "Relu", y)
        return self.linear(y, out, HEAD_OUT, "out")

    # -- the pieces every step uses

    def w(self, name: str, array: np.ndarray) -> str:
        return self.b.weight(name, array.astype(self.dt))

    def linear(self, x: str, lin: Linear, name: str, scope: str, bias: bool = True) -> str:
        """x @ weight (+ bias, unless a fused consumer takes the bias)."""
        b = self.b
        with b.scope(scope):
            y = b.op("MatMul", x, self.w(f"{name}.weight", lin.weight))
            if bias and lin.bias is not None:
                y = b.op("Add", y, self.w(f"{name}.bias", lin.bias))
        return y

    def add_norm(self, x: str, residual: str, bias: tuple[str, Linear] | None, norm: Norm, *,
                 name: str, scope: str) -> str:
        """LayerNorm(x + bias + residual): one SkipLayerNormalization when fused."""
        b, eps = self.b, self.d.eps
        gamma = self.w(f"{name}.weight", norm.weight)
        beta = self.w(f"{name}.bias", norm.bias if norm.bias is not None
                      else np.zeros_like(norm.weight))
        if self.skip_fused:
            extra = []
            if bias is not None and bias[1].bias is not None:
                extra.append(self.w(f"{bias[0]}.bias", bias[1].bias))
            with b.scope(scope):  # post-norm: the sum (optional output 3) is not needed
                return str(b.op("SkipLayerNormalization", x, residual, gamma, beta, *extra,
                                domain=MS_DOMAIN, epsilon=eps))
        total = b.op("Add", residual, x, name=f"{scope.removesuffix('_norm')}_residual")
        with b.scope(scope):
            return str(b.op("LayerNormalization", total, gamma, beta, axis=-1, epsilon=eps))


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
