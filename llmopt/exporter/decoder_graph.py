"""The decoder graph, emitted from normalized weights in one of two forms.

- no fusions (export): opset 18 primitives only, so any ONNX runtime can run it.
- with ``fusions`` (optimize), each independently: ``norm`` (opset-23 ``RMSNormalization``),
  ``skip_norm`` (ONNX Runtime's ``Skip(Simplified)LayerNormalization`` for residual add + norm),
  ``attention`` (opset-23 ``RotaryEmbedding``, then attention with native grouped-query heads
  and the KV cache: ONNX Runtime's ``GroupQueryAttention`` in float32, whose cache can be one
  preallocated buffer for past and present (see :func:`_fused_attention`); opset-23
  ``Attention`` in float16, whose CUDA kernel has the flash paths, or, with ``gqa=True``
  (``optimize --target cuda``), ``GroupQueryAttention`` in float16: ONNX Runtime's CUDA
  kernel for it takes float16/bfloat16 only, and it keeps the in-place cache on the GPU),
  ``activation`` (ONNX
  Runtime's ``Gelu``/``FastGelu``), ``moe`` (ONNX Runtime's ``MoE`` for a mixture-of-experts
  MLP: routing and every expert in one kernel). All of them: about 15 nodes a layer instead
  of about 55.

Both take the same inputs, produce the same outputs and name weights alike
(``model.layers.{i}.attn.qkv_proj.weight``...), so later stages can find them.

Optional per-architecture features, absent by default so other graphs are unchanged:
per-head q/k RMSNorm before rotary (Qwen3; ``model.layers.{i}.attn.q_norm.weight``, fused as
``RMSNormalization`` over head_dim), and Granite's multipliers, which need no ops of their
own: the attention scale comes from ``DecoderDims.attention_scale`` and the embedding,
residual and logits multipliers are folded into the weights (see ``weights_from_state``).
Gemma's: norms on the attention and MLP outputs before each residual add
(``model.layers.{i}.attn_post_norm``/``mlp_post_norm``), tanh soft-capping of the attention
scores (``GroupQueryAttention``'s and ``Attention``'s ``softcap`` when fused) and of the logits,
a sliding window on some layers only (one mask per distinct window), and a second RoPE table
for the sliding layers (``model.rotary_local.inv_freq``).
q/k norms may be LayerNorms (Phi-2), also with their own weights per head (StableLM;
``[heads, head_dim]`` weights). Parallel blocks (``DecoderDims.parallel_residual``: GPT-NeoX,
Phi-2, StableLM) add attention and MLP to the same residual, see :func:`build_decoder`.
A mixture-of-experts MLP in place of the dense one (Mixtral; ``model.layers.{i}.moe.*``,
see :func:`_experts`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from llmopt.exporter.graph import MS_DOMAIN, ONNX_DTYPE, OPSET, GraphBuilder
from llmopt.exporter.ops import F32, Linear, activation, rms_norm
from llmopt.exporter.weights import DecoderDims, DecoderWeights, LayerWeights, MoeWeights, Norm
from llmopt.runtime.kv_cache import ROW_LENGTHS

I64 = np.int64
FUSED_OPSET = 23
WEIGHT_PREFIX = "model"  # initializer names: model.layers.{i}.attn.qkv_proj.weight, ...


FUSIONS = ("norm", "skip_norm", "attention", "activation", "moe")

QKNorm = Callable[[str, str], tuple[str, str]]  # (q, k) -> normalized (q, k), [B,S,H*D]


def build_decoder(dims: DecoderDims, weights: DecoderWeights, norm_kind: str, dtype: Any,
                  fusions: frozenset[str] = frozenset(),
                  gqa: bool | None = None) -> onnx.ModelProto:
    r"""The decoder graph. A layer, sequential (the default)::

        x ─┬ attn_norm ─ attention ─ Add ─┬ mlp_norm ─ mlp ─ Add ─▶ (next layer's attn_norm)
           └──────────────────────────────┴────────────────────┘

    or parallel (``dims.parallel_residual``; GPT-NeoX, Phi-2, StableLM), one residual step::

        x ─┬ attn_norm ─ attention ─────────┐
           ├ mlp_norm ── mlp ───────────────┴ Add(parallel_residual) ─ Add ─▶ (next attn_norm)
           └────────────────────────────────────────────────────────────┘

    where a block without its own mlp_norm (``layer.shared_norm``: Phi-2) feeds attn_norm's
    output to the MLP. Fused, each residual Add + the norm after it is one SkipLayerNorm op;
    a parallel block has one such Add a layer instead of two.

    ``gqa`` picks the fused attention op: ``GroupQueryAttention`` (True) or opset-23
    ``Attention`` (False); None is GroupQueryAttention in float32 only.
    """
    return _DecoderGraph(dims, norm_kind, dtype, fusions, gqa).build(weights)


class _DecoderGraph:
    """One :func:`build_decoder` call: the builder and the choices every step reads, and the
    steps in graph order (inputs, embedding, masks, rotary tables, layers, LM head)."""

    def __init__(self, dims: DecoderDims, norm_kind: str, dtype: Any, fusions: frozenset[str],
                 gqa: bool | None) -> None:
        self.d = dims
        self.dt = np.dtype(dtype)
        self.norm_kind = norm_kind
        self.fusions = fusions
        self.in_place = "attention" in fusions and (
            self.dt == np.dtype(F32) if gqa is None else gqa)
        self.b = GraphBuilder()

    def build(self, weights: DecoderWeights) -> onnx.ModelProto:
        b, d, P = self.b, self.d, WEIGHT_PREFIX
        input_ids, attention_mask, position_ids, past, logits_to_keep = self._inputs_outputs()
        with b.scope("model"):
            with b.scope("embed"):
                x = b.op("Gather", self.w(f"{P}.embed.weight", weights.embed), input_ids)
                if weights.position_embed is not None:
                    table = self.w(f"{P}.position_embed.weight", weights.position_embed)
                    x = b.op("Add", x, b.op("Gather", table, position_ids))
            biases = self._attention_biases(input_ids, attention_mask)
            tables = self._rotary_tables(weights, position_ids)
            lengths = None
            if self.in_place:
                with b.scope("kv_lengths"):
                    lengths = kv_lengths(b, attention_mask)
                if set(biases) == {None}:  # a sliding window is measured from the batch's width
                    b.metadata[ROW_LENGTHS] = "1"
            h = self.norm(x, weights.layers[0].attn_norm, f"{P}.layers.0.attn_norm")
            for i, layer in enumerate(weights.layers):
                last = i + 1 == len(weights.layers)
                h, x = self._layer(i, layer, h, x, past[i], biases[d.window(i)],
                                   tables[d.window(i) is not None], lengths,
                                   weights.final_norm if last else weights.layers[i + 1].attn_norm,
                                   f"{P}.final_norm" if last else f"{P}.layers.{i + 1}.attn_norm")
            self._lm_head(h, weights.lm_head, logits_to_keep)
        opset = FUSED_OPSET if self.fusions & {"norm", "attention"} else OPSET
        return b.build("llmopt_decoder", opset=opset)

    def _inputs_outputs(self) -> tuple[str, str, str, list[tuple[str, str]], str]:
        """The graph's inputs (returned) and outputs, declared in the package contract's
        order."""
        b, d, dt = self.b, self.d, self.dt
        input_ids = b.input("input_ids", I64, ["batch", "sequence"])
        attention_mask = b.input("attention_mask", I64, ["batch", "total_sequence"])
        position_ids = b.input("position_ids", I64, ["batch", "sequence"])
        kv_shape: list[int | str] = ["batch", d.num_kv_heads, "past_sequence", d.head_dim]
        past = [(b.input(f"past_key_values.{i}.key", dt, kv_shape),
                 b.input(f"past_key_values.{i}.value", dt, kv_shape))
                for i in range(d.num_layers)]
        # logits of the last K positions only, K = 0 for all (transformers' logits_to_keep):
        # generation asks for 1 and skips the LM head on the rest of a prompt. A required input:
        # ONNX Runtime's IOBinding cannot bind an input that has a default value.
        logits_to_keep = b.input("logits_to_keep", I64, [])
        b.output("logits", F32, ["batch", "logits_sequence", int(d.vocab)])
        present_shape: list[int | str] = ["batch", d.num_kv_heads, "total_sequence", d.head_dim]
        for i in range(d.num_layers):
            b.output(f"present.{i}.key", dt, present_shape)
            b.output(f"present.{i}.value", dt, present_shape)
        return input_ids, attention_mask, position_ids, past, logits_to_keep

    def _attention_biases(self, input_ids: str, attention_mask: str) -> dict[int | None, str]:
        """One attention bias per distinct window (None: full attention)."""
        b, d = self.b, self.d
        biases: dict[int | None, str] = {}
        for window in dict.fromkeys(d.window(i) for i in range(d.num_layers)):
            with b.scope("attn_mask" if window == d.window(0) else f"attn_mask_{window or 'full'}"):
                # fused attention adds the bias in the graph's dtype; primitives in float32
                biases[window] = attention_bias(b, input_ids, attention_mask, window,
                                                self.dt if "attention" in self.fusions else F32)
        return biases

    def _rotary_tables(self, weights: DecoderWeights, position_ids: str
                       ) -> dict[bool, tuple[str | None, str | None]]:
        """(cos, sin) for full-attention layers (False) and sliding ones (True): the same
        table unless the sliding layers have their own (Gemma 3); (None, None) without
        rotary positions."""
        b, d, dt = self.b, self.d, self.dt
        doubled = "attention" not in self.fusions
        tables: dict[bool, tuple[str | None, str | None]] = {False: (None, None)}
        if weights.inv_freq is not None:
            with b.scope("rotary"):
                long = None
                if weights.long_inv_freq is not None and d.long_rope_after is not None:
                    long = (weights.long_inv_freq, d.long_rope_after)
                tables[False] = rotary_tables(b, position_ids, weights.inv_freq, d.rope_scaling,
                                              dt, doubled=doubled, long=long)
        tables[True] = tables[False]
        if weights.inv_freq_local is not None:  # the sliding layers' own table (Gemma 3)
            with b.scope("rotary_local"):
                tables[True] = rotary_tables(b, position_ids, weights.inv_freq_local,
                                             d.rope_scaling_local, dt, doubled=doubled,
                                             name=f"{WEIGHT_PREFIX}.rotary_local.inv_freq")
        return tables

    def _layer(self, i: int, layer: LayerWeights, h: str, x: str, past: tuple[str, str],
               bias: str, rotary: tuple[str | None, str | None], lengths: tuple[str, str] | None,
               next_norm: Norm | None, next_norm_name: str) -> tuple[str, str]:
        """Layer ``i`` on (normalized ``h``, residual ``x``); returns the next layer's pair,
        ``h`` normalized by ``next_norm`` (the next layer's attn_norm, or the final norm)."""
        b, d, dt = self.b, self.d, self.dt
        p = f"{WEIGHT_PREFIX}.layers.{i}."
        cos, sin = rotary
        with b.scope(f"layers.{i}"):
            qkv = self.linear(h, layer.qkv, p + "attn.qkv_proj")
            with b.scope("attn"):
                if d.clip_qkv is not None:  # OLMo: clamping q, k, v = clamping them joined
                    qkv = b.op("Clip", qkv, b.const(-d.clip_qkv, dt), b.const(d.clip_qkv, dt),
                               name="clip_qkv")
                qk_norm = self._head_norms(layer, p)
                if "attention" in self.fusions:
                    attn = _fused_attention(b, qkv, past, bias, cos, sin, d, i, lengths, qk_norm)
                else:
                    attn = _attention(b, qkv, past, bias, cos, sin, d, i, dt, qk_norm)
            attn = self.linear(attn, layer.o, p + "attn.o_proj")
            if layer.attn_post_norm is not None:
                attn = self.norm(attn, layer.attn_post_norm, p + "attn_post_norm")
            if not d.parallel_residual:
                h, x = self.skip_norm(x, attn, layer.mlp_norm, p + "mlp_norm")
            elif not layer.shared_norm:
                h = self.norm(x, layer.mlp_norm, p + "mlp_norm")
            with b.scope("mlp"):
                y = self._mlp(h, layer, p)
            if layer.mlp_post_norm is not None:
                y = self.norm(y, layer.mlp_post_norm, p + "mlp_post_norm")
            if d.parallel_residual:
                y = b.op("Add", attn, y, name="parallel_residual")
            return self.skip_norm(x, y, next_norm, next_norm_name)

    def _mlp(self, h: str, layer: LayerWeights, p: str) -> str:
        """The layer's MLP: its experts, or a gated (gate and up side by side) or plain one."""
        b, d, dt = self.b, self.d, self.dt
        if layer.moe is not None:
            return _experts(b, h, layer.moe, p + "moe", d, dt, self.fusions)
        assert layer.mlp_in is not None and layer.mlp_out is not None
        y = self.linear(h, layer.mlp_in, p + ("mlp.gate_up_proj" if layer.gated else "mlp.fc_in"))
        if layer.gated:
            half = layer.mlp_in.weight.shape[1] // 2
            gate, up = b.op("Split", y, b.const([half, half]), axis=-1, outputs=2)
            y = b.op("Mul", _activation(b, gate, d.activation, dt, self.fusions), up)
        else:
            y = _activation(b, y, d.activation, dt, self.fusions)
        return self.linear(y, layer.mlp_out, p + "mlp.fc_out")

    def _lm_head(self, h: str, lm_head: Linear, logits_to_keep: str) -> None:
        """The last ``logits_to_keep`` positions through the LM head, to float32 ``logits``."""
        b, d, dt = self.b, self.d, self.dt
        with b.scope("lm_head"):
            start = b.op("Neg", b.op("Unsqueeze", logits_to_keep, b.const([0])))
            h = b.op("Slice", h, start, b.const([2**62]), b.const([1]))
            logits = self.linear(h, lm_head, f"{WEIGHT_PREFIX}.lm_head")
            if dt != np.dtype(F32):
                logits = b.op("Cast", logits, to=onnx.TensorProto.FLOAT,
                              output_names=None if d.final_softcap else ["logits"])
            if d.final_softcap:
                with b.scope("softcap"):
                    logits = softcap(b, logits, d.final_softcap)
            if dt == np.dtype(F32) or d.final_softcap:
                b.op("Identity", logits, output_names=["logits"])

    # -- the pieces every step uses

    def w(self, name: str, array: np.ndarray) -> str:
        return self.b.weight(name, array.astype(self.dt))

    def linear(self, x: str, lin: Linear, name: str) -> str:
        b = self.b
        with b.scope(name.rsplit(".", 1)[-1]):
            y = b.op("MatMul", x, self.w(f"{name}.weight", lin.weight))
            if lin.bias is not None:
                y = b.op("Add", y, self.w(f"{name}.bias", lin.bias))
        return y

    def norm(self, x: str, weights_: Norm | None, name: str) -> str:
        b, d = self.b, self.d
        if weights_ is None:  # a block without this norm (OLMo 2's missing pre-norms)
            return x
        weight = self.w(f"{name}.weight", weights_.weight)
        with b.scope(name.rsplit(".", 1)[-1]):
            if self.norm_kind == "layer":
                bias = self.w(f"{name}.bias", weights_.bias if weights_.bias is not None
                              else np.zeros_like(weights_.weight))
                return b.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=d.eps)
            if "norm" in self.fusions:
                return b.op("RMSNormalization", x, weight, axis=-1, epsilon=d.eps)
            return rms_norm(b, x, weight, d.eps, self.dt)

    def skip_norm(self, x: str, residual: str, weights_: Norm | None,
                  name: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual): one op when fused."""
        b, d = self.b, self.d
        if "skip_norm" not in self.fusions or weights_ is None or (
                self.norm_kind == "layer" and self.dt == np.float32):  # SKIP_LAYER_NORM_CPU
            total = b.op("Add", x, residual, name=f"{name.rsplit('.', 1)[-1]}_residual")
            return self.norm(total, weights_, name), total
        weight = self.w(f"{name}.weight", weights_.weight)
        with b.scope(name.rsplit(".", 1)[-1]):
            if self.norm_kind == "layer":
                bias = self.w(f"{name}.bias", weights_.bias if weights_.bias is not None
                              else np.zeros_like(weights_.weight))
                out = b.op("SkipLayerNormalization", x, residual, weight, bias, outputs=4,
                           domain=MS_DOMAIN, epsilon=d.eps)
            else:
                out = b.op("SkipSimplifiedLayerNormalization", x, residual, weight, outputs=4,
                           domain=MS_DOMAIN, epsilon=d.eps)
        return out[0], out[3]

    def _head_norms(self, layer: LayerWeights, p: str) -> QKNorm | None:
        """Per-head RMSNorm of q and k over head_dim ([B,S,H*D] in and out)."""
        b, d = self.b, self.d
        if layer.q_norm is None or layer.k_norm is None:
            return None
        q_norm, k_norm = layer.q_norm, layer.k_norm

        def apply(q: str, k: str) -> tuple[str, str]:
            out = []
            for flat, weights_, heads, name in ((q, q_norm, d.num_heads, "q_norm"),
                                                (k, k_norm, d.num_kv_heads, "k_norm")):
                if weights_.weight.ndim == 1 and weights_.weight.shape[0] != d.head_dim:
                    out.append(self.norm(flat, weights_, f"{p}attn.{name}"))  # OLMo 2: all H*D
                    continue
                per_head = b.op("Reshape", flat, b.const([0, 0, heads, d.head_dim]))
                normed = (self._own_norm_per_head(per_head, weights_, f"{p}attn.{name}")
                          if weights_.weight.ndim == 2
                          else self.norm(per_head, weights_, f"{p}attn.{name}"))
                out.append(b.op("Reshape", normed, b.const([0, 0, heads * d.head_dim])))
            return out[0], out[1]
        return apply

    def _own_norm_per_head(self, x4: str, weights_: Norm, name: str) -> str:
        """A norm with its own weights per head ([heads, head_dim], StableLM): each head
        normalized with unit weights, then scaled (and shifted) by its own."""
        b, d, dt = self.b, self.d, self.dt
        unit = b.const(np.ones(d.head_dim), dt)
        with b.scope(name.rsplit(".", 1)[-1]):
            if self.norm_kind == "layer":
                y = b.op("LayerNormalization", x4, unit, b.const(np.zeros(d.head_dim), dt),
                         axis=-1, epsilon=d.eps)
            elif "norm" in self.fusions:
                y = b.op("RMSNormalization", x4, unit, axis=-1, epsilon=d.eps)
            else:
                y = rms_norm(b, x4, unit, d.eps, dt)
            y = b.op("Mul", y, self.w(f"{name}.weight", weights_.weight))
            if weights_.bias is not None:
                y = b.op("Add", y, self.w(f"{name}.bias", weights_.bias))
        return str(y)


def _activation(b: GraphBuilder, x: str, kind: str, dt: np.dtype,
                fusions: frozenset[str]) -> str:
    """ONNX Runtime's one-op GELUs where fused; silu stays Sigmoid*Mul, which ONNX Runtime
    fuses into one kernel itself."""
    if "activation" in fusions and kind in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return str(b.op("FastGelu", x, domain=MS_DOMAIN))
    if "activation" in fusions and kind == "gelu":
        return str(b.op("Gelu", x, domain=MS_DOMAIN))
    return activation(b, x, kind, dt)


def _experts(b: GraphBuilder, h: str, moe: MoeWeights, name: str, d: DecoderDims,
             dt: np.dtype, fusions: frozenset[str]) -> str:
    r"""A mixture-of-experts MLP: each token through its top-k experts, weighted by the router.

    Export (primitives)::

        h ─Reshape[N,H]─┬─MatMul(router)─Softmax─TopK(k)─(÷ sum)─▶ weights, experts [N,k]
                        │ for each expert e:
                        │   w_e = ReduceSum(Where(experts == e, weights, 0))   [N], 0: not routed
                        │   rows = NonZero(w_e)                                 tokens routed to e
                        └─Gather(rows)─MatMul(gate_up_e)─Split─act(g)*u─MatMul(down_e)
                            ─Mul(w_e[rows])─ScatterND(add) into out [N,H] ─▶ Reshape[B,S,H]

    Grouping the tokens by expert does k/E of the products of the dense form (every expert on
    every token) and reads each routed expert's weights once, straight from its initializer;
    gathering weights per token instead would copy k full expert matrices for every token of a
    prompt. ``moe`` fusion: ONNX Runtime's ``MoE``, see :func:`_fused_experts`.
    """
    if "moe" in fusions and d.activation == "silu" and d.normalize_top_k:
        return _fused_experts(b, h, moe, name, d, dt)
    count, hidden = d.num_experts, d.hidden
    x = b.op("Reshape", h, b.const([-1, hidden]))
    with b.scope("router"):
        logits = b.op("MatMul", x, b.weight(f"{name}.router.weight", moe.router.weight.astype(dt)))
        if dt != np.dtype(F32):  # routed in float32, as transformers does
            logits = b.op("Cast", logits, to=onnx.TensorProto.FLOAT)
        probs = b.op("Softmax", logits, axis=-1)
        weights, experts = b.op("TopK", probs, b.const([d.experts_per_token]), axis=-1,
                                outputs=2)
        if d.normalize_top_k:
            weights = b.op("Div", weights, b.op("ReduceSum", weights, b.const([-1]), keepdims=1))
        if dt != np.dtype(F32):
            weights = b.op("Cast", weights, to=onnx.TensorProto.FLOAT16)
    zero = onnx.helper.make_tensor("value", ONNX_DTYPE[dt], [1], [0])
    out = b.op("ConstantOfShape", b.op("Shape", x), value=zero)
    inter = moe.down.shape[1]
    for e in range(count):
        with b.scope(f"experts.{e}"):
            w_e = b.op("ReduceSum", b.op("Where", b.op("Equal", experts, b.const(e)), weights,
                                         b.const(0.0, dt)), b.const([-1]), keepdims=0)
            rows = b.op("Reshape", b.op("NonZero", w_e), b.const([-1]))
            y = b.op("MatMul", b.op("Gather", x, rows, axis=0),
                     b.weight(f"{name}.experts.{e}.gate_up_proj.weight",
                              moe.gate_up[e].astype(dt)))
            gate, up = b.op("Split", y, b.const([inter, inter]), axis=-1, outputs=2)
            y = b.op("Mul", _activation(b, gate, d.activation, dt, fusions), up)
            y = b.op("MatMul", y, b.weight(f"{name}.experts.{e}.down_proj.weight",
                                           moe.down[e].astype(dt)))
            y = b.op("Mul", y, b.op("Unsqueeze", b.op("Gather", w_e, rows, axis=0),
                                    b.const([-1])))
            out = b.op("ScatterND", out, b.op("Unsqueeze", rows, b.const([-1])), y,
                       reduction="add")
    return str(b.op("Reshape", out, b.op("Shape", h)))


def _fused_experts(b: GraphBuilder, h: str, moe: MoeWeights, name: str, d: DecoderDims,
                   dt: np.dtype) -> str:
    r"""Routing and the experts as ONNX Runtime's ``MoE`` (softmax, top-k, renormalization and
    a SwiGLU per expert in one kernel)::

        h ─MatMul(router)─Reshape[N,E]─▶ router logits ─┐
        h ──────────────────────────────────────────────MoE(fc1, fc2) ─▶ out [B,S,H]

    ``fc1`` [E, 2*inter, hidden] holds gate and up rows interleaved (``swiglu_fusion=1``, the
    only SwiGLU layout ONNX Runtime 1.31's CPU kernel takes); ``fc2`` [E, hidden, inter].
    ``swiglu`` with alpha 1 and beta 0 is ``silu(gate) * up``. Renormalized top-k only:
    with ``normalize_routing_weights=0`` ONNX Runtime 1.31's CPU kernel disagreed with the
    primitive form (max logit diff 7.4 on the tiny Mixtral, next to a fused attention or
    residual norm; exact alone), so unnormalized routing keeps the primitive experts.
    """
    inter = moe.down.shape[1]
    gate, up = moe.gate_up[:, :, :inter], moe.gate_up[:, :, inter:]
    fc1 = np.stack([gate, up], axis=-1).reshape(d.num_experts, d.hidden, 2 * inter)
    fc1 = np.ascontiguousarray(fc1.transpose(0, 2, 1))
    fc2 = np.ascontiguousarray(moe.down.transpose(0, 2, 1))
    with b.scope("router"):
        logits = b.op("MatMul", h, b.weight(f"{name}.router.weight", moe.router.weight.astype(dt)))
        logits = b.op("Reshape", logits, b.const([-1, d.num_experts]))
    return str(b.op("MoE", h, logits, b.weight(f"{name}.fc1.weight", fc1.astype(dt)), "",
                    b.weight(f"{name}.fc2.weight", fc2.astype(dt)), domain=MS_DOMAIN,
                    k=d.experts_per_token, activation_type="swiglu", swiglu_fusion=1,
                    activation_alpha=1.0, activation_beta=0.0,
                    normalize_routing_weights=int(d.normalize_top_k)))


def op_histogram(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())


def attention_bias(b: GraphBuilder, input_ids: str, attention_mask: str,
                   window: int | None, dtype: Any = F32) -> str:
    """[B,1,S,T] bias in ``dtype``: 0 where query s may attend key t, the dtype's lowest finite
    value elsewhere (float16: -65504; float32's minimum cast to float16 would be -inf, and
    -inf - -inf in a fused kernel's running max is NaN).

    Allowed: key not padding, key not after the query (causal), key inside the sliding window.
    Every query may also attend to itself, so the rows of padding queries are never fully
    masked (their outputs are ignored, but must stay finite: they become cache entries).
    """
    zero, axis0 = b.const(0), b.const([0])
    seq = b.op("Squeeze", b.op("Shape", input_ids, start=1, end=2), axis0)
    total = b.op("Squeeze", b.op("Shape", attention_mask, start=1, end=2), axis0)
    past_len = b.op("Sub", total, seq)
    one = b.const(1)
    kv_idx = b.op("Unsqueeze", b.op("Range", zero, total, one), axis0)  # [1,T]
    q_idx = b.op("Unsqueeze", b.op("Range", past_len, total, one), b.const([1]))  # [S,1]
    allowed = b.op("LessOrEqual", kv_idx, q_idx)
    if window:
        in_window = b.op("Greater", kv_idx, b.op("Sub", q_idx, b.const(window)))
        allowed = b.op("And", allowed, in_window)
    pad = b.op("Unsqueeze", b.op("Cast", attention_mask, to=onnx.TensorProto.BOOL),
               b.const([1, 2]))  # [B,1,1,T]
    allowed = b.op("Or", b.op("And", pad, allowed), b.op("Equal", kv_idx, q_idx))
    dt = np.dtype(dtype)
    return b.op("Where", allowed, b.const(0.0, dt), b.const(mask_min(dt), dt))


def mask_min(dtype: Any) -> float:
    """The masked-out bias value of ``dtype``: its lowest finite number."""
    return float(np.finfo(np.dtype(dtype)).min)


def softcap(b: GraphBuilder, x: str, cap: float) -> str:
    """tanh(x / cap) * cap, in float32 (Gemma 2's soft-capping)."""
    capped = b.op("Tanh", b.op("Div", x, b.const(cap, F32)))
    return str(b.op("Mul", capped, b.const(cap, F32)))


def rotary_tables(b: GraphBuilder, position_ids: str, inv_freq: np.ndarray, scaling: float,
                  dt: np.dtype, doubled: bool,
                  name: str = f"{WEIGHT_PREFIX}.rotary.inv_freq",
                  long: tuple[np.ndarray, int] | None = None) -> tuple[str, str]:
    """cos/sin from positions, in float32 as transformers computes them.

    ``doubled``: [B,1,S,rot] for the primitive form (both halves); else [B,S,rot/2] for
    ``RotaryEmbedding`` (both forms take these computed tables). ``long``: LongRoPE's
    long-factor frequencies and its switch point, chosen per call as transformers does::

        position_ids ─ReduceMax─Greater(switch - 1)─┐
            inv_freq (short), long_inv_freq ───────Where─▶ this call's inv_freq
    """
    inv = b.weight(name, inv_freq.astype(F32))
    if long is not None:
        long_inv_freq, switch = long
        with b.scope("longrope"):  # max(position_ids) + 1 > switch, over the whole batch
            use_long = b.op("Greater", b.op("ReduceMax", position_ids, keepdims=0),
                            b.const(switch - 1))
            inv = b.op("Where", use_long, b.weight(f"{WEIGHT_PREFIX}.rotary.long_inv_freq",
                                                   long_inv_freq.astype(F32)), inv)
    pos = b.op("Unsqueeze", b.op("Cast", position_ids, to=onnx.TensorProto.FLOAT), b.const([-1]))
    freqs = b.op("Mul", pos, inv)
    if doubled:
        freqs = b.op("Concat", freqs, freqs, axis=-1)
    cos, sin = b.op("Cos", freqs), b.op("Sin", freqs)
    if scaling != 1.0:
        cos = b.op("Mul", cos, b.const(scaling, F32))
        sin = b.op("Mul", sin, b.const(scaling, F32))
    if dt != np.dtype(F32):
        cos = b.op("Cast", cos, to=onnx.TensorProto.FLOAT16)
        sin = b.op("Cast", sin, to=onnx.TensorProto.FLOAT16)
    if doubled:
        axis = b.const([1])
        return b.op("Unsqueeze", cos, axis), b.op("Unsqueeze", sin, axis)
    return cos, sin


def _split_qkv(b: GraphBuilder, qkv: str, d: DecoderDims,
               qk_norm: QKNorm | None = None) -> list[str]:
    heads, kv_heads, dim = d.num_heads, d.num_kv_heads, d.head_dim
    q, k, v = b.op("Split", qkv, b.const([heads * dim, kv_heads * dim, kv_heads * dim]),
                   axis=-1, outputs=3)
    if qk_norm is not None:
        q, k = qk_norm(q, k)
    return [q, k, v]


def kv_lengths(b: GraphBuilder, attention_mask: str) -> tuple[str, str]:
    r"""GroupQueryAttention's ``seqlens_k`` ([B] int32: each row's last unmasked position) and
    ``total_sequence_length`` (int32 scalar: the attention mask's width).

    A left-padded or unpadded row ends at the mask's last column, so its length is the width, as
    before (its padding is masked by the bias). A row whose mask ends in zeros is a row of a
    ragged batch: its cache holds its own positions only, GroupQueryAttention reads and appends
    at its own length, and so its numbers do not depend on the rows beside it (the serving
    engine batches rows of different lengths this way; docs/batch_invariance.md). Graphs
    with a sliding window do not say so in their metadata (``ROW_LENGTHS``): the bias places
    the window from the batch's width, not the row's length::

        attention_mask ─Mul(1..T)─ReduceMax─Sub(1)─Cast(int32) ─▶ seqlens_k
    """
    total = b.op("Shape", attention_mask, start=1, end=2)
    columns = b.op("Range", b.const(1, np.int64), b.op("Add", b.op("Squeeze", total,
                                                                  b.const([0])),
                                                       b.const(1, np.int64)),
                   b.const(1, np.int64))
    last = b.op("ReduceMax", b.op("Mul", attention_mask, columns), b.const([1]), keepdims=0)
    seqlens = b.op("Cast", b.op("Sub", last, b.const(1, np.int64)), to=onnx.TensorProto.INT32)
    total32 = b.op("Cast", total, to=onnx.TensorProto.INT32)
    return seqlens, b.op("Squeeze", total32, b.const([0]))


def _fused_attention(b: GraphBuilder, qkv: str, past: tuple[str, str], bias: str,
                     cos: str | None, sin: str | None, d: DecoderDims, layer: int,
                     lengths: tuple[str, str] | None, qk_norm: QKNorm | None = None) -> str:
    r"""Rotary and attention as single ops; the KV cache stays BNSH.

    ::

        qkv ─Split─┬ q ─RotaryEmbedding─┐
                   ├ k ─RotaryEmbedding─┼─GroupQueryAttention(bias, past_k, past_v) ─▶ out,
                   └ v ─────────────────┘    (or opset-23 Attention)          present_k/v

    With ``lengths`` (float32), ``GroupQueryAttention``: when the caller binds one buffer
    [B, kv_heads, capacity, head_dim] as both past and present, ONNX Runtime writes the new
    keys and values into it in place instead of copying the whole cache every step. Rotary
    stays outside it, at each row's own position, so left-padded batches stay exact.
    """
    q, k, v = _split_qkv(b, qkv, d, qk_norm)
    if cos is not None and sin is not None:
        rot = d.rotary_dim if d.rotary_dim < d.head_dim else None
        q = b.op("RotaryEmbedding", q, cos, sin, num_heads=d.num_heads, rotary_embedding_dim=rot)
        k = b.op("RotaryEmbedding", k, cos, sin, num_heads=d.num_kv_heads,
                 rotary_embedding_dim=rot)
    names = [f"/model/layers.{layer}/attn/output", f"present.{layer}.key",
             f"present.{layer}.value"]
    scale = d.attention_scale * d.layer_scales[layer]
    if lengths is not None:
        seqlens, total = lengths
        out = b.op("GroupQueryAttention", q, k, v, past[0], past[1], seqlens, total, "", "", "",
                   bias, output_names=names, domain=MS_DOMAIN, num_heads=d.num_heads,
                   kv_num_heads=d.num_kv_heads, scale=scale, softcap=d.attn_softcap or None)
    else:
        out = b.op("Attention", q, k, v, bias, past[0], past[1], output_names=names,
                   q_num_heads=d.num_heads, kv_num_heads=d.num_kv_heads, scale=scale,
                   softcap=d.attn_softcap or None)
    return str(out[0])


def _apply_rotary(b: GraphBuilder, x: str, cos: str, sin: str, head_dim: int,
                  rotary_dim: int) -> str:
    """x * cos + rotate_half(x) * sin on the first ``rotary_dim`` channels of each head."""
    passthrough = None
    if rotary_dim < head_dim:
        x, passthrough = b.op("Split", x, b.const([rotary_dim, head_dim - rotary_dim]), axis=-1,
                              outputs=2)
    half = rotary_dim // 2
    x1, x2 = b.op("Split", x, b.const([half, half]), axis=-1, outputs=2)
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    y = b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))
    if passthrough is not None:
        y = b.op("Concat", y, passthrough, axis=-1)
    return y


def _attention(b: GraphBuilder, qkv: str, past: tuple[str, str], bias: str, cos: str | None,
               sin: str | None, d: DecoderDims, layer: int, dt: np.dtype,
               qk_norm: QKNorm | None = None) -> str:
    r"""Scaled dot-product attention with a KV cache and grouped-query heads, in primitives.

    ::

        qkv ─Split─┬ q ─Reshape─Transpose─RoPE─Mul(scale)─Reshape[B,kvH,rep*S,D]─┐
                   ├ k ─Reshape─Transpose─RoPE─Concat(past_k)=present_k ─Transpose┴MatMul
                   └ v ─Reshape─Transpose──────Concat(past_v)=present_v ──────────┐  │
                                                         MatMul ◀─Softmax◀─Add(bias)◀┘
                                                           └─Reshape─Transpose─Reshape ─▶ out

    Grouped-query heads are handled by folding the ``rep`` query heads that share a KV head
    into the sequence axis, so the cache is never repeated in memory.
    """
    heads, kv_heads, dim = d.num_heads, d.num_kv_heads, d.head_dim
    rep = heads // kv_heads
    q, k, v = _split_qkv(b, qkv, d, qk_norm)
    perm = [0, 2, 1, 3]
    q = b.op("Transpose", b.op("Reshape", q, b.const([0, 0, heads, dim])), perm=perm)
    k = b.op("Transpose", b.op("Reshape", k, b.const([0, 0, kv_heads, dim])), perm=perm)
    v = b.op("Transpose", b.op("Reshape", v, b.const([0, 0, kv_heads, dim])), perm=perm)
    if cos is not None and sin is not None:
        with b.scope("rotary_q"):
            q = _apply_rotary(b, q, cos, sin, dim, d.rotary_dim)
        with b.scope("rotary_k"):
            k = _apply_rotary(b, k, cos, sin, dim, d.rotary_dim)
    present_k = b.op("Concat", past[0], k, axis=2, output_names=[f"present.{layer}.key"])
    present_v = b.op("Concat", past[1], v, axis=2, output_names=[f"present.{layer}.value"])
    q = b.op("Mul", q, b.const(d.attention_scale * d.layer_scales[layer], dt))
    if rep > 1:
        q = b.op("Reshape", q, b.const([0, kv_heads, -1, dim]))
    scores = b.op("MatMul", q, b.op("Transpose", present_k, perm=[0, 1, 3, 2]))
    if rep > 1:
        scores = b.op("Reshape", scores, b.const([0, heads, -1, 0]))
    if dt != np.dtype(F32):
        scores = b.op("Cast", scores, to=onnx.TensorProto.FLOAT)
    if d.attn_softcap:
        with b.scope("softcap"):
            scores = softcap(b, scores, d.attn_softcap)
    probs = b.op("Softmax", b.op("Add", scores, bias), axis=-1)
    if dt != np.dtype(F32):
        probs = b.op("Cast", probs, to=onnx.TensorProto.FLOAT16)
    if rep > 1:
        probs = b.op("Reshape", probs, b.const([0, kv_heads, -1, 0]))
    out = b.op("MatMul", probs, present_v)
    if rep > 1:
        out = b.op("Reshape", out, b.const([0, heads, -1, dim]))
    return str(b.op("Reshape", b.op("Transpose", out, perm=perm), b.const([0, 0, heads * dim])))
