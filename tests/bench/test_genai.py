"""ONNX Runtime GenAI folders in the bench: the plain-ORT adapter that scores their graphs, and
the target that talks to a GenAI worker process."""

from __future__ import annotations

import itertools
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llmopt.bench.config import GenaiOptions, ProviderSpec
from llmopt.bench.genai import GenaiOnnxModel, genai_traffic, read_genai_config
from llmopt.bench.matrix import describe_genai
from llmopt.errors import InvalidInputError, LlmoptError, PackageError
from tests.bench.genai_fixtures import (
    HEAD_SIZE,
    KV_HEADS,
    LAYERS,
    VOCAB,
    bigram_table,
    write_genai_folder,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_genai_folder(tmp_path_factory.mktemp("genai") / "tiny")


def test_the_adapter_feeds_genai_names_and_maps_the_cache(folder: Path) -> None:
    model = GenaiOnnxModel(folder)
    past = model.empty_past(2)
    assert len(past) == 2 * LAYERS and past[0].shape == (2, KV_HEADS, 0, HEAD_SIZE)
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    mask = np.array([[0, 1, 1], [1, 1, 1]], dtype=np.int64)
    marked = [np.full((2, KV_HEADS, 0, HEAD_SIZE), i, np.float32) for i in range(2 * LAYERS)]
    logits, present = model.forward(ids, mask, np.zeros_like(ids), marked)
    np.testing.assert_allclose(logits, bigram_table()[ids] + mask[..., None])
    assert len(present) == 2 * LAYERS  # present.N.key/value come back in past order
    assert [p.shape for p in present] == [m.shape for m in marked]


def test_perplexity_of_a_genai_graph_is_computed_as_for_a_package(folder: Path) -> None:
    from llmopt.evaluate import eval_text, perplexity

    def tokenizer(text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % VOCAB for c in text[:300]]}

    got = perplexity(GenaiOnnxModel(folder), tokenizer, max_length=128)
    tokens = tokenizer(eval_text())["input_ids"]
    table = bigram_table().astype(np.float64)
    log_probs = table - np.log(np.exp(table).sum(-1, keepdims=True))
    nll = [-log_probs[a, b] for a, b in itertools.pairwise(tokens)]
    # three windows of 128: each window's last position scores the next window's first token
    assert got["eval_tokens"] == len(nll) == 299
    assert got["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_a_genai_folder_is_described_and_its_traffic_counted(folder: Path) -> None:
    info = describe_genai("theirs", folder)
    assert (info.runtime, info.task, info.precision, info.context_length) == (
        "genai", "text-generation", "fp32", 64)
    traffic = genai_traffic(folder)  # the cache's head size comes from genai_config.json
    assert traffic.kv_bytes_per_position == 2 * LAYERS * KV_HEADS * HEAD_SIZE * 4
    assert traffic.weight_bytes == 8  # the int64 axis; the table is a lookup: one row
    assert traffic.lookup_row_bytes == VOCAB * 4


def test_a_folder_without_genai_config_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"no genai_config\.json") as caught:
        read_genai_config(tmp_path)
    assert "reference_genai.py" in str(caught.value.fix)


FAKE_WORKER = """
import json, sys
print("starting", file=sys.stderr)
print(json.dumps({"ready": True, "versions": {"onnxruntime_genai": "fake"}}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["new_tokens"] == 13:
        print("worker broke", file=sys.stderr)
        sys.exit(3)
    n = request["new_tokens"]
    print(json.dumps({"times_s": [0.5 + 0.1 * i for i in range(n)],
                      "tokens": list(range(n)), "peak_rss_bytes": 1234}), flush=True)
"""


def _fake_python(tmp_path: Path) -> str:
    """An executable that runs the fake worker whatever arguments the target passes."""
    worker = tmp_path / "fake_worker.py"
    worker.write_text(textwrap.dedent(FAKE_WORKER))
    launcher = tmp_path / "python"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {worker}\n")
    launcher.chmod(0o755)
    return str(launcher)


def test_the_genai_target_times_tokens_on_the_worker_clock(folder: Path,
                                                           tmp_path: Path) -> None:
    from llmopt.bench.targets.genai import GenaiTarget

    cpu = ProviderSpec("cpu", "cpu", {"intra_op_threads": 2})
    target = GenaiTarget(folder, cpu, GenaiOptions(python=_fake_python(tmp_path)), None)
    try:
        assert target.info()["versions"] == {"onnxruntime_genai": "fake"}
        timing = target.decode([[1, 2, 3]], 4, issued=100.0)
        assert timing.ttft_s == [pytest.approx(0.5)]
        assert timing.itl_s == pytest.approx([0.1, 0.1, 0.1])
        assert timing.e2e_s == pytest.approx(0.8)
        assert (timing.output_tokens, timing.prompt_tokens) == (4, 3)
        assert target.memory() == {"worker_peak_rss_bytes": 1234}
        with pytest.raises(InvalidInputError, match="one prompt per request"):
            target.decode([[1], [2]], 4, issued=0.0)
        with pytest.raises(LlmoptError, match=r"exited with code 3.*worker broke"):
            target.decode([[1]], 13, issued=0.0)
    finally:
        target.close()


def test_the_genai_target_names_the_missing_environment(folder: Path, tmp_path: Path) -> None:
    from llmopt.bench.targets.genai import GenaiTarget

    cpu = ProviderSpec("cpu", "cpu", {})
    with pytest.raises(LlmoptError, match="no Python for ONNX Runtime GenAI") as caught:
        GenaiTarget(folder, cpu, GenaiOptions(python=str(tmp_path / "none")), None)
    assert "reference_genai.py" in str(caught.value.fix)


ROOT = Path(__file__).resolve().parents[2]
GENAI_PYTHON = ROOT / ".venv-genai" / "bin" / "python"
GENAI_INT4 = ROOT / ".cache" / "genai" / "smollm2-135m-int4-cpu"


@pytest.mark.real_model
@pytest.mark.skipif(not (GENAI_PYTHON.is_file() and (GENAI_INT4 / "genai_config.json").is_file()),
                    reason="no GenAI reference built here (python bench/reference_genai.py)")
def test_the_real_worker_generates_with_onnxruntime_genai() -> None:
    from transformers import AutoTokenizer

    from llmopt.bench.targets.genai import GenaiTarget

    tokenizer = AutoTokenizer.from_pretrained(str(GENAI_INT4))
    cpu = ProviderSpec("cpu", "cpu", {"intra_op_threads": 1})
    target = GenaiTarget(GENAI_INT4, cpu, GenaiOptions(python=str(GENAI_PYTHON)), tokenizer)
    try:
        assert target.info()["versions"]["onnxruntime_genai"]
        prompt = tokenizer("The capital of France is")["input_ids"]
        timing = target.decode([prompt], 6, issued=0.0)  # EOS held off: exactly 6 tokens
        assert timing.output_tokens == 6 and len(timing.itl_s) == 5
        assert 0 < timing.ttft_s[0] < timing.e2e_s
        assert (target.memory()["worker_peak_rss_bytes"] or 0) > 50 * 2**20  # holds the model
    finally:
        target.close()
    assert target.process.returncode == 0  # closing stdin ends the worker cleanly
