"""SmolLM2-135M-Instruct (real weights): fused fp32 still matches PyTorch; int8 and int4 keep
perplexity within budget; int4 from the Q4_1 GGUF reuses its blocks exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import llmopt
from llmopt.optimizer import optimize
from llmopt.quantizer import QuantizeOptions, quantize
from tests.runtime.test_real_smollm2 import CHAT_PROMPTS, _torch_chat_greedy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def fused(smollm2_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "package"
    optimize(smollm2_package, out)
    return out


def test_fused_fp32_matches_pytorch_greedy(fused: Path, smollm2_torch: Any) -> None:
    generator = llmopt.load(fused)
    manifest = generator.package.manifest
    assert manifest["validation"]["passed"]
    assert manifest["steps"][-1]["nodes_after"] < manifest["steps"][-1]["nodes_before"] / 3
    for prompt in CHAT_PROMPTS[:3]:
        ours = generator.generate(prompt, chat=True, max_new_tokens=32).token_ids
        assert ours == _torch_chat_greedy(smollm2_torch, generator.tokenizer, prompt, 32)


def test_int8_perplexity_within_3_percent(fused: Path, tmp_path: Path) -> None:
    fidelity = quantize(fused, tmp_path / "int8", QuantizeOptions.int8()).manifest["fidelity"]
    assert fidelity["perplexity_delta_pct"] <= 3.0, fidelity
    assert fidelity["size_bytes"] < 0.6 * fidelity["against_size_bytes"]
    print("int8", fidelity["perplexity_delta_pct"], fidelity["top1_agreement"],
          fidelity["greedy_agreement"])


def test_int4_from_gguf_reuses_blocks_exactly(fused: Path, tmp_path: Path) -> None:
    result = quantize(fused, tmp_path / "int4", QuantizeOptions.int4(algorithm="gguf"))
    step = result.manifest["steps"][-1]
    assert step["method"] == "int4_gguf" and len(step["reused"]) == 4 * 30
    fidelity = result.manifest["fidelity"]
    assert abs(fidelity["perplexity_delta_pct"]) <= 0.5, fidelity
    assert fidelity["perplexity_delta_pct"] <= 8.0


def test_int4_default_within_8_percent(fused: Path, tmp_path: Path) -> None:
    result = quantize(fused, tmp_path / "hqq", QuantizeOptions.int4())
    assert result.manifest["steps"][-1]["options"]["algorithm"] == "auto"  # HQQ
    fidelity = result.manifest["fidelity"]
    assert fidelity["perplexity_delta_pct"] <= 8.0, fidelity
