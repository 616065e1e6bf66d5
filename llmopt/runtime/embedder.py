"""The Embedder: batched sentence embeddings and classification over encoder packages.

Pooling (mean, CLS, max) and normalization follow what the source model defines, as recorded
in the package manifest (sentence-transformers' modules.json where the source had one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.runtime.session import SessionInfo

MAX_BATCH = 4096


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]


class Embedder:
    """Embeddings (feature-extraction packages) and labels (text-classification packages)."""

    def __init__(self, package: Any, session: Any, info: SessionInfo, tokenizer: Any,
                 initializers: dict[str, Any] | None = None) -> None:
        self.package = package
        self.session = session
        # the weights the session computes on in place (llmopt's CPU kernels): they must live
        # as long as it does
        self.initializers = initializers or {}
        self.session_info = info
        self.tokenizer = tokenizer
        self.layout = dict(package.manifest.encoder or {})
        self.inputs = [i.name for i in session.get_inputs()]
        self.output = session.get_outputs()[0].name
        self.max_length = int(self.layout.get("max_positions") or 512)
        self.pooling = str(self.layout.get("pooling") or "mean")
        self.normalize = bool(self.layout.get("normalize", False))
        labels = package.manifest.labels
        self.labels = [labels.get(str(i), f"LABEL_{i}") for i in range(len(labels))]

    @property
    def providers(self) -> list[str]:
        return list(self.session_info.active)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InvalidInputError("no texts given", fix="pass at least one string")
        if len(texts) > MAX_BATCH:
            raise InvalidInputError(f"{len(texts)} texts in one call; the limit is {MAX_BATCH}",
                                    fix="split the input into smaller batches")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidInputError("texts must be strings", fix="pass a list of str")
        if self.tokenizer is None:
            raise InvalidInputError("this package has no tokenizer",
                                    fix="re-export it from a source that has one")
        encoded = self.tokenizer(list(texts), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
        feed = {name: encoded[name].astype(np.int64) for name in self.inputs if name in encoded}
        if "token_type_ids" in self.inputs and "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return feed

    def hidden_states(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``last_hidden_state [B,S,H]`` and the attention mask."""
        feed = self.tokenize(texts)
        (out,) = self.session.run([self.output], feed)
        return out, feed["attention_mask"]

    def embed(self, texts: Sequence[str], normalize: bool | None = None) -> np.ndarray:
        """Sentence embeddings ``[len(texts), hidden]`` pooled as the source model defines."""
        if self.output != "last_hidden_state":
            raise InvalidInputError("this is a text-classification package",
                                    fix="use classify(), or export with --task "
                                    "feature-extraction")
        hidden, mask = self.hidden_states(texts)
        pooled = pool(hidden, mask, self.pooling)
        if self.normalize if normalize is None else normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        """Label and softmax scores per text."""
        if self.output != "logits":
            raise InvalidInputError("this is a feature-extraction package",
                                    fix="use embed(), or export with --task text-classification")
        feed = self.tokenize(texts)
        (logits,) = self.session.run([self.output], feed)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        labels = self.labels or [f"LABEL_{i}" for i in range(probs.shape[-1])]
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append(Classification(labels[best], float(row[best]),
                                      {labels[i]: float(p) for i, p in enumerate(row)}))
        return out


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Pool token states: ``mean`` (masked), ``cls`` (first token), ``max`` (masked), or
    several joined with ``+`` (concatenated, as sentence-transformers does)."""
    parts = []
    weights = mask[..., None].astype(hidden.dtype)
    for kind in mode.split("+"):
        if kind in ("mean", "mean_tokens"):
            parts.append((hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9))
        elif kind in ("cls", "cls_token"):
            parts.append(hidden[:, 0])
        elif kind in ("max", "max_tokens"):
            parts.append(np.where(weights > 0, hidden, -np.inf).max(1))
        else:
            raise InvalidInputError(f"unknown pooling {kind!r}", fix="use mean, cls or max")
    return np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
