"""SmolLM2-135M-Instruct (real weights): fused fp32 still matches PyTorch; int8 and int4 keep
perplexity within budget; int4 from the Q4_1 GGUF reuses its blocks exactly (HQQ, GPTQ, MSE
and RTN are checked on tiny models in test_quantize.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llmopt
from llmopt.evaluate import eval_text
from llmopt.package import Package
from llmopt.quantizer import QuantizeOptions, quantize
from llmopt.runtime.kv import position_ids
from tests.runtime.test_real_smollm2 import CHAT_PROMPTS, _torch_chat_greedy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def fused(smollm2_fused: Path) -> Path:
    """Made by ``llmopt.optimize`` (level 2) in the demo run (tests/conftest.py)."""
    return smollm2_fused


@pytest.fixture(scope="module")
def demo_packages(smollm2_demo: dict[str, Any]) -> Path:
    """int8 and int4 made by ``quantize(fused, QuantizeOptions.int8()/int4())`` in the demo."""
    return Path(smollm2_demo["out"]) / "packages"


def test_fused_fp32_matches_pytorch_greedy(fused: Path, smollm2_torch: Any) -> None:
    generator = llmopt.load(fused)
    manifest = generator.package.manifest
    assert manifest["validation"]["passed"]
    assert manifest["steps"][-1]["nodes_after"] < manifest["steps"][-1]["nodes_before"] / 3
    for prompt in CHAT_PROMPTS[:3]:
        ours = generator.generate(prompt, chat=True, max_new_tokens=32).token_ids
        assert ours == _torch_chat_greedy(smollm2_torch, generator.tokenizer, prompt, 32)


def test_int8_perplexity_within_3_percent(demo_packages: Path, fused: Path) -> None:
    int8 = Package.open(demo_packages / "int8")
    assert int8.manifest["steps"][-1]["options"] == json.loads(json.dumps(
        asdict(QuantizeOptions.int8())))
    fidelity = int8.manifest["fidelity"]
    assert Path(fidelity["against"]).resolve() == fused.resolve()
    assert fidelity["perplexity_delta_pct"] <= 3.0, fidelity
    assert fidelity["size_bytes"] < 0.6 * fidelity["against_size_bytes"]
    print("int8", fidelity["perplexity_delta_pct"], fidelity["top1_agreement"],
          fidelity["greedy_agreement"])


def test_int4_default_reuses_the_gguf_blocks(demo_packages: Path) -> None:
    """``auto`` on a package exported from SmolLM2's Q4_1 GGUF keeps its 4-bit codes (and the
    Q8_0 embedding as the 8-bit LM head), with no float zero point left for the slow kernel."""
    result = Package.open(demo_packages / "int4")
    step = result.manifest["steps"][-1]
    assert step["method"] == "int4_gguf" and step["algorithm_used"] == "gguf"
    assert len(step["reused"]) == 4 * 30 + 1 and step["reused"]["model.lm_head.weight"] == "Q8_0"
    assert step["zero_point_corrections"] == 4 * 30  # Q4_1: every layer weight
    fidelity = result.manifest["fidelity"]
    # int8 activations (accuracy level 4) are the only rounding left
    assert fidelity["perplexity_delta_pct"] <= 2.0, fidelity
    assert fidelity["top1_agreement"] >= 0.9, fidelity
    print("int4 gguf", fidelity["perplexity_delta_pct"], fidelity["top1_agreement"],
          fidelity["greedy_agreement"])


def test_int4_gguf_at_fp32_compute_equals_the_float_package(fused: Path, tmp_path: Path) -> None:
    """With fp32 compute (accuracy level 1) nothing is rounded at all: same logits."""
    options = QuantizeOptions.int4().with_(accuracy_level=1, evaluate=False)
    exact = llmopt.load(quantize(fused, tmp_path / "int4", options))
    float_package = llmopt.load(fused)
    tokens = float_package.tokenizer(eval_text())["input_ids"][:96]
    window = np.array([tokens], dtype=np.int64)
    mask = np.ones_like(window)
    got, _ = exact.model.forward(window, mask, position_ids(mask), exact.model.empty_past(1))
    want, _ = float_package.model.forward(window, mask, position_ids(mask),
                                          float_package.model.empty_past(1))
    assert np.max(np.abs(got - want)) <= 2e-3 * max(1.0, float(np.max(np.abs(want))))
    assert (got.argmax(-1) == want.argmax(-1)).all()
