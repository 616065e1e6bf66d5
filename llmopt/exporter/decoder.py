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
from llmopt.exporter.decoder_graph import WEIGHT_PREFIX, build_decoder
from llmopt.exporter.graph import SKIP_LAYER_NORM_CPU
from llmopt.exporter.ops import Initializers, Linear, concat_linear, state_linear, to_numpy
from llmopt.exporter.weights import DecoderDims, DecoderWeights, LayerWeights, MoeWeights, Norm
from llmopt.package import Package

TASKS = ("text-generation",)
LONGROPE = ("longrope", "su")  # "su": Phi-3's first name for LongRoPE


@dataclass(frozen=True)
class DecoderNames:
    """Where each weight lives in the transformers state dict. ``{i}`` is the layer index.

    Attention is given either as separate ``q``/``k``/``v`` or as one fused ``qkv``; the MLP as
    ``gate`` + ``up`` (gated), a fused ``gate_up`` (gate first), or a plain ``fc_in``.
    ``attn_post_norm``/``mlp_post_norm``: norms on the attention and MLP outputs before their
    residual adds (Gemma 2/3's post_attention/post_feedforward norms); ``None`` elsewhere.
    ``q_norm``/``k_norm``: norms over head_dim after projection, of the arch's norm kind (Qwen3's
    RMSNorm; Phi-2's LayerNorm shared by all heads; StableLM's one LayerNorm per head, stored as
    ``<name>.norms.{h}``). Present only when the state dict has them.
    ``mlp_norm``: ``None``, or absent from the state dict, for a parallel block whose MLP reads
    the attention norm's output (Phi-2, StableLM with ``use_parallel_residual``).
    ``router``/``experts``: a mixture-of-experts MLP (Mixtral): the router linear
    [experts, hidden] and the prefix of the experts' stacked ``gate_up_proj`` [E, 2*inter,
    hidden] (gate first) and ``down_proj`` [E, hidden, inter], transformers 5's layout. A layer
    with experts and no dense MLP gives no ``gate``/``up``/``gate_up``/``fc_in`` and
    ``mlp_out=""``.
    A q/k norm whose weight spans the whole projection (OLMo 2: heads * head_dim) normalizes
    it at once instead of per head.
    """

    embed: str
    layer: str
    attn_norm: str
    o: str
    mlp_out: str
    final_norm: str
    mlp_norm: str | None = None
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
    q_norm: str | None = None
    k_norm: str | None = None
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    router: str | None = None
    experts: str | None = None


@dataclass(frozen=True)
class DecoderArch:
    """A decoder architecture: its names, its kind of norm, positions and MLP."""

    name: str
    model_types: tuple[str, ...]
    names: DecoderNames
    norm: str  # "rms" | "layer"
    positions: str  # "rotary" | "learned"
    eps_attr: str = "rms_norm_eps"
    eps: float | None = None  # the epsilon where the config names none (OPT's nn.LayerNorm, OLMo)
    norm_weights: bool = True  # False: parameter-free norms (OLMo), emitted as ones and zeros
    act_attr: str = "hidden_act"
    transposed_linear: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    sliding_window: Callable[[Any], int | None] = lambda config: None
    kv_heads: Callable[[Any], int | None] = lambda config: None  # else num_key_value_heads
    position_offset: int = 0  # rows before position 0 in the position table (OPT: 2)
    tolerance: float = 2e-3
    min_transformers: str = "4.57"
    tasks: tuple[str, ...] = TASKS
    notes: str = ""
    extra_checks: tuple[Callable[[Any], None], ...] = field(default=())
    # Gemma: RMSNorm weights stored as offsets from 1 (``x * (1 + w)``); folded into the
    # normalized weights, so the graph's norms (and their fusions) stay plain RMSNorms
    norm_offset: float = 0.0
    scale_embeddings: bool = False  # Gemma: token embeddings times sqrt(hidden) (LM head not)
    # which layers the sliding window applies to (None: all of them); Gemma 2/3 alternate
    sliding_layers: Callable[[Any], tuple[bool, ...] | None] = lambda config: None
    # x + attn(attn_norm(x)) + mlp(mlp_norm(x)) instead of two residual steps (GPT-NeoX, Phi-2)
    parallel_residual: Callable[[Any], bool] = lambda config: False
    # a packed qkv whose rows are [heads, 3, head_dim] (GPT-NeoX), reordered to [q | k | v]
    qkv_per_head: bool = False
    pre_norms: bool = True  # False: no norm before attention or the MLP (OLMo 2's blocks)
    kind: str = "decoder"
    builder: str = "native"
    # rewrites an older transformers' state dict into the names ``names`` gives (Mixtral under
    # transformers 4: one module per expert, stacked here); None: the state dict is used as is
    state_upgrade: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None

    def emit(self, model: Any, dtype: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
        return emit(self, model, dtype)

    def reemit(self, package: Package, tensors: Mapping[str, np.ndarray],
               fusions: frozenset[str], dtype: str,
               gqa: bool | None = None) -> tuple[onnx.ModelProto, dict[str, str]]:
        return reemit(self, package, tensors, fusions, dtype, gqa)

    def validate(self, model: Any, session: Any, layout: dict[str, Any], tokenizer: Any,
                 tolerance: float, generation_tokens: int) -> dict[str, Any]:
        from llmopt.exporter.validate import TorchReference, validate_decoder

        return validate_decoder(TorchReference(model), session, layout, tokenizer, tolerance,
                                generation_tokens)


def longrope_switch(config: Any) -> int | None:
    """LongRoPE's switch point as transformers decides it (``max(position_ids) + 1`` above it
    selects the long factors), or None when the config's RoPE is not LongRoPE."""
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) not in LONGROPE:
        return None
    original = (rope.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None)
                or config.max_position_embeddings)
    return int(original)


def read_dims(arch: DecoderArch, config: Any, inv_freq: np.ndarray | None,
              rope_scaling: float = 1.0, rope_scaling_local: float = 1.0) -> DecoderDims:
    for check in arch.extra_checks:
        check(config)
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(arch.kv_heads(config) or getattr(config, "num_key_value_heads", None)
                   or heads)
    if heads % kv_heads:
        raise UnsupportedError(f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
    layers = int(config.num_hidden_layers)
    scale = 1.0 / math.sqrt(head_dim)
    if getattr(config, "attention_multiplier", None) is not None:  # Granite: replaces 1/sqrt(D)
        scale = float(config.attention_multiplier)
    if getattr(config, "query_pre_attn_scalar", None) is not None:  # Gemma 2/3
        scale = float(config.query_pre_attn_scalar) ** -0.5
    if arch.positions == "learned" and not getattr(config, "scale_attn_weights", True):
        scale = 1.0
    by_layer = getattr(config, "scale_attn_by_inverse_layer_idx", False)
    layer_scales = tuple(1.0 / (i + 1) if by_layer else 1.0 for i in range(layers))
    embedding_multiplier = float(getattr(config, "embedding_multiplier", 1.0) or 1.0)
    if arch.scale_embeddings:
        embedding_multiplier = math.sqrt(hidden)
    sliding_layers = arch.sliding_layers(config)
    if sliding_layers is not None and len(sliding_layers) != layers:
        raise UnsupportedError(f"{len(sliding_layers)} layer types for {layers} layers",
                               fix="give config.layer_types one entry per layer")
    return DecoderDims(
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=hidden,
        vocab=int(config.vocab_size),
        eps=float(arch.eps if arch.eps is not None else getattr(config, arch.eps_attr)),
        activation=str(getattr(config, arch.act_attr)),
        max_positions=int(config.max_position_embeddings),
        sliding_window=arch.sliding_window(config),
        rotary_dim=0 if inv_freq is None else 2 * len(inv_freq),
        attention_scale=scale,
        layer_scales=layer_scales,
        rope_scaling=rope_scaling,
        embedding_multiplier=embedding_multiplier,
        residual_multiplier=float(getattr(config, "residual_multiplier", 1.0) or 1.0),
        logits_scaling=float(getattr(config, "logits_scaling", 1.0) or 1.0),
        sliding_layers=tuple(sliding_layers or ()),
        attn_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        final_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
        rope_scaling_local=rope_scaling_local,
        clip_qkv=float(clip) if (clip := getattr(config, "clip_qkv", None)) is not None else None,
        parallel_residual=bool(arch.parallel_residual(config)),
        long_rope_after=longrope_switch(config) if inv_freq is not None else None,
        **_expert_dims(arch, config),
    )


def _expert_dims(arch: DecoderArch, config: Any) -> dict[str, Any]:
    """Experts, experts per token, renormalization: Mixtral's ``num_local_experts`` or Qwen's
    ``num_experts``; ``norm_topk_prob`` where the config has it (Mixtral always renormalizes)."""
    if arch.names.router is None:
        return {}
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0)
    return {"num_experts": int(experts or 0), "experts_per_token": int(config.num_experts_per_tok),
            "normalize_top_k": bool(getattr(config, "norm_topk_prob", True))}


def rotary_parameters(model: Any, layer_type: str = "full_attention"
                      ) -> tuple[np.ndarray | None, float]:
    """``inv_freq`` and the attention scaling of the model's rotary embedding, if it has one.

    Taken from the instantiated PyTorch module, so every static RoPE scaling transformers
    implements (linear, llama3, yarn, ...) comes out right without llmopt re-deriving it.
    Gemma 3 has one table per layer type: transformers 5 keeps them in one module as
    ``{layer_type}_inv_freq``, 4.57 in ``rotary_emb`` and ``rotary_emb_local`` (sliding).
    """
    for name, module in model.named_modules():
        inv_freq = getattr(module, f"{layer_type}_inv_freq", None)
        scaling = getattr(module, f"{layer_type}_attention_scaling", 1.0)
        rope_type: Any = getattr(module, "rope_type", "default")
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(layer_type, "default")
        if inv_freq is None and name.endswith("rotary_emb_local") == (
                layer_type == "sliding_attention"):
            inv_freq = getattr(module, "inv_freq", None)
            scaling = getattr(module, "attention_scaling", 1.0)
        if inv_freq is None:
            continue
        if str(rope_type) == "dynamic":
            raise UnsupportedError(
                f"RoPE scaling {rope_type!r} changes with sequence length and is not exported yet",
                fix="export a variant with static RoPE (e.g. the 4k-context model)",
            )
        if str(rope_type) in LONGROPE:  # the short factors' table; see longrope_inv_freq
            inv_freq = getattr(module, "original_inv_freq", inv_freq)
        return inv_freq.detach().float().cpu().numpy(), float(scaling)
    return None, 1.0


def longrope_inv_freq(model: Any) -> np.ndarray | None:
    """LongRoPE's long-factor inverse frequencies, from transformers' own LongRoPE init at a
    length past the switch point; None when the model's RoPE is not LongRoPE."""
    for module in model.modules():
        if getattr(module, "inv_freq", None) is None or \
                str(getattr(module, "rope_type", "")) not in LONGROPE:
            continue
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = getattr(module, "config", model.config)
        switch = longrope_switch(config)
        if switch is None:
            return None
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=switch + 1)
        return np.asarray(long_inv_freq.detach().float().cpu().numpy())
    return None


def weights_from_state(arch: DecoderArch, dims: DecoderDims, state: Mapping[str, Any],
                       inv_freq: np.ndarray | None,
                       inv_freq_local: np.ndarray | None = None,
                       long_inv_freq: np.ndarray | None = None) -> DecoderWeights:
    """Normalize a transformers state dict through the architecture's names."""
    n, t = arch.names, arch.transposed_linear

    def norm(prefix: str) -> Norm:
        if not arch.norm_weights:  # parameter-free: the identity affine transform
            ones = np.ones(dims.hidden, np.float32)
            return Norm(ones, np.zeros_like(ones) if arch.norm == "layer" else None)
        bias = state.get(f"{prefix}.bias")
        weight = to_numpy(state[f"{prefix}.weight"])
        if arch.norm_offset:  # Gemma's 1 + w, in float32 as transformers computes it
            weight = weight + np.float32(arch.norm_offset)
        return Norm(weight, None if bias is None else to_numpy(bias))

    def optional_norm(prefix: str, name: str | None) -> Norm | None:
        return norm(prefix + name) if name else None

    def head_norm(prefix: str) -> Norm | None:
        """A q/k norm if the model has one: shared by all heads, or one per head, stacked."""
        if f"{prefix}.weight" in state:
            return norm(prefix)
        if f"{prefix}.norms.0.weight" not in state:
            return None
        heads = [norm(f"{prefix}.norms.{h}") for h in range(_count(state, f"{prefix}.norms."))]
        biases = [x.bias for x in heads if x.bias is not None]
        return Norm(np.stack([x.weight for x in heads]),
                    np.stack(biases) if len(biases) == len(heads) else None)

    layers = []
    for i in range(dims.num_layers):
        p = n.layer.format(i=i)
        if n.qkv:
            qkv = state_linear(state, p + n.qkv, t)
            if arch.qkv_per_head:
                qkv = _per_head_to_split(qkv, dims.num_heads)
        else:
            assert n.q and n.k and n.v
            qkv = concat_linear([state_linear(state, p + x, t) for x in (n.q, n.k, n.v)])
        mlp_in: Linear | None = None
        mlp_out: Linear | None = None
        gated = True
        r = dims.residual_multiplier
        if n.fc_in:
            mlp_in, gated = state_linear(state, p + n.fc_in, t), False
        elif n.gate_up:
            mlp_in = state_linear(state, p + n.gate_up, t)
        elif n.gate and n.up:
            mlp_in = concat_linear([state_linear(state, p + n.gate, t),
                                    state_linear(state, p + n.up, t)])
        if mlp_in is not None:
            mlp_out = _scaled(state_linear(state, p + n.mlp_out, t), r)
        attn_norm = norm(p + n.attn_norm) if arch.pre_norms else None
        shared = arch.pre_norms and dims.parallel_residual and (
            n.mlp_norm is None or f"{p}{n.mlp_norm}.weight" not in state)
        if n.mlp_norm is None and not shared and arch.pre_norms:
            raise UnsupportedError(f"{arch.name}: a sequential block needs names.mlp_norm",
                                   fix="name the norm before the MLP in the description")
        layers.append(LayerWeights(
            attn_norm, qkv, _scaled(state_linear(state, p + n.o, t), r),
            attn_norm if shared or not arch.pre_norms else norm(p + str(n.mlp_norm)),
            mlp_in, mlp_out, gated,
            q_norm=head_norm(p + n.q_norm) if n.q_norm else None,
            k_norm=head_norm(p + n.k_norm) if n.k_norm else None,
            attn_post_norm=optional_norm(p, n.attn_post_norm),
            mlp_post_norm=optional_norm(p, n.mlp_post_norm),
            shared_norm=shared,
            moe=_experts_from_state(state, p, n, r)))
    # transformers 5 renamed some heads to lm_head (GPT-NeoX's embed_out); absent: tied
    head = next((x for x in (n.lm_head, "lm_head") if f"{x}.weight" in state),
                n.embed.removesuffix(".weight"))
    return DecoderWeights(
        embed=to_numpy(state[n.embed]) * np.float32(dims.embedding_multiplier),
        position_embed=(to_numpy(state[n.position_embed])[arch.position_offset:]
                        if n.position_embed else None),
        layers=layers,
        final_norm=norm(n.final_norm),
        lm_head=_scaled(state_linear(state, head, transposed=False), 1.0 / dims.logits_scaling),
        inv_freq=inv_freq,
        inv_freq_local=inv_freq_local,
        long_inv_freq=long_inv_freq,
    )


def _count(state: Mapping[str, Any], prefix: str) -> int:
    """How many ``prefix{h}.weight`` entries the state dict has (h = 0, 1, ...)."""
    h = 0
    while f"{prefix}{h}.weight" in state:
        h += 1
    return h


def _per_head_to_split(qkv: Linear, heads: int) -> Linear:
    """GPT-NeoX packs q, k and v per head (output channels [heads, 3, head_dim]); llmopt's
    graph splits [q | k | v], so reorder the columns once, at load."""
    rows, cols = qkv.weight.shape
    dim = cols // (3 * heads)
    weight = qkv.weight.reshape(rows, heads, 3, dim).transpose(0, 2, 1, 3).reshape(rows, cols)
    bias = None
    if qkv.bias is not None:
        bias = qkv.bias.reshape(heads, 3, dim).transpose(1, 0, 2).reshape(cols)
    return Linear(np.ascontiguousarray(weight), bias)


def _experts_from_state(state: Mapping[str, Any], p: str, n: DecoderNames,
                        factor: float) -> MoeWeights | None:
    """The router and the stacked experts, turned to [in, out] per expert for MatMul."""
    if n.router is None or n.experts is None:
        return None
    gate_up = to_numpy(state[f"{p}{n.experts}.gate_up_proj"]).transpose(0, 2, 1)
    down = to_numpy(state[f"{p}{n.experts}.down_proj"]).transpose(0, 2, 1)
    down = np.ascontiguousarray(down * np.float32(factor))
    return MoeWeights(state_linear(state, p + n.router, transposed=False),
                      np.ascontiguousarray(gate_up), down)


def stack_experts(state: Mapping[str, Any], old: str, new: str, gate: str, up: str,
                  down: str) -> dict[str, Any]:
    """A transformers-4 state dict with one module per expert (``{old}.experts.{e}.{gate}``...)
    rewritten into transformers 5's stacked layout under ``new`` (``{new}.experts.gate_up_proj``
    [E, 2*inter, hidden], ``{new}.experts.down_proj`` [E, hidden, inter], ``{new}.gate``)."""
    out: dict[str, Any] = {}
    experts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in state.items():
        prefix, sep, rest = key.partition(f"{old}.")
        if not sep:
            out[key] = value
            continue
        index, _, part = rest.removeprefix("experts.").partition(".")
        if not rest.startswith("experts.") or not index.isdigit():  # not one expert's weight
            out[f"{prefix}{new}.{rest}"] = value
            continue
        experts.setdefault(prefix, {}).setdefault(int(index), {})[part] = to_numpy(value)
    for prefix, by_index in experts.items():
        ordered = [by_index[e] for e in sorted(by_index)]
        out[f"{prefix}{new}.experts.gate_up_proj"] = np.stack(
            [np.concatenate([x[f"{gate}.weight"], x[f"{up}.weight"]]) for x in ordered])
        out[f"{prefix}{new}.experts.down_proj"] = np.stack([x[f"{down}.weight"] for x in ordered])
    return out


def _scaled(lin: Linear, factor: float) -> Linear:
    """``lin`` times a constant: (xW + b) * f = x(fW) + fb. Folding Granite's multipliers into
    the weights keeps the graph (and every fusion) the same as Llama's; the multiplied weights
    are what the ONNX initializers hold, so re-reading them does not fold twice."""
    if factor == 1.0:
        return lin
    f = np.float32(factor)
    return Linear(lin.weight * f, None if lin.bias is None else lin.bias * f)


def weights_from_onnx(tensors: Mapping[str, np.ndarray], num_layers: int) -> DecoderWeights:
    """Recover the weights from an llmopt decoder graph's initializers (by their stable names),
    so later stages can re-emit the graph in another form."""

    found = Initializers(tensors)
    get, need, linear = found.get, found.need, found.linear

    def norm(name: str) -> Norm:
        return Norm(need(f"{name}.weight"), get(f"{name}.bias"))

    def optional_norm(name: str) -> Norm | None:
        return norm(name) if f"{name}.weight" in found else None

    layers = []
    for i in range(num_layers):
        p = f"{WEIGHT_PREFIX}.layers.{i}."
        gated = f"{p}mlp.gate_up_proj.weight" in tensors
        dense = gated or f"{p}mlp.fc_in.weight" in tensors
        q_norm, k_norm = (get(f"{p}attn.{x}_norm.weight") for x in "qk")
        attn_norm = optional_norm(p + "attn_norm")  # None: no pre-norms (OLMo 2)
        shared = f"{p}mlp_norm.weight" not in tensors  # parallel block, one norm (or none)
        layers.append(LayerWeights(
            attn_norm, linear(p + "attn.qkv_proj"), linear(p + "attn.o_proj"),
            attn_norm if shared else norm(p + "mlp_norm"),
            linear(p + ("mlp.gate_up_proj" if gated else "mlp.fc_in")) if dense else None,
            linear(p + "mlp.fc_out") if dense else None, gated,
            q_norm=None if q_norm is None else Norm(q_norm, get(f"{p}attn.q_norm.bias")),
            k_norm=None if k_norm is None else Norm(k_norm, get(f"{p}attn.k_norm.bias")),
            attn_post_norm=optional_norm(p + "attn_post_norm"),
            mlp_post_norm=optional_norm(p + "mlp_post_norm"),
            shared_norm=shared,
            moe=_experts_from_onnx(found, p)))
    return DecoderWeights(
        embed=need(f"{WEIGHT_PREFIX}.embed.weight"),
        position_embed=get(f"{WEIGHT_PREFIX}.position_embed.weight"),
        layers=layers,
        final_norm=norm(f"{WEIGHT_PREFIX}.final_norm"),
        lm_head=linear(f"{WEIGHT_PREFIX}.lm_head"),
        inv_freq=get(f"{WEIGHT_PREFIX}.rotary.inv_freq"),
        inv_freq_local=get(f"{WEIGHT_PREFIX}.rotary_local.inv_freq"),
        long_inv_freq=get(f"{WEIGHT_PREFIX}.rotary.long_inv_freq"),
    )


def _experts_from_onnx(found: Initializers, p: str) -> MoeWeights | None:
    """The experts in either graph form: one MatMul weight per expert (export,
    ``moe.experts.{e}.gate_up_proj.weight``) or stacked for ONNX Runtime's ``MoE`` op
    (optimize, ``moe.fc1.weight`` [E, 2*inter, hidden] with gate and up interleaved)."""
    router = found.get(f"{p}moe.router.weight")
    if router is None:
        return None
    fc1 = found.get(f"{p}moe.fc1.weight")
    if fc1 is not None:
        gate_up = np.concatenate([fc1[:, 0::2], fc1[:, 1::2]], axis=1).transpose(0, 2, 1)
        down = found.need(f"{p}moe.fc2.weight").transpose(0, 2, 1)
    else:
        count = router.shape[1]
        gate_up = np.stack([found.need(f"{p}moe.experts.{e}.gate_up_proj.weight")
                            for e in range(count)])
        down = np.stack([found.need(f"{p}moe.experts.{e}.down_proj.weight")
                         for e in range(count)])
    return MoeWeights(Linear(router, None), np.ascontiguousarray(gate_up),
                      np.ascontiguousarray(down))


def emit(arch: DecoderArch, model: Any, dtype: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The ONNX graph of ``model`` and the KV-cache layout for the manifest."""
    inv_freq, scaling = rotary_parameters(model) if arch.positions == "rotary" else (None, 1.0)
    local_freq, local_scaling = (rotary_parameters(model, "sliding_attention")
                                 if arch.positions == "rotary" else (None, 1.0))
    if inv_freq is None and local_freq is not None:
        # every layer sliding (a Gemma 3 shorter than its pattern): transformers 5 builds the
        # sliding table only, which is then the one table every layer uses
        inv_freq, scaling, local_freq = local_freq, local_scaling, None
    dims = read_dims(arch, model.config, inv_freq, scaling, local_scaling)
    long_freq = longrope_inv_freq(model) if dims.long_rope_after is not None else None
    state = model.state_dict()
    if arch.state_upgrade is not None:
        state = arch.state_upgrade(state)
    weights = weights_from_state(arch, dims, state, inv_freq, local_freq, long_freq)
    proto = build_decoder(dims, weights, arch.norm, dtype)
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
        "rope_attention_scaling": dims.rope_scaling,
    }
    if local_freq is not None:
        layout["rope_local_attention_scaling"] = dims.rope_scaling_local
    if long_freq is not None:
        layout["rope_long_after"] = dims.long_rope_after
    return proto, layout


def reemit(arch: DecoderArch, package: Package, tensors: Mapping[str, np.ndarray],
           fusions: frozenset[str], dtype: str,
           gqa: bool | None) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``package``'s decoder graph emitted again from its initializers ``tensors`` with
    ``fusions``, in ``dtype`` (``gqa``: see ``build_decoder``); and why each requested fusion
    that cannot fire does not."""
    from transformers import AutoConfig

    kv = package.kv_cache
    weights = weights_from_onnx(tensors, int(kv["num_layers"]))
    config = AutoConfig.from_pretrained(str(package.path))
    dims = read_dims(arch, config, weights.inv_freq,
                     float(kv.get("rope_attention_scaling") or 1.0),
                     float(kv.get("rope_local_attention_scaling") or 1.0))
    notes = {}
    if weights.inv_freq is None and "attention" in fusions:
        notes["rotary"] = "not applicable: learned absolute positions"
    if arch.norm == "layer" and "norm" in fusions:
        notes["norm"] = "not applicable: LayerNormalization is already one op"
    if "skip_norm" in fusions and arch.norm == "layer" and np.dtype(dtype) == np.float32:
        notes["skip_norm"] = SKIP_LAYER_NORM_CPU
    elif "skip_norm" in fusions and dims.parallel_residual:
        notes["skip_norm"] = ("parallel attention + MLP: one residual Add + norm a layer to "
                              "fuse; attention and MLP outputs are summed by a plain Add")
    if "activation" in fusions and not dims.activation.startswith("gelu"):
        notes["activation"] = (f"not applicable: {dims.activation} (ONNX Runtime fuses "
                               "Sigmoid*Mul itself)")
    if dims.num_experts and dims.activation != "silu":
        notes["moe"] = f"ONNX Runtime's MoE takes SwiGLU experts, not {dims.activation}"
    elif dims.num_experts and not dims.normalize_top_k:
        notes["moe"] = "not fused: unnormalized top-k routing (ONNX Runtime 1.31 disagrees)"
    return build_decoder(dims, weights, arch.norm, np.dtype(dtype), fusions, gqa), notes
