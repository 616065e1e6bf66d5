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
from llmopt.runtime.sampling import (
    SamplingParams,
    apply_openai_penalties,
    apply_repetition_penalty,
    next_token,
)


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


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = np.array([1.0, 3.0, 2.0, 0.0])
    generated = [1, 1, 2]
    expected = logits - np.array([0.0, 0.5 + 2 * 0.25, 0.5 + 0.25, 0.0])
    shifted = logits.copy()
    apply_openai_penalties(shifted, generated, presence=0.5, frequency=0.25)
    np.testing.assert_allclose(shifted, expected)
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=0.5)
    assert next_token(logits, params, [], None) == 1  # nothing generated: no penalty
    assert next_token(logits, params, generated, None, generated) == 0  # 1 and 2 pushed down
    with pytest.raises(llmopt.InvalidInputError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


def test_logprobs_come_from_the_raw_logits() -> None:
    from llmopt.runtime.sequence import DecodeState

    logits = np.array([0.0, 4.0, 1.0, 2.0])
    state = DecodeState([3], SamplingParams(logprobs=2, repetition_penalty=5.0,
                                            frequency_penalty=2.0, ignore_eos=True),
                        None, [], 64)
    state.step(logits)
    (entry,) = state.logprobs or []
    raw = logits - np.log(np.exp(logits).sum())
    assert entry.token_id == 1 and entry.logprob == pytest.approx(raw[1])
    assert [t for t, _ in entry.top] == [1, 3]
    assert [v for _, v in entry.top] == pytest.approx([raw[1], raw[3]])
    assert state.result().logprobs == [entry]
    with pytest.raises(llmopt.InvalidInputError, match="logprobs"):
        SamplingParams(logprobs=21)
