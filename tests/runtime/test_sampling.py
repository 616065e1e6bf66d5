"""Sampling parameters and next-token selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import llmopt
from llmopt.runtime.sampling import SamplingParams, apply_repetition_penalty, next_token


@pytest.mark.parametrize("kwargs, word", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e9}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 1e6}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10**12}, "max_new_tokens"),
    ({"seed": -1}, "seed"),
    ({"stop": ("",)}, "stop"),
])
def test_bad_values_are_rejected_with_the_fix(kwargs: dict, word: str) -> None:
    with pytest.raises(llmopt.InvalidInputError, match=word) as info:
        SamplingParams(**kwargs)
    assert info.value.fix


def test_repetition_penalty_matches_transformers() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    seen = [3, 7, 7, 11, 49]
    ours = logits.copy()
    apply_repetition_penalty(ours, seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]),
                                                   torch.from_numpy(logits[None].copy()))
    np.testing.assert_allclose(ours, theirs[0].numpy(), rtol=1e-6)


def _support(logits: np.ndarray, params: SamplingParams, draws: int = 400) -> set[int]:
    rng = np.random.default_rng(0)
    return {next_token(logits, params, [], rng) for _ in range(draws)}


def test_top_k_and_top_p_keep_what_transformers_keeps() -> None:
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float64))
    for params, warper in [
        (SamplingParams(temperature=1.0, top_k=2), TopKLogitsWarper(2)),
        (SamplingParams(temperature=1.0, top_p=0.8), TopPLogitsWarper(0.8)),
        (SamplingParams(temperature=1.0, top_p=0.3), TopPLogitsWarper(0.3)),
    ]:
        kept = warper(None, torch.tensor(logits[None]))[0]
        expected = {i for i, v in enumerate(kept.tolist()) if v != float("-inf")}
        assert _support(logits, params) == expected, params


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible() -> None:
    logits = np.random.default_rng(1).normal(size=100)
    assert next_token(logits, SamplingParams(), [], None) == int(np.argmax(logits))
    params = SamplingParams(temperature=1.5, top_k=40)
    a = [next_token(logits, params, [], np.random.default_rng(5)) for _ in range(3)]
    b = [next_token(logits, params, [], np.random.default_rng(5)) for _ in range(3)]
    assert a == b
    many = {next_token(logits, params, [], np.random.default_rng(s)) for s in range(30)}
    assert len(many) > 3  # sampling actually varies across seeds
