"""A tiny ONNX Runtime GenAI-style model folder: GenAI's input and output names, a
genai_config.json, and logits anyone can compute by hand (a bigram table plus the mask)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB, LAYERS, KV_HEADS, HEAD_SIZE, CONTEXT = 16, 2, 1, 4, 64


def bigram_table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((VOCAB, VOCAB)).astype(np.float32)


def write_genai_folder(folder: Path) -> Path:
    """logits = table[input_ids] + attention_mask (per position); present.N = past.N."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    past = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    cache = ["batch_size", KV_HEADS, "past_sequence_length", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                            ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              *[helper.make_tensor_value_info(n, TensorProto.FLOAT, cache) for n in past]]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
               *[helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in present]]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["rows"]),
             helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
             helper.make_node("Add", ["rows", "mask3"], ["logits"]),
             *[helper.make_node("Identity", [a], [b]) for a, b in zip(past, present,
                                                                      strict=True)]]
    initializers = [numpy_helper.from_array(bigram_table(), "table"),
                    numpy_helper.from_array(np.array([-1], np.int64), "last")]
    graph = helper.make_graph(nodes, "genai-tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    config = {"model": {
        "context_length": CONTEXT, "type": "llama", "vocab_size": VOCAB,
        "decoder": {"filename": "model.onnx", "head_size": HEAD_SIZE, "hidden_size": 8,
                    "num_attention_heads": 2, "num_hidden_layers": LAYERS,
                    "num_key_value_heads": KV_HEADS,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder
