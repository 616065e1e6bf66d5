"""Decoder-only language models as one ONNX graph serving prefill and decode.

Inputs ``input_ids [B,S]``, ``attention_mask [B,P+S]``, ``position_ids [B,S]`` and
``past_key_values.{i}.key|value [B,kvH,P,D]``; outputs ``logits [B,S,V]`` (always float32) and
``present.{i}.key|value [B,kvH,P+S,D]``. P = 0 is prefill, P > 0 decode.

The graph is emitted from the weights by an architecture description, not traced from the
transformers modelling code, so a transformers release that rewrites its modelling code or
cache classes does not break export; validation against PyTorch proves the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from llmopt.errors import UnsupportedError
from llmopt.exporter.graph import GraphBuilder

TASKS = ("text-generation",)
F32 = np.float32
I64 = np.int64
MASK_MIN = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class DecoderNames:
    """Where each weight lives in the transformers state dict. ``{i}`` is the layer index.

    Attention is given either as separate ``q``/``k``/``v`` or as one fused ``qkv``; the MLP as
    ``gate`` + ``up`` (gated), a fused ``gate_up`` (gate first), or a plain ``fc_in``.
    """

    embed: str
    layer: str
    attn_norm: str
    mlp_norm: str
    o: str
    mlp_out: str
    final_norm: str
    lm_head: str = "lm_head"
    position_embed: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    fc_in: str | None = None


@dataclass(frozen=True)
class DecoderArch:
    """A decoder architecture: its names, its kind of norm, positions and MLP."""

    name: str
    model_types: tuple[str, ...]
    names: DecoderNames
    norm: str  # "rms" | "layer"
    positions: str  # "rotary" | "learned"
    eps_attr: str = "rms_norm_eps"
    act_attr: str = "hidden_act"
    transposed_linear: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    sliding_window: Callable[[Any], int | None] = lambda config: None
    tolerance: float = 2e-3
    min_transformers: str = "4.57"
    tasks: tuple[str, ...] = TASKS
    notes: str = ""
    extra_checks: tuple[Callable[[Any], None], ...] = field(default=())
    kind: str = "decoder"

    def emit(self, model: Any, dtype: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
        return emit(self, model, dtype)

    def validate(self, model: Any, session: Any, layout: dict[str, Any], tokenizer: Any,
                 tolerance: float, generation_tokens: int) -> dict[str, Any]:
        from llmopt.exporter.validate import validate_decoder

        return validate_decoder(model, session, layout, tokenizer, tolerance, generation_tokens)


@dataclass(frozen=True)
class DecoderDims:
    """The shape of a decoder, read from its transformers config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    eps: float
    activation: str
    max_positions: int
    sliding_window: int | None
    rotary_dim: int
    attention_scale: float
    layer_scales: tuple[float, ...]  # extra per-layer attention scaling (GPT-2 option)


def read_dims(arch: DecoderArch, config: Any, inv_freq: np.ndarray | None) -> DecoderDims:
    for check in arch.extra_checks:
        check(config)
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % kv_heads:
        raise UnsupportedError(f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
    layers = int(config.num_hidden_layers)
    scale = 1.0 / math.sqrt(head_dim)
    if arch.positions == "learned" and not getattr(config, "scale_attn_weights", True):
        scale = 1.0
    by_layer = getattr(config, "scale_attn_by_inverse_layer_idx", False)
    layer_scales = tuple(1.0 / (i + 1) if by_layer else 1.0 for i in range(layers))
    return DecoderDims(
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=hidden,
        vocab=int(config.vocab_size),
        eps=float(getattr(config, arch.eps_attr)),
        activation=str(getattr(config, arch.act_attr)),
        max_positions=int(config.max_position_embeddings),
        sliding_window=arch.sliding_window(config),
        rotary_dim=0 if inv_freq is None else 2 * len(inv_freq),
        attention_scale=scale,
        layer_scales=layer_scales,
    )


def rotary_parameters(model: Any) -> tuple[np.ndarray | None, float]:
    """``inv_freq`` and the attention scaling of the model's rotary embedding, if it has one.

    Taken from the instantiated PyTorch module, so every static RoPE scaling transformers
    implements (linear, llama3, yarn, ...) comes out right without llmopt re-deriving it.
    """
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if inv_freq is None:
            continue
        rope_type = str(getattr(module, "rope_type", "default"))
        if rope_type in ("dynamic", "longrope"):
            raise UnsupportedError(
                f"RoPE scaling {rope_type!r} changes with sequence length and is not exported yet",
                fix="export a variant with static RoPE (e.g. the 4k-context model)",
            )
        scaling = float(getattr(module, "attention_scaling", 1.0))
        return inv_freq.detach().float().cpu().numpy(), scaling
    return None, 1.0


# ---------------------------------------------------------------------------------------------
# weights


@dataclass
class Linear:
    weight: np.ndarray  # [in, out], ready for MatMul
    bias: np.ndarray | None


def _linear(state: Mapping[str, Any], prefix: str, transposed: bool) -> Linear:
    weight = _array(state[f"{prefix}.weight"])
    bias = state.get(f"{prefix}.bias")
    return Linear(weight if transposed else weight.T, None if bias is None else _array(bias))


def _concat(parts: list[Linear]) -> Linear:
    weight = np.concatenate([p.weight for p in parts], axis=1)
    if all(p.bias is None for p in parts):
        return Linear(weight, None)
    biases = [
        p.bias if p.bias is not None else np.zeros(p.weight.shape[1], F32) for p in parts
    ]
    return Linear(weight, np.concatenate(biases))


def _array(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# graph


def build_decoder(
    arch: DecoderArch,
    dims: DecoderDims,
    state: Mapping[str, Any],
    inv_freq: np.ndarray | None,
    rope_scaling: float,
    dtype: Any = F32,
) -> onnx.ModelProto:
    """Emit the decoder graph for ``state`` (a transformers state dict)."""
    names = arch.names
    dt = np.dtype(dtype)
    b = GraphBuilder()
    d = dims
    input_ids = b.input("input_ids", I64, ["batch", "sequence"])
    attention_mask = b.input("attention_mask", I64, ["batch", "total_sequence"])
    position_ids = b.input("position_ids", I64, ["batch", "sequence"])
    kv_shape = ["batch", d.num_kv_heads, "past_sequence", d.head_dim]
    present_shape = ["batch", d.num_kv_heads, "total_sequence", d.head_dim]
    past = []
    for i in range(d.num_layers):
        past.append((
            b.input(f"past_key_values.{i}.key", dt, kv_shape),
            b.input(f"past_key_values.{i}.value", dt, kv_shape),
        ))
    b.output("logits", F32, ["batch", "sequence", d.vocab])
    for i in range(d.num_layers):
        b.output(f"present.{i}.key", dt, present_shape)
        b.output(f"present.{i}.value", dt, present_shape)

    def linear(x: str, lin: Linear, name: str) -> str:
        with b.scope(name.rsplit(".", 1)[-1]):
            y = b.op("MatMul", x, b.weight(f"{name}.weight", lin.weight.astype(dt)))
            if lin.bias is not None:
                y = b.op("Add", y, b.weight(f"{name}.bias", lin.bias.astype(dt)))
        return y

    def norm(x: str, prefix: str, scope: str) -> str:
        weight = b.weight(f"{prefix}.weight", _array(state[f"{prefix}.weight"]).astype(dt))
        with b.scope(scope):
            if arch.norm == "layer":
                bias = b.weight(f"{prefix}.bias", _array(state[f"{prefix}.bias"]).astype(dt))
                return b.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=d.eps)
            return _rms_norm(b, x, weight, d.eps, dt)

    with b.scope("model"):
        with b.scope("embed"):
            x = b.op("Gather", b.weight(names.embed, _array(state[names.embed]).astype(dt)),
                     input_ids)
            if names.position_embed:
                table = _array(state[names.position_embed]).astype(dt)
                x = b.op("Add", x, b.op("Gather", b.weight(names.position_embed, table),
                                         position_ids))
        with b.scope("attn_mask"):
            bias = _attention_bias(b, input_ids, attention_mask, d.sliding_window)
        cos = sin = None
        if inv_freq is not None:
            with b.scope("rotary"):
                cos, sin = _rotary_tables(b, position_ids, inv_freq, rope_scaling, dt)

        for i in range(d.num_layers):
            prefix = names.layer.format(i=i)
            with b.scope(f"layers.{i}"):
                h = norm(x, prefix + names.attn_norm, "attn_norm")
                qkv = _qkv_weights(arch, state, prefix)
                with b.scope("attn"):
                    attn, present_k, present_v = _attention(
                        b, h, linear(h, qkv, prefix + "self_attn.qkv_proj"), past[i], bias, cos, sin,
                        d, i, dt,
                    )
                    attn = linear(attn, _linear(state, prefix + names.o, arch.transposed_linear),
                                  prefix + names.o)
                x = b.op("Add", x, attn, name="attn_residual")
                h = norm(x, prefix + names.mlp_norm, "mlp_norm")
                with b.scope("mlp"):
                    y = _mlp(b, arch, state, prefix, h, d, linear, dt)
                x = b.op("Add", x, y, name="mlp_residual")

        x = norm(x, names.final_norm, "final_norm")
        head_name = names.lm_head if f"{names.lm_head}.weight" in state else names.embed[:-7]
        head = _linear(state, head_name, transposed=False)
        with b.scope("lm_head"):
            logits = b.op("MatMul", x, b.weight("lm_head.weight", head.weight.astype(dt)))
            if head.bias is not None:
                logits = b.op("Add", logits, b.weight("lm_head.bias", head.bias.astype(dt)))
            if dt != np.dtype(F32):
                b.op("Cast", logits, to=onnx.TensorProto.FLOAT, output_names=["logits"])
            else:
                b.op("Identity", logits, output_names=["logits"])
    return b.build("llmopt_decoder")


def _qkv_weights(arch: DecoderArch, state: Mapping[str, Any], prefix: str) -> Linear:
    n = arch.names
    t = arch.transposed_linear
    if n.qkv:
        return _linear(state, prefix + n.qkv, t)
    assert n.q and n.k and n.v
    return _concat([_linear(state, prefix + p, t) for p in (n.q, n.k, n.v)])


def _mlp(b: GraphBuilder, arch: DecoderArch, state: Mapping[str, Any], prefix: str, h: str,
         d: DecoderDims, linear: Callable[[str, Linear, str], str], dt: np.dtype) -> str:
    n = arch.names
    t = arch.transposed_linear
    if n.fc_in:
        y = _activation(b, linear(h, _linear(state, prefix + n.fc_in, t), prefix + n.fc_in),
                        d.activation, dt)
    else:
        if n.gate_up:
            gate_up = _linear(state, prefix + n.gate_up, t)
        else:
            assert n.gate and n.up
            gate_up = _concat([_linear(state, prefix + n.gate, t), _linear(state, prefix + n.up, t)])
        fused = linear(h, gate_up, prefix + "mlp.gate_up_proj")
        half = gate_up.weight.shape[1] // 2
        gate, up = b.op("Split", fused, b.const([half, half]), axis=-1, outputs=2)
        y = b.op("Mul", _activation(b, gate, d.activation, dt), up)
    return linear(y, _linear(state, prefix + n.mlp_out, t), prefix + n.mlp_out)


def _rms_norm(b: GraphBuilder, x: str, weight: str, eps: float, dt: np.dtype) -> str:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 as transformers does."""
    if dt != np.dtype(F32):
        x = b.op("Cast", x, to=onnx.TensorProto.FLOAT)
    mean_sq = b.op("ReduceMean", b.op("Mul", x, x), b.const([-1]), keepdims=1)
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean_sq, b.const(eps, F32))))
    y = b.op("Mul", x, inv)
    if dt != np.dtype(F32):
        y = b.op("Cast", y, to=onnx.TensorProto.FLOAT16)
    return b.op("Mul", y, weight)


def _activation(b: GraphBuilder, x: str, kind: str, dt: np.dtype) -> str:
    def c(value: float) -> str:
        return b.const(value, dt)

    with b.scope(kind):
        if kind == "silu":
            return b.op("Mul", x, b.op("Sigmoid", x))
        if kind == "relu":
            return b.op("Relu", x)
        if kind in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cube = b.op("Mul", b.op("Mul", x, x), x)
            inner = b.op("Add", x, b.op("Mul", cube, c(0.044715)))
            t = b.op("Tanh", b.op("Mul", inner, c(math.sqrt(2.0 / math.pi))))
            return b.op("Mul", b.op("Mul", x, c(0.5)), b.op("Add", t, c(1.0)))
        if kind == "gelu":
            erf = b.op("Erf", b.op("Mul", x, c(1.0 / math.sqrt(2.0))))
            return b.op("Mul", b.op("Mul", x, c(0.5)), b.op("Add", erf, c(1.0)))
    raise UnsupportedError(
        f"activation {kind!r} is not supported",
        fix="supported activations: silu, relu, gelu, gelu_new, gelu_pytorch_tanh",
    )


def _attention_bias(b: GraphBuilder, input_ids: str, attention_mask: str,
                    window: int | None) -> str:
    """[B,1,S,T] float32 bias: 0 where query s may attend key t, float32-min elsewhere."""
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
    allowed = b.op("And", pad, allowed)
    return b.op("Where", allowed, b.const(0.0, F32), b.const(MASK_MIN, F32))


def _rotary_tables(b: GraphBuilder, position_ids: str, inv_freq: np.ndarray, scaling: float,
                   dt: np.dtype) -> tuple[str, str]:
    """cos/sin [B,1,S,rot_dim] from positions, computed in float32 as transformers does."""
    pos = b.op("Unsqueeze", b.op("Cast", position_ids, to=onnx.TensorProto.FLOAT), b.const([-1]))
    freqs = b.op("Mul", pos, b.weight("rotary.inv_freq", inv_freq.astype(F32)))  # [B,S,rot/2]
    emb = b.op("Concat", freqs, freqs, axis=-1)
    cos, sin = b.op("Cos", emb), b.op("Sin", emb)
    if scaling != 1.0:
        cos = b.op("Mul", cos, b.const(scaling, F32))
        sin = b.op("Mul", sin, b.const(scaling, F32))
    if dt != np.dtype(F32):
        cos = b.op("Cast", cos, to=onnx.TensorProto.FLOAT16)
        sin = b.op("Cast", sin, to=onnx.TensorProto.FLOAT16)
    axis = b.const([1])
    return b.op("Unsqueeze", cos, axis), b.op("Unsqueeze", sin, axis)


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


def _attention(b: GraphBuilder, h: str, qkv: str, past: tuple[str, str], bias: str,
               cos: str | None, sin: str | None, d: DecoderDims, layer: int,
               dt: np.dtype) -> tuple[str, str, str]:
    r"""Scaled dot-product attention with a KV cache and grouped-query heads.

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
    q, k, v = b.op("Split", qkv, b.const([heads * dim, kv_heads * dim, kv_heads * dim]),
                   axis=-1, outputs=3)
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
    probs = b.op("Softmax", b.op("Add", scores, bias), axis=-1)
    if dt != np.dtype(F32):
        probs = b.op("Cast", probs, to=onnx.TensorProto.FLOAT16)
    if rep > 1:
        probs = b.op("Reshape", probs, b.const([0, kv_heads, -1, 0]))
    out = b.op("MatMul", probs, present_v)
    if rep > 1:
        out = b.op("Reshape", out, b.const([0, heads, -1, dim]))
    out = b.op("Reshape", b.op("Transpose", out, perm=perm), b.const([0, 0, heads * dim]))
    return out, present_k, present_v


def emit(arch: DecoderArch, model: Any, dtype: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The ONNX graph of ``model`` and the KV-cache layout for the manifest."""
    inv_freq, scaling = rotary_parameters(model) if arch.positions == "rotary" else (None, 1.0)
    dims = read_dims(arch, model.config, inv_freq)
    proto = build_decoder(arch, dims, model.state_dict(), inv_freq, scaling, dtype)
    layout = {
        "num_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_kv_heads": dims.num_kv_heads,
        "head_dim": dims.head_dim,
        "dtype": np.dtype(dtype).name,
        "layout": "batch, kv_heads, sequence, head_dim",
        "past_key": "past_key_values.{i}.key",
        "past_value": "past_key_values.{i}.value",
        "present_key": "present.{i}.key",
        "present_value": "present.{i}.value",
        "max_positions": dims.max_positions,
        "sliding_window": dims.sliding_window,
    }
    return proto, layout
