"""GGUF files transformers would load as another model than the one stored (or cannot load, or
llmopt cannot export) are refused from the header alone: every file here has its tensor data cut
short, so the header error is the only one that can come out, and ``gguf.GGUFReader`` (which
maps the tensors) is made to fail too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llmopt
from llmopt.errors import SourceError, UnsupportedError
from llmopt.exporter import gguf_header, sources
from tests import tiny_gguf

HEAD = 64  # tiny_gguf's head width (hidden 256, 4 heads)


def _vector(n: int) -> np.ndarray:
    return np.ones(n, np.float32)


def _experts(layers: int, experts: int = 4) -> dict[str, np.ndarray]:
    stacked = np.zeros((experts, 512, 256), np.float32)
    return {f"blk.{i}.ffn_{w}_exps.weight": stacked for i in range(layers) for w in ("gate", "up")}


# name -> (architecture, extra header keys, extra tensors, the refusal)
REFUSED: dict[str, tuple[str, dict[str, Any], dict[str, np.ndarray], str]] = {
    "llama3 rope_freqs": ("llama", {}, {"rope_freqs.weight": _vector(HEAD // 2)},
                          "Llama 3.1-style RoPE frequency factors"),
    "yarn scaling": ("llama", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, {},
                     r"yarn RoPE scaling \(factor 4.0\) is dropped"),
    "linear scaling": ("gemma3_text", {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0},
                       {}, "linear RoPE scaling"),
    "phi3 longrope": ("phi3", {}, {"rope_factors_long.weight": _vector(HEAD // 2),
                                   "rope_factors_short.weight": _vector(HEAD // 2)},
                      "LongRoPE long factors"),
    "phi3 partial rotary": ("phi3", {"rope.dimension_count": 48}, {},
                            r"rotary width .*the file says 48, transformers would use 64"),
    "stablelm full rotary": ("stablelm", {"rope.dimension_count": HEAD}, {},
                             r"rotary width .*the file says 64, transformers would use 16"),
    "stablelm rope base": ("stablelm", {"rope.freq_base": 100000.0}, {},
                           r"RoPE base .*the file says 100000"),
    "stablelm qk norms": ("stablelm", {}, {"blk.0.attn_q_norm.weight": _vector(HEAD)},
                          "qk_layernorm"),
    "qwen3 head width": ("qwen3", {"attention.key_length": 64}, {},
                         r"head width .*the file says 64, transformers would use 128"),
    "qwen3_moe expert width": ("qwen3_moe", {"expert_feed_forward_length": 32}, {},
                               r"expert width .*the file says 32, transformers would use 768"),
    "mixtral as llama": ("llama", {"expert_count": 4, "expert_used_count": 2}, _experts(2),
                         "Mixtral-style"),
    "falcon new architecture": ("falcon", {"attention.head_count_kv": 2}, {},
                                "new-architecture Falcon"),
    "gemma2 soft-capping": ("gemma2", {"attn_logit_softcapping": 20.0}, {},
                            r"attention soft-capping .*the file says 20"),
}


def _gguf_reader_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf
    import gguf.gguf_reader

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the tensors were mapped before the refusal")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    monkeypatch.setattr(gguf.gguf_reader, "GGUFReader", refuse)
    monkeypatch.setattr(sources, "load_model", refuse)


def _header_only(tmp_path: Path, arch: str, fields: dict[str, Any],
                 tensors: dict[str, np.ndarray]) -> Path:
    path = tiny_gguf.write(tiny_gguf.model(arch), tmp_path / f"{arch}.gguf", "F16",
                           fields=fields, extra_tensors=tensors)
    return tiny_gguf.truncate_weights(path)


@pytest.mark.parametrize("case", REFUSED)
def test_refused_from_the_header_before_any_weight(case: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    arch, fields, tensors, message = REFUSED[case]
    path = _header_only(tmp_path, arch, fields, tensors)
    _gguf_reader_fails(monkeypatch)
    with pytest.raises(UnsupportedError, match=message) as info:
        llmopt.export(path, tmp_path / "out")
    assert "Hugging Face checkpoint" in str(info.value.fix)
    assert not (tmp_path / "out").exists()


def test_the_unaltered_tiny_files_pass_the_header(tmp_path: Path) -> None:
    """The refusals above come from what each case changed: the same files written as
    llama.cpp writes the model (every shape key stated) pass."""
    for arch in ("llama", "phi3", "stablelm", "qwen3", "falcon", "gemma2"):
        path = _header_only(tmp_path, arch, {}, {})
        gguf_header.check(gguf_header.read(path))


def test_qwen3_moe_routing_needs_transformers_5(tmp_path: Path) -> None:
    """llama.cpp renormalizes Qwen3-MoE's top-k routing weights; transformers 5's GGUF loader
    sets norm_topk_prob for it, 4.57's leaves the config class's False: refused there."""
    from transformers.integrations import ggml

    header = gguf_header.read(_header_only(tmp_path, "qwen3_moe", {}, {}))
    if "qwen3_moe" in getattr(ggml, "GGUF_CONFIG_DEFAULTS_MAPPING", {}):
        gguf_header.check(header)
    else:
        with pytest.raises(UnsupportedError, match="norm_topk_prob=False"):
            gguf_header.check(header)


def test_encoder_decoder_is_refused_from_the_header(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_gguf.foreign(tmp_path / "t5.gguf", "t5")
    _gguf_reader_fails(monkeypatch)
    with pytest.raises(UnsupportedError, match=r"encoder-decoder \('t5'\)"):
        llmopt.export(path, tmp_path / "out")


def test_a_header_cut_short_is_a_source_error(tmp_path: Path) -> None:
    path = tiny_gguf.write(tiny_gguf.model("llama"), tmp_path / "cut.gguf", "F16")
    with path.open("r+b") as handle:
        handle.truncate(200)  # inside the tokenizer's keys
    with pytest.raises(SourceError,
                       match=r"could not read GGUF file cut\.gguf: its header is unreadable"):
        llmopt.export(path, tmp_path / "out")


def test_header_reads_what_gguf_reader_reads(tmp_path: Path) -> None:
    """Keys, tensor names, types and shapes as gguf-py's own reader gives them."""
    import gguf

    path = tiny_gguf.build("qwen3_moe", tmp_path / "moe.gguf", "Q4_0")
    header = gguf_header.read(path)
    reader = gguf.GGUFReader(path)
    assert header.tensors == {t.name: (int(t.tensor_type), tuple(int(d) for d in reversed(
        t.shape))) for t in reader.tensors}
    scalars = {name: f.contents() for name, f in reader.fields.items()
               if f.types[0] != gguf.GGUFValueType.ARRAY and not name.startswith("GGUF.")}
    assert {k: v for k, v in header.fields.items() if k in scalars} == scalars
    assert header.fields["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"
                                                                   ].contents()


@pytest.mark.real_model
def test_smollm2_header_passes(smollm2_gguf: Path) -> None:
    header = gguf_header.read(smollm2_gguf)
    gguf_header.check(header)
    assert header.architecture == "llama" and len(header.tensors) == 272

