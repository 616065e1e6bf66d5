"""The Embedder: pooled embeddings and classification labels over encoder packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import llmopt
from llmopt.exporter import ExportOptions, export
from llmopt.runtime.embedder import Embedder, pool
from tests.exporter.test_encoders import build, torch_model

TEXTS = ["the quick brown fox", "hello world", "what is the capital of france ?", "sea"]


def _torch_mean(source: Path, texts: list[str], task: str = "feature-extraction") -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(source)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = torch_model(source, task)(**enc).last_hidden_state.numpy()
    return pool(hidden, enc["attention_mask"].numpy(), "mean")


def test_embed_pools_like_the_source_model(tmp_path: Path) -> None:
    source = build("bert", "feature-extraction", tmp_path / "source")
    export(source, tmp_path / "package", ExportOptions(task="feature-extraction"))
    embedder = llmopt.load(tmp_path / "package")
    assert isinstance(embedder, Embedder) and embedder.pooling == "mean"
    got = embedder.embed(TEXTS)
    np.testing.assert_allclose(got, _torch_mean(source, TEXTS), atol=1e-4)
    normalized = embedder.embed(TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    with pytest.raises(llmopt.InvalidInputError, match="classification"):
        embedder.classify(TEXTS)
    with pytest.raises(llmopt.InvalidInputError, match="no texts"):
        embedder.embed([])


def test_cli_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """`llmopt embed PKG TEXT | head -c 100`: the reader leaves before the vector is written."""
    source = build("bert", "feature-extraction", tmp_path / "source")
    export(source, tmp_path / "package", ExportOptions(task="feature-extraction"))
    process = subprocess.Popen(
        [sys.executable, "-m", "llmopt.cli.main", "embed", str(tmp_path / "package"), "hi"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the CLI has loaded anything, let alone printed
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr


def test_classify_returns_labels_and_scores(tmp_path: Path) -> None:
    source = build("roberta", "text-classification", tmp_path / "source")
    export(source, tmp_path / "package", ExportOptions(task="text-classification"))
    embedder = llmopt.load(tmp_path / "package")
    assert isinstance(embedder, Embedder)
    results = embedder.classify(TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(source)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        model = torch_model(source, "text-classification")
        want = model(**enc).logits.argmax(-1).tolist()
    labels = model.config.id2label
    assert [r.label for r in results] == [labels[i] for i in want]
    for r in results:
        assert abs(sum(r.scores.values()) - 1.0) < 1e-5 and r.score == max(r.scores.values())
    with pytest.raises(llmopt.InvalidInputError, match="feature-extraction"):
        embedder.embed(TEXTS)


def test_pool_modes() -> None:
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [[1, 2], [6, 7]])
    np.testing.assert_allclose(pool(hidden, mask, "cls"), [[0, 1], [6, 7]])
    np.testing.assert_allclose(pool(hidden, mask, "max"), [[2, 3], [6, 7]])
    assert pool(hidden, mask, "mean+cls").shape == (2, 4)
    with pytest.raises(llmopt.InvalidInputError):
        pool(hidden, mask, "median")


@pytest.mark.real_model
def test_minilm_embedder_matches_sentence_transformers_pooling(minilm_dir: Path,
                                                               tmp_path: Path) -> None:
    export(minilm_dir, tmp_path / "package", ExportOptions(task="feature-extraction"))
    embedder = llmopt.load(tmp_path / "package")
    assert isinstance(embedder, Embedder)
    assert (embedder.pooling, embedder.normalize) == ("mean", True)
    texts = ["A man is eating food.", "Un homme mange.", "東京は日本の首都です。",
             "The stock market fell 3% today 📉", "Sentence embeddings are useful."] * 4
    got = embedder.embed(texts)
    want = _torch_mean(minilm_dir, texts)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    cosine = np.sum(got * want, axis=1)
    assert cosine.min() >= 0.9999
