"""Bytes read per decode step, counted from a graph, and their share of the bandwidth limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmopt.bench.bandwidth import fraction_of_limit, measure_read_bandwidth
from llmopt.bench.traffic import Traffic, mean_decode_context, model_traffic

V, H, POSITIONS, HEAD, KV_HEADS, LAYERS = 50, 8, 32, 4, 2, 2


def _graph(tied: bool, head_dim: int | str = HEAD) -> object:
    """Embedding Gather -> MatMul -> rotary (cos/sin tables) -> LM head; a KV cache input per
    layer and kind, laid out [batch, kv_heads, past, head_dim]."""
    from onnx import TensorProto, helper, numpy_helper

    def weight(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> object:
        return numpy_helper.from_array(np.zeros(shape, dtype), name)

    head = "embed" if tied else "lm_head"
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "proj"], ["y"]),
        helper.make_node("RotaryEmbedding", ["y", "pos", "cos", "sin"], ["r"],
                         domain="com.microsoft"),
        helper.make_node("Transpose", [head], ["head_t"]) if tied else
        helper.make_node("Identity", [head], ["head_t"]),
        helper.make_node("MatMul", ["r", "head_t"], ["logits"]),
    ]
    inits = [weight("embed", (V, H)), weight("proj", (H, H)), weight("cos", (POSITIONS, 2)),
             weight("sin", (POSITIONS, 2))]
    if not tied:
        inits.append(weight("lm_head", (H, V), np.float16))
    cache = ["batch", KV_HEADS, "past", head_dim]
    pasts = [helper.make_tensor_value_info(f"past_key_values.{i}.{k}", TensorProto.FLOAT16,
                                           cache) for i in range(LAYERS) for k in ("key", "value")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
                     helper.make_tensor_value_info("pos", TensorProto.INT64, ["b", "s"]),
                     *pasts],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph)


def test_lookup_tables_count_one_row_and_weights_in_full() -> None:
    traffic = model_traffic(_graph(tied=False))
    assert traffic.weight_bytes == H * H * 4 + H * V * 2  # projection fp32 + fp16 LM head
    assert traffic.lookup_row_bytes == H * 4 + 2 * 2 * 4  # one embedding row, cos and sin rows
    assert traffic.kv_bytes_per_position == LAYERS * 2 * KV_HEADS * HEAD * 2  # fp16 cache
    at_100 = traffic.bytes_per_token(100)
    assert at_100 == traffic.weight_bytes + traffic.lookup_row_bytes + 100 * (
        traffic.kv_bytes_per_position)


def test_a_tied_embedding_is_read_in_full_for_the_lm_head() -> None:
    traffic = model_traffic(_graph(tied=True))
    assert traffic.weight_bytes == H * H * 4 + V * H * 4
    assert traffic.lookup_row_bytes == 2 * 2 * 4


def test_a_symbolic_head_size_needs_its_value() -> None:
    with pytest.raises(ValueError, match="'kv_cache_dim' is symbolic"):
        model_traffic(_graph(tied=True, head_dim="kv_cache_dim"))
    traffic = model_traffic(_graph(tied=True, head_dim="kv_cache_dim"), {"kv_cache_dim": HEAD})
    assert traffic.kv_bytes_per_position == LAYERS * 2 * KV_HEADS * HEAD * 2


def test_an_exported_package_reads_its_manifest_cache_per_position(tiny_package: Path) -> None:
    from llmopt.package import Package

    package = Package.open(tiny_package)
    kv = package.manifest["kv_cache"]
    traffic = model_traffic(package.model_path)
    assert traffic.kv_bytes_per_position == (
        kv["num_layers"] * 2 * kv["num_kv_heads"] * kv["head_dim"] * 4)
    assert 0 < traffic.weight_bytes < package.size_bytes()


def test_decode_context_and_share_of_the_limit() -> None:
    assert mean_decode_context(100, 128) == 164  # steps see 100 .. 227 cached positions
    assert mean_decode_context(100, 1) == 100
    traffic = Traffic(weight_bytes=90_000_000, lookup_row_bytes=0, kv_bytes_per_position=0)
    # 90 MB a token at 100 tokens/s is 9 GB/s: 30% of a 30 GB/s limit
    assert fraction_of_limit(traffic.bytes_per_token(0), 100.0, 30e9) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        fraction_of_limit(1.0, 1.0, 0.0)


def test_the_bandwidth_probe_reads_its_buffer_on_each_thread() -> None:
    probe = measure_read_bandwidth(threads=2, buffer_bytes=8 * 2**20, passes=2)
    assert probe.threads == 2 and probe.passes == 4 and probe.buffer_bytes == 8 * 2**20
    assert probe.bytes_per_s >= probe.median_bytes_per_s > 0
