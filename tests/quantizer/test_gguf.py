"""int4 from GGUF sources: Q4_0/Q4_1/Q4_K blocks decode exactly as gguf-py dequantizes them; a
package exported from a Q4_0 or Q4_K file reuses them, and with fp32 compute (accuracy level
1) computes what the dequantized fp32 package computes; other types are requantized."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import llmopt
from llmopt.errors import UnsupportedError
from llmopt.package import Package
from llmopt.quantizer import QuantizeOptions, quantize
from llmopt.quantizer import gguf as reuse
from llmopt.runtime.kv import position_ids
from tests.test_manifest import assert_round_trips

LAYERS = 2  # tests/tiny_gguf.py
LAYER_WEIGHTS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.fc_out")


def _random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in ``kind``'s layout with finite fp16 scales (and, for Q4_K, some
    sub-blocks whose 6-bit scale is 0)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = 2 if kind in ("Q4_1", "Q4_K") else 1
    raw[..., :2 * halves] = rng.uniform(-0.05, 0.05, (rows, cols // block, halves)).astype(
        np.float16).view(np.uint8)
    if kind == "Q4_K":
        # first super-block: 6-bit scales 0 (constant sub-blocks) for sub-block 0 (scale
        # byte 0) and 4 (top bits in scale byte 0, low bits in scale byte 8)
        raw[0, 0, 4] = 0
        raw[0, 0, 12] &= 0xF0
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_blocks_decode_as_gguf_dequantizes(kind: str) -> None:
    import gguf

    raw = _random_blocks(kind, 6, 512)
    tensor = SimpleNamespace(tensor_type=gguf.GGMLQuantizationType[kind], data=raw)
    blocks = reuse._blocks(tensor)
    assert blocks.codes.shape == (6, 16, 32) and blocks.codes.max() <= 15
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])  # [rows, cols]
    np.testing.assert_allclose(blocks.dequantize().T, want, rtol=1e-5, atol=1e-6)
    if kind == "Q4_K":
        for sub in (0, 4):
            constant = want[0, 32 * sub:32 * sub + 32]
            assert np.all(constant == constant[0]) and blocks.scales[0, sub] == constant[0]


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_K"])
def test_lm_head_blocks_widen_to_exact_8_bits(kind: str) -> None:
    import gguf

    raw = (gguf.quants.quantize(np.random.default_rng(1).normal(0, 0.1, (4, 256)).astype(
        np.float32), gguf.GGMLQuantizationType.Q8_0) if kind == "Q8_0" else
        _random_blocks(kind, 4, 256))
    tensor = SimpleNamespace(tensor_type=gguf.GGMLQuantizationType[kind], data=raw)
    head = reuse._lm_head_blocks(tensor)
    assert head is not None and head.bits == 8
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    # a float zero point + 120 keeps ~17 bits of its fraction: float rounding, not a new grid
    np.testing.assert_allclose(head.dequantize().T, want, rtol=1e-4, atol=1e-6)


def _logits(package: Any, window: np.ndarray) -> np.ndarray:
    generator = llmopt.load(package)
    mask = np.ones_like(window)
    logits, _ = generator.model.forward(window, mask, position_ids(mask),
                                        generator.model.empty_past(window.shape[0]))
    return np.asarray(logits)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K"])
def test_int4_reuses_the_blocks_and_computes_the_fp32_package(tiny_gguf: Any, name: str,
                                                             tmp_path: Path) -> None:
    """Every layer weight and the tied LM head keep the file's codes; with fp32 compute nothing
    is rounded, so the logits are the dequantized fp32 package's."""
    _, fp32 = tiny_gguf(name)
    options = QuantizeOptions.int4().with_(accuracy_level=1, evaluate=False)
    result = quantize(fp32, tmp_path / "int4", options)
    assert_round_trips(fp32)
    assert_round_trips(result)
    step = result.manifest["steps"][-1]
    assert step["method"] == "int4_gguf" and step["algorithm_used"] == "gguf"
    weights = [f"model.layers.{i}.{w}.weight" for i in range(LAYERS) for w in LAYER_WEIGHTS]
    assert step["reused"] == {**dict.fromkeys(weights, name), "model.lm_head.weight": name}
    assert step["requantized"] == {} and step["kept_float"] == {}
    # Q4_0's zero point 8 is MatMulNBits' own; Q4_K's float ones need the correction
    assert step["zero_point_corrections"] == (0 if name == "Q4_0" else len(weights) + 1)
    window = np.random.default_rng(0).integers(3, 90, (2, 24))
    got, want = _logits(result, window), _logits(fp32, window)
    assert np.max(np.abs(got - want)) <= 2e-3 * max(1.0, float(np.max(np.abs(want))))
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_wider_types_beside_q4_k_are_requantized(tiny_gguf: Any, tmp_path: Path) -> None:
    """A Q4_K_M-like file: q/k/gate/up/o reused, v and down (Q6_K) requantized to 4 bits
    from the package's float weights, and the int4 package still follows the fp32 one."""
    _, fp32 = tiny_gguf("Q4_K_M")
    options = QuantizeOptions.int4().with_(accuracy_level=1, evaluate=False)
    step = quantize(fp32, tmp_path / "int4", options).manifest["steps"][-1]
    assert step["method"] == "int4_gguf"
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        assert step["reused"][f"{layer}.attn.qkv_proj.weight"] == "Q4_K"
        assert step["requantized"][f"{layer}.attn.qkv_proj.weight"] == "attn_v Q6_K"
        assert f"{layer}.mlp.fc_out.weight" not in step["reused"]
        assert step["requantized"][f"{layer}.mlp.fc_out.weight"] == "ffn_down Q6_K"
    window = np.random.default_rng(0).integers(3, 90, (1, 24))
    got, want = _logits(tmp_path / "int4", window), _logits(fp32, window)
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.75


def test_a_weight_the_package_changed_is_requantized(tiny_gguf: Any, tmp_path: Path) -> None:
    """A weight that no longer equals the file's blocks (a builder folding a scale into it)
    is requantized from the package, not replaced by the file's codes, nor an error."""
    import shutil

    import onnx

    _, fp32 = tiny_gguf("Q4_0")
    changed = tmp_path / "changed"
    shutil.copytree(fp32, changed)
    proto = onnx.load(str(Package.open(changed).model_path))
    name = "model.layers.1.attn.o_proj.weight"
    for tensor in proto.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(
                onnx.numpy_helper.to_array(tensor) * np.float32(0.5), name))
    onnx.save(proto, str(Package.open(changed).model_path))
    options = QuantizeOptions.int4().with_(evaluate=False)
    step = quantize(changed, tmp_path / "int4", options).manifest["steps"][-1]
    assert step["requantized"] == {name: "attn_output Q4_0 (not the package's weight)"}
    assert name not in step["reused"] and len(step["reused"]) == len(LAYER_WEIGHTS) * LAYERS


def test_types_without_4_bit_blocks_are_requantized(tiny_gguf: Any, tmp_path: Path) -> None:
    """A Q8_0 file has no 4-bit blocks: auto requantizes its float weights like any source,
    and asking for the GGUF blocks says so."""
    _, fp32 = tiny_gguf("Q8_0")
    result = quantize(fp32, tmp_path / "int4", QuantizeOptions.int4().with_(evaluate=False))
    assert result.manifest["steps"][-1]["algorithm_used"] != "gguf"
    with pytest.raises(UnsupportedError, match="no Q4_0/Q4_1/Q4_K layer weights"):
        quantize(Package.open(fp32), tmp_path / "gguf", QuantizeOptions.int4(algorithm="gguf"))
