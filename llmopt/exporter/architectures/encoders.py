"""Encoder architectures: a few lines each, mapping transformers weights to llmopt's graph."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from llmopt.errors import UnsupportedError
from llmopt.exporter.architecture import register
from llmopt.exporter.encoder import ClassifierHead, EncoderArch, EncoderNames

_BERT_LAYER = EncoderNames(
    word_embed="embeddings.word_embeddings",
    position_embed="embeddings.position_embeddings",
    token_type_embed="embeddings.token_type_embeddings",
    embed_norm="embeddings.LayerNorm",
    layer="encoder.layer.{i}.",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    attn_norm="attention.output.LayerNorm",
    fc_in="intermediate.dense",
    fc_out="output.dense",
    mlp_norm="output.LayerNorm",
)

register(EncoderArch(
    name="bert",
    model_types=("bert",),
    names=_BERT_LAYER,
    head=ClassifierHead(dense="{body}pooler.dense", out="classifier", activation="tanh"),
    notes="BERT, MiniLM and sentence-transformers BERT models (all-MiniLM-L6-v2, BGE, E5, ...)",
))

register(EncoderArch(
    name="roberta",
    model_types=("roberta", "xlm-roberta", "camembert"),
    names=_BERT_LAYER,
    head=ClassifierHead(dense="classifier.dense", out="classifier.out_proj", activation="tanh"),
    positions="padded",
    token_types="folded",  # RoBERTa tokenizers never emit token types; type 0 is folded in
    notes="RoBERTa, XLM-RoBERTa and CamemBERT (same modelling code)",
))

register(EncoderArch(
    name="distilbert",
    model_types=("distilbert",),
    names=EncoderNames(
        word_embed="embeddings.word_embeddings",
        position_embed="embeddings.position_embeddings",
        embed_norm="embeddings.LayerNorm",
        layer="transformer.layer.{i}.",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        attn_norm="sa_layer_norm",
        fc_in="ffn.lin1",
        fc_out="ffn.lin2",
        mlp_norm="output_layer_norm",
    ),
    head=ClassifierHead(dense="pre_classifier", out="classifier", activation="relu"),
    eps_attr=None,  # DistilBERT's LayerNorms use a fixed eps of 1e-12
    act_attr="activation",
))

register(EncoderArch(
    name="electra",
    model_types=("electra",),
    names=replace(_BERT_LAYER, embed_project="embeddings_project"),
    head=ClassifierHead(dense="classifier.dense", out="classifier.out_proj", activation="gelu"),
    notes="ELECTRA discriminators: BERT with a projection from the embedding size (smaller "
    "in the small models) to the hidden size after the embedding norm",
))


def _mpnet_relative_bias(model: Any, length: int) -> np.ndarray:
    """MPNet's shared relative position bias by key - query distance, bucketed by the model's
    own function (T5-style log buckets, as its encoder calls it), so the graph only looks it up."""
    import torch

    encoder = model.encoder
    buckets = encoder.relative_position_bucket(torch.arange(-(length - 1), length))
    with torch.no_grad():
        return encoder.relative_attention_bias.weight[buckets].float().numpy()


def _mpnet_padding(config: Any) -> None:
    pad = getattr(config, "pad_token_id", None)
    if pad not in (None, 1):
        raise UnsupportedError(
            f"MPNet counts positions after padding id 1 whatever the config says, and this "
            f"config's pad_token_id is {pad}",
            fix="export an MPNet whose pad_token_id is 1 (every released one)",
        )


register(EncoderArch(
    name="mpnet",
    model_types=("mpnet",),
    names=EncoderNames(
        word_embed="embeddings.word_embeddings",
        position_embed="embeddings.position_embeddings",
        embed_norm="embeddings.LayerNorm",
        layer="encoder.layer.{i}.",
        q="attention.attn.q",
        k="attention.attn.k",
        v="attention.attn.v",
        o="attention.attn.o",
        attn_norm="attention.LayerNorm",
        fc_in="intermediate.dense",
        fc_out="output.dense",
        mlp_norm="output.LayerNorm",
    ),
    head=ClassifierHead(dense="classifier.dense", out="classifier.out_proj", activation="tanh"),
    positions="padded",
    extra_checks=(_mpnet_padding,),
    relative_bias=_mpnet_relative_bias,
    notes="MPNet (all-mpnet-base-v2 and other sentence-transformers MPNet models): BERT layers "
    "with a relative position bias shared by every layer",
))
