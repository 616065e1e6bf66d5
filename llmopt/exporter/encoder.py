"""Bidirectional encoders (BERT and its descendants) as one ONNX graph.

Inputs ``input_ids [B,S]``, ``attention_mask [B,S]`` and, where the model has more than one
token type, ``token_type_ids [B,S]``; the output is ``last_hidden_state [B,S,H]`` for
feature extraction or ``logits [B,num_labels]`` for text classification, always float32.
Sequences are right-padded (the encoder convention); padded keys are masked out.

As for decoders, the graph is emitted by a small architecture description rather than traced,
and validated against PyTorch. The description reads the weights into their normalized form
(:class:`~llmopt.exporter.weights.EncoderWeights`), taken from a transformers state dict at
export or from a package's own initializers when ``optimize`` re-emits the graph in its fused
form (``encoder_graph.py``).

How the source model pools token states into a sentence embedding (sentence-transformers'
``modules.json``, read by ``pooling.py``) goes into the manifest layout, so a runtime can
reproduce it without the graph hard-coding one choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from llmopt.errors import UnsupportedError
from llmopt.exporter.encoder_graph import (
    ATTN_NORM,
    ATTN_OUT,
    EMBED_NORM,
    EMBED_PROJECT,
    FC_IN,
    FC_OUT,
    HEAD_DENSE,
    HEAD_OUT,
    LAYER,
    MLP_NORM,
    POSITION_EMBED,
    QKV,
    RELATIVE_BIAS,
    TOKEN_TYPE_EMBED,
    WORD_EMBED,
    build_encoder,
)
from llmopt.exporter.graph import SKIP_LAYER_NORM_CPU
from llmopt.exporter.ops import Initializers, Linear
from llmopt.exporter.ops import concat_linear as _concat
from llmopt.exporter.ops import state_linear as _linear
from llmopt.exporter.ops import to_numpy as _array
from llmopt.exporter.pooling import pooling
from llmopt.exporter.weights import EncoderDims, EncoderLayerWeights, EncoderWeights, Norm
from llmopt.package import Package

TASKS = ("feature-extraction", "text-classification")


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

    def reemit(self, package: Package, tensors: Mapping[str, np.ndarray],
               fusions: frozenset[str], dtype: str,
               gqa: bool | None = None) -> tuple[onnx.ModelProto, dict[str, str]]:
        """``gqa`` is the decoders' choice of attention op; an encoder has one."""
        return reemit(self, package, tensors, fusions, dtype)

    def validate(self, model: Any, session: Any, layout: dict[str, Any], tokenizer: Any,
                 tolerance: float, generation_tokens: int) -> dict[str, Any]:
        from llmopt.exporter.validate import validate_encoder

        return validate_encoder(model, session, layout, tokenizer, tolerance, generation_tokens)


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


def reemit(arch: EncoderArch, package: Package, tensors: Mapping[str, np.ndarray],
           fusions: frozenset[str], dtype: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``package``'s encoder graph emitted again from its initializers ``tensors`` with
    ``fusions``, in ``dtype``; and why each requested fusion that cannot fire does not."""
    from transformers import AutoConfig

    layout: Mapping[str, Any] = package.manifest.encoder or {}
    config = AutoConfig.from_pretrained(str(package.path))
    dims = read_dims(arch, config, "token_type_ids" in layout.get("inputs", ()))
    weights = weights_from_onnx(tensors, dims.num_layers)
    classifier = package.task == "text-classification"
    labels = package.manifest.labels
    if (weights.head is not None) != classifier or (
            weights.head is not None and labels
            and weights.head[1].weight.shape[1] != len(labels)):
        raise UnsupportedError(f"{package.path}: the graph's head does not match its task "
                               f"{package.task!r} and labels",
                               fix="re-export the package with `llmopt export`")
    notes = {}
    if "norm" in fusions:
        notes["norm"] = "not applicable: LayerNormalization is already one op"
    if "skip_norm" in fusions and np.dtype(dtype) == np.float32:
        notes["skip_norm"] = SKIP_LAYER_NORM_CPU
    if "activation" in fusions and not dims.activation.startswith("gelu"):
        notes["activation"] = f"not applicable: {dims.activation} is already one op"
    return build_encoder(dims, weights, np.dtype(dtype), fusions), notes
