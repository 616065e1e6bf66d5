"""GGUF sources: tiny files in each type export and validate; a file transformers cannot read
(architecture or tensor type) is refused from its header, before any weight is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llmopt
from llmopt.errors import UnsupportedError
from llmopt.exporter import sources
from llmopt.package import Package


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q4_K_M", "Q5_K", "Q8_0", "F16"])
def test_gguf_type_exports_and_validates(tiny_gguf: Any, name: str) -> None:
    path, package = tiny_gguf(name)
    manifest = Package.open(package).manifest
    assert manifest["source"]["kind"] == "gguf" and manifest["source"]["gguf_file"] == path.name
    assert manifest["model_type"] == "llama" and manifest["builder"] == "native"
    validation = manifest["validation"]
    assert validation["passed"], validation
    assert all(g["match"] for g in validation["generation"])


def test_gguf_weights_are_the_dequantized_blocks(tiny_gguf: Any) -> None:
    """The package holds what gguf-py dequantizes (Llama's q rows put back in order)."""
    import gguf
    import onnx

    path, package = tiny_gguf("Q4_K")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in
               onnx.load(str(Package.open(package).model_path)).graph.initializer}
    down = gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data,
                                  gguf.GGMLQuantizationType.Q4_K)
    np.testing.assert_allclose(weights["model.layers.1.mlp.fc_out.weight"], down.T, atol=1e-6)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_encoders_write_what_gguf_reads(kind: str) -> None:
    """tests/tiny_gguf.py's K-quant encoders: gguf-py decodes them to within one step of the
    whole range (a wrong layout scrambles weights by the range itself)."""
    import gguf

    from tests import tiny_gguf

    values = np.random.default_rng(0).normal(0.0, 0.2, (4, 512)).astype(np.float32)
    raw, qtype = tiny_gguf.encode(values, gguf.GGMLQuantizationType[kind])
    back = gguf.quants.dequantize(raw, qtype)
    levels = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[kind]
    assert back.shape == values.shape
    step = float(values.max() - values.min()) / levels
    assert np.max(np.abs(back - values)) <= step


def _unreadable_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(sources, "load_model", refuse)


def test_tensor_type_gguf_cannot_dequantize_is_refused_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from tests import tiny_gguf

    model = _tiny_llama()
    path = tiny_gguf.write(model, tmp_path / "q8k.gguf", "F32")
    # rewrite it with one matrix in Q8_K (llama.cpp's internal dot-product type, no decoder)
    writer = gguf.GGUFWriter(str(tmp_path / "q8k-bad.gguf"), "llama")
    for field in gguf.GGUFReader(path).fields.values():
        if field.name.startswith("llama.") and field.types[0] == gguf.GGUFValueType.UINT32:
            writer.add_uint32(field.name, int(field.parts[-1][0]))
        elif field.name.startswith("llama.") and field.types[0] == gguf.GGUFValueType.FLOAT32:
            writer.add_float32(field.name, float(field.parts[-1][0]))
    for tensor in gguf.GGUFReader(path).tensors:
        data = np.asarray(tensor.data)
        if tensor.name == "blk.0.ffn_down.weight":
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
            raw = np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8)
            writer.add_tensor(tensor.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_K)
        else:
            writer.add_tensor(tensor.name, data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _unreadable_model(monkeypatch)
    with pytest.raises(UnsupportedError, match=r"Q8_K \(1 tensors, e.g. blk.0.ffn_down.weight\)"
                       ) as info:
        llmopt.export(tmp_path / "q8k-bad.gguf", tmp_path / "out")
    assert "Q4_K" in str(info.value.fix) and not (tmp_path / "out" / "model.onnx").exists()


def test_architecture_transformers_cannot_read_is_refused_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import tiny_gguf

    path = tiny_gguf.foreign(tmp_path / "rwkv.gguf", "rwkv6")  # its tensor data cut short
    _unreadable_model(monkeypatch)
    with pytest.raises(UnsupportedError, match="cannot read 'rwkv6' models from GGUF") as info:
        llmopt.export(path, tmp_path / "out")
    assert "Hugging Face checkpoint" in str(info.value.fix)


def _tiny_llama() -> Any:
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)
