"""Prefix caching: a prompt that starts with tokens the engine ran before is prefilled from
their cache, runs only the rest, and gets the same numbers as a prompt prefilled whole.

Reuse is asserted on the engine's step records (prompt tokens each prefill ran) and the
requests' ``cached_prompt_tokens``; sameness on logits and caches to the bit, and on greedy
answers against a lone Generator.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from llmopt.errors import InvalidInputError
from llmopt.manifest import Manifest
from llmopt.runtime import generator as generator_module
from llmopt.runtime.engine import Engine, EngineConfig, Request
from llmopt.runtime.generator import Generator
from llmopt.runtime.kv import position_ids
from llmopt.runtime.prefill import StepRecord
from llmopt.runtime.prefix_cache import MIN_TOKENS, PrefixCache, unreusable
from llmopt.runtime.sampling import SamplingParams
from llmopt.server.config import ModelConfig

SYSTEM = "you are a careful assistant . answer in short sentences and be polite . " * 3
QUESTIONS = ("what is the weather today ?", "how do i bake bread ?", "tell me a joke .",
             "who wrote hamlet ?")
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def kv(length: int, fill: float = 0.0, tensors: int = 2) -> list[np.ndarray]:
    return [np.full((1, 2, length, 4), fill + i, np.float32) for i in range(tensors)]


# -- the store ---------------------------------------------------------------------------------

def test_the_longest_common_prefix_wins_and_the_last_token_always_runs() -> None:
    cache = PrefixCache(min_tokens=4)
    cache.add(list(range(10)), kv(10, 1.0))
    cache.add([*range(6), 60, 61, 62, 63, 64, 65], kv(12, 2.0))
    match = cache.match([*range(8), 99])
    assert match is not None and match.length == 8  # the first entry agrees on 8 tokens
    assert [a.shape for a in match.kv] == [(1, 2, 8, 4)] * 2
    assert match.kv[0][0, 0, 0, 0] == 1.0
    match = cache.match([*range(6), 60, 61, 62, 1])
    assert match is not None and match.length == 9 and match.kv[1][0, 0, 0, 0] == 3.0
    whole = cache.match(list(range(10)))  # the whole prompt is cached: its last token runs
    assert whole is not None and whole.length == 9
    assert cache.match([0, 1, 2, 7, 7, 7]) is None  # 3 tokens agree: under min_tokens
    assert cache.match([5, 6, 7, 8, 9]) is None  # a match starts at the first token
    assert (cache.hits, cache.reused_tokens) == (3, 26)


def test_an_extension_replaces_its_prefix_and_the_budget_evicts_the_oldest() -> None:
    entry = sum(a.nbytes for a in kv(8))
    cache = PrefixCache(budget_bytes=3 * entry, min_tokens=4)
    cache.add(list(range(8)), kv(8))
    cache.add(list(range(12)), kv(12))  # extends the first: it goes
    assert len(cache) == 1 and cache.bytes == sum(a.nbytes for a in kv(12))
    cache.add(list(range(10)), kv(10))  # already held by the longer one: nothing added
    assert len(cache) == 1
    cache.add([100 + i for i in range(8)], kv(8))
    assert len(cache) == 2 and cache.bytes <= cache.budget_bytes
    cache.add([200 + i for i in range(8)], kv(8))  # over budget: the 12-token entry goes
    assert len(cache) == 2 and cache.bytes <= cache.budget_bytes
    assert cache.match(list(range(12))) is None
    assert cache.match([100 + i for i in range(9)]) is not None
    cache.add(list(range(3)), kv(3))  # under min_tokens: not kept
    assert len(cache) == 2
    with pytest.raises(ValueError, match="positions"):
        cache.add([300 + i for i in range(8)], kv(7))


def test_the_budget_is_validated() -> None:
    assert EngineConfig().prefix_cache_bytes > 0
    with pytest.raises(InvalidInputError, match="prefix_cache_bytes"):
        EngineConfig(prefix_cache_bytes=-1)
    assert ModelConfig.from_dict({"prefix_cache_bytes": 0}).prefix_cache_bytes == 0
    for bad in (-1, "lots", True):
        with pytest.raises(InvalidInputError, match="prefix_cache_bytes must be an integer"):
            ModelConfig.from_dict({"prefix_cache_bytes": bad})


@pytest.mark.parametrize(("quantization", "kv_cache", "reason"), [
    ("int8_dynamic", {}, "one scale"), (None, {"sliding_window": 64}, "sliding-window"),
    (None, {}, None), ("int4", {}, None)])
def test_packages_whose_prefix_cache_would_differ_get_none(
        quantization: str | None, kv_cache: dict[str, int], reason: str | None) -> None:
    steps = [{"stage": "export"}] + (
        [{"stage": "quantize", "method": quantization}] if quantization else [])
    fake = SimpleNamespace(package=SimpleNamespace(manifest=Manifest({"steps": steps}),
                                                   kv_cache=kv_cache),
                           model=SimpleNamespace(rope_long_after=None))
    why = unreusable(fake)  # type: ignore[arg-type]
    assert (why is None) if reason is None else (reason in str(why))
    fake.model.rope_long_after = 4096
    assert why is not None or "LongRoPE" in str(unreusable(fake))  # type: ignore[arg-type]


# -- the same numbers --------------------------------------------------------------------------

def test_a_prompt_on_a_cached_prefix_gets_the_same_cache_and_logits(generator: Generator
                                                                    ) -> None:
    model = generator.model
    ids = np.array([generator.encode(SYSTEM + QUESTIONS[0])], np.int64)
    mask = np.ones_like(ids)
    positions = position_ids(mask)
    whole = model.copying_cache(1)
    logits = model.step(ids, mask, positions, whole, all_logits=True, prompt=True).copy()
    cache = whole.arrays()
    for cached in (MIN_TOKENS, ids.shape[1] // 2, ids.shape[1] - 1):
        part = model.copying_cache(1, past=[np.ascontiguousarray(a[:, :, :cached])
                                            for a in cache])
        rest = model.step(ids[:, cached:], mask, positions[:, cached:], part, all_logits=True,
                          prompt=True)
        np.testing.assert_array_equal(rest[0], logits[0, cached:])
        for a, b in zip(part.arrays(), cache, strict=True):
            np.testing.assert_array_equal(a, b)


def started(generator: Generator, **options: int) -> tuple[Engine, list[StepRecord]]:
    engine = Engine(generator, EngineConfig(**options))
    records: list[StepRecord] = []
    engine.on_step = records.append
    return engine.start(), records


def prefilled(records: list[StepRecord], request: Request) -> int:
    return sum(r.tokens for r in records if r.kind == "prefill" and request.id in r.request_ids)


def test_a_shared_system_prompt_is_prefilled_once(generator: Generator) -> None:
    system = len(generator.encode(SYSTEM))
    prompts = [SYSTEM + q for q in QUESTIONS]
    alone = [generator.generate(p, GREEDY).token_ids for p in prompts]
    engine, records = started(generator)
    try:
        first = engine.submit(prompts[0], GREEDY)
        first.result(timeout=60)
        rest = [engine.submit(p, GREEDY) for p in prompts[1:]]
        results = [first.result(), *(r.result(timeout=60) for r in rest)]
    finally:
        engine.close()
    assert [r.token_ids for r in results] == alone
    assert results[0].stats.cached_prompt_tokens == 0
    assert prefilled(records, first) == len(generator.encode(prompts[0]))
    for request, result in zip(rest, results[1:], strict=True):
        cached = result.stats.cached_prompt_tokens
        assert cached >= system  # the system prompt, and whatever the questions share after it
        assert prefilled(records, request) == result.stats.prompt_tokens - cached


def test_a_chats_next_turn_reuses_the_whole_conversation(generator: Generator) -> None:
    """The second turn's prompt is the first's, its answer and a new question: all of the
    first turn's prompt and answer comes from the cache, and the answer equals a lone
    Generator's on the whole conversation."""
    engine, records = started(generator)
    try:
        prompt = generator.encode(SYSTEM + QUESTIONS[0])
        first = engine.submit(prompt, GREEDY).result(timeout=60)
        follow = prompt + first.token_ids + generator.encode(" " + QUESTIONS[1])
        request = engine.submit(follow, GREEDY)
        second = request.result(timeout=60)
    finally:
        engine.close()
    # the answer's last token never ran (it ended on the length limit): all but it are cached
    assert second.stats.cached_prompt_tokens == len(prompt) + len(first.token_ids) - 1
    assert prefilled(records, request) == len(follow) - second.stats.cached_prompt_tokens
    assert second.token_ids == generator.generate(follow, GREEDY).token_ids


def test_reused_prompts_join_running_streams_with_unchanged_answers(generator: Generator
                                                                    ) -> None:
    """Prompts on a cached prefix prefill alone and join a batch already decoding others;
    every answer still equals its lone Generator's."""
    long = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompts = [SYSTEM + q for q in QUESTIONS]
    alone = {p: generator.generate(p, long).token_ids for p in prompts}
    engine, records = started(generator, max_batch_size=8)
    try:
        engine.submit(prompts[0], long).result(timeout=60)  # the system prompt is cached
        requests = [(p, engine.submit(p, long)) for p in prompts * 2]
        results = [(p, r.result(timeout=120)) for p, r in requests]
    finally:
        engine.close()
    for prompt, result in results:
        assert result.token_ids == alone[prompt]
        assert result.stats.cached_prompt_tokens >= len(generator.encode(SYSTEM))
    assert max(r.tokens for r in records if r.kind == "decode") > 1  # they did run together


def test_without_a_budget_nothing_is_reused(generator: Generator) -> None:
    engine, records = started(generator, prefix_cache_bytes=0)
    try:
        assert engine.prefixes is None
        results = [engine.submit(SYSTEM + q, GREEDY).result(timeout=60) for q in QUESTIONS[:2]]
    finally:
        engine.close()
    assert [r.stats.cached_prompt_tokens for r in results] == [0, 0]
    assert sum(r.tokens for r in records if r.kind == "prefill") == sum(
        r.stats.prompt_tokens for r in results)


def test_the_rest_of_a_prompt_on_a_cached_prefix_is_prefilled_in_chunks(generator: Generator
                                                                        ) -> None:
    chunk = 16
    long = SYSTEM + " ".join(QUESTIONS) + " " + SYSTEM
    engine, records = started(generator, prefill_chunk=chunk)
    try:
        engine.submit(SYSTEM, GREEDY).result(timeout=60)
        request = engine.submit(long, GREEDY)
        result = request.result(timeout=60)
    finally:
        engine.close()
    assert result.token_ids == generator.generate(long, GREEDY).token_ids
    cached = result.stats.cached_prompt_tokens
    assert cached == len(generator.encode(SYSTEM))  # the first prompt, whole
    rest = result.stats.prompt_tokens - cached
    sizes = [r.tokens for r in records if r.kind == "prefill" and request.id in r.request_ids]
    assert sizes == [chunk] * (rest // chunk) + ([rest % chunk] if rest % chunk else [])


# -- in-process: the Generator ---------------------------------------------------------------

def test_a_generators_next_turn_prefills_only_the_new_tokens(generator: Generator) -> None:
    prompt = generator.encode(SYSTEM + QUESTIONS[0])
    generator.prefix_cache_bytes = 0
    try:
        first_off = generator.generate(prompt, GREEDY)
        follow = prompt + first_off.token_ids + generator.encode(" " + QUESTIONS[1])
        second_off = generator.generate(follow, GREEDY)
        third = follow + second_off.token_ids + [7]
        streamed_off = generator.generate(third, GREEDY)
    finally:
        generator.prefix_cache_bytes = 128 * 2**20
    assert generator.prefixes is not None and len(generator.prefixes) == 0
    first = generator.generate(prompt, GREEDY)
    second = generator.generate(follow, GREEDY)
    stream = generator.stream(third, GREEDY)
    text = "".join(stream)
    assert (first.token_ids, second.token_ids) == (first_off.token_ids, second_off.token_ids)
    assert stream.result.token_ids == streamed_off.token_ids and text == streamed_off.text
    assert (first_off.stats.cached_prompt_tokens, second_off.stats.cached_prompt_tokens) == (0, 0)
    assert first.stats.cached_prompt_tokens == 0
    # all of the first turn but the answer's last token (never run: the length limit ended it)
    assert second.stats.cached_prompt_tokens == len(prompt) + len(first.token_ids) - 1
    # the second generation's whole prompt and answer (its last token aside) were kept
    assert stream.result.stats.cached_prompt_tokens == len(follow) + len(second.token_ids) - 1


def test_a_batch_neither_reuses_nor_keeps_and_the_switch_is_validated(generator: Generator
                                                                      ) -> None:
    prompts = [SYSTEM + q for q in QUESTIONS[:2]]
    generator.prefix_cache_bytes = 128 * 2**20  # a fresh, empty cache
    results = generator.generate_batch(prompts, GREEDY)
    assert [r.stats.cached_prompt_tokens for r in results] == [0, 0]
    assert generator.prefixes is not None and len(generator.prefixes) == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidInputError, match="prefix_cache_bytes must be an integer"):
            generator.prefix_cache_bytes = bad  # type: ignore[assignment]
    generator.prefix_cache_bytes = 0
    assert generator.prefixes is None and generator.prefix_cache_bytes == 0
    generator.prefix_cache_bytes = 128 * 2**20


# -- prompt lookup: draft tokens from the sequence so far, checked in one step -------------------

def test_prompt_lookup_drafts_what_followed_the_latest_match() -> None:
    from llmopt.runtime.generator import prompt_lookup

    assert prompt_lookup([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert prompt_lookup([1, 2, 9, 1, 2, 7, 8, 1, 2], 2) == [7, 8]  # the latest occurrence
    assert prompt_lookup([5, 6, 7, 8, 6, 7], 4) == [8, 6, 7]  # no more than what follows
    assert prompt_lookup([1, 2, 3, 4], 3) == []  # nothing repeats
    assert prompt_lookup([1, 2, 1, 2], 0) == []


def test_prompt_lookup_matches_its_definition_on_random_sequences() -> None:
    """The search (candidates at the last token's earlier places, narrowed backwards) agrees
    with the definition written plainly: every window of n tokens compared with the last n."""
    from llmopt.runtime.generator import prompt_lookup

    def plainly(seq: list[int], count: int, longest: int) -> list[int]:
        if count < 1 or len(seq) < 3:
            return []
        for n in range(min(longest, len(seq) - 1), 1, -1):
            hits = [i for i in range(len(seq) - n) if seq[i:i + n] == seq[-n:]]
            if hits:
                return seq[hits[-1] + n:hits[-1] + n + count]
        return []

    rng = np.random.default_rng(0)
    for _ in range(3000):
        seq = rng.integers(0, int(rng.integers(1, 6)), int(rng.integers(0, 30))).tolist()
        count, longest = int(rng.integers(0, 6)), int(rng.integers(2, 5))
        assert prompt_lookup(seq, count, longest) == plainly(seq, count, longest)
        assert prompt_lookup(np.asarray(seq, np.int64), count, longest) == plainly(
            seq, count, longest)


COPY = "the quick brown fox jumps over the lazy dog . " * 4


def oracle(answer: list[int], prompt: int) -> Any:
    """A stand-in for :func:`prompt_lookup` that drafts the answer's true next tokens, with a
    wrong one in every third draft and none in every third: the tiny models copy nothing, so
    this drives every path of the check (all confirmed, some rejected, none drafted)."""
    calls = []

    def draft(tokens: Any, count: int) -> list[int]:  # the sequence so far, an array
        calls.append(count)
        truth = answer[len(tokens) - prompt:][:count]
        if len(calls) % 3 == 2 and len(truth) > 1:
            wrong = min(2, len(truth) - 1)
            truth = [*truth[:wrong], truth[wrong] + 1, *truth[wrong + 1:]]
        return [] if len(calls) % 3 == 0 else truth

    return draft


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=40, ignore_eos=True),
    SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True),
    SamplingParams(max_new_tokens=40, repetition_penalty=1.3, logprobs=2),
    SamplingParams(max_new_tokens=25, stop=("lazy",))])
def test_prompt_lookup_gives_the_same_tokens_in_fewer_steps(
        generator: Generator, params: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = generator.encode(COPY)
    generator.prefix_cache_bytes = 0
    plain = generator.generate(prompt, params)
    follow = prompt + plain.token_ids + generator.encode(" " + QUESTIONS[0])
    after = generator.generate(follow, GREEDY)
    generator.prefix_cache_bytes = 128 * 2**20  # the drafted run's cache is kept, then reused
    monkeypatch.setattr(generator_module, "prompt_lookup", oracle(plain.token_ids, len(prompt)))
    steps: list[int] = []
    run = generator.model.step
    monkeypatch.setattr(generator.model, "step",
                        lambda *a, **k: steps.append(a[0].shape[1]) or run(*a, **k))
    drafted = generator.generate(prompt, replace(params, prompt_lookup=5))
    monkeypatch.undo()
    assert drafted.token_ids == plain.token_ids and drafted.text == plain.text
    assert (drafted.finish_reason, drafted.logprobs) == (plain.finish_reason, plain.logprobs)
    assert plain.stats.accepted_draft_tokens == 0
    accepted = drafted.stats.accepted_draft_tokens
    assert accepted > len(drafted.token_ids) // 3
    # each step made one token of its own, plus the drafts it confirmed
    assert len(steps) + accepted >= len(drafted.token_ids) >= len(steps) - 1 + accepted
    assert any(n > 1 for n in steps[1:])
    # the rejected drafts' cache positions never leak into the sequence's cache
    again = generator.generate(follow, GREEDY)
    assert again.token_ids == after.token_ids
    assert again.stats.cached_prompt_tokens >= len(prompt) + len(plain.token_ids) - 1


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=40, ignore_eos=True),
    SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True,
                   logprobs=2)])
def test_the_engines_lone_row_checks_drafts_with_the_same_tokens(
        generator: Generator, params: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request running alone in its batch drafts (here from an oracle that is wrong or
    silent two steps in three) and checks the draft in one step: the same tokens, text and
    logprobs as a lone Generator's in fewer steps, and its cache, kept for the next turn,
    holds no rejected position (the next turn's answer is unchanged)."""
    prompt = generator.encode(COPY)
    generator.prefix_cache_bytes = 0
    plain = generator.generate(prompt, params)
    follow = prompt + plain.token_ids + generator.encode(" " + QUESTIONS[0])
    after = generator.generate(follow, GREEDY)
    monkeypatch.setattr(generator_module, "prompt_lookup", oracle(plain.token_ids, len(prompt)))
    engine, records = started(generator)
    try:
        request = engine.submit(prompt, replace(params, prompt_lookup=5))
        drafted = request.result(timeout=60)
        monkeypatch.undo()
        again = engine.submit(follow, GREEDY).result(timeout=60)
    finally:
        engine.close()
    assert drafted.token_ids == plain.token_ids and drafted.text == plain.text
    assert (drafted.finish_reason, drafted.logprobs) == (plain.finish_reason, plain.logprobs)
    steps = [r.tokens for r in records if r.kind == "decode" and request.id in r.request_ids]
    accepted = drafted.stats.accepted_draft_tokens
    assert accepted > len(drafted.token_ids) // 3 and max(steps) > 1
    # the prefill chose the first token; each step one more, plus the drafts it confirmed
    assert 1 + len(steps) + accepted == len(drafted.token_ids)
    assert again.token_ids == after.token_ids
    assert again.stats.cached_prompt_tokens >= len(prompt) + len(plain.token_ids) - 1


def test_rows_sharing_a_batch_do_not_draft(generator: Generator,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows in one batch decode one token each per step; once one leaves, the other
    drafts alone (here a draft that is always wrong: the same tokens all the same)."""
    short, long = (SamplingParams(max_new_tokens=n, ignore_eos=True, prompt_lookup=4)
                   for n in (6, 30))
    prompts = [generator.encode(COPY)] * 2  # equal lengths share a batch on every graph
    alone = [generator.generate(p, q).token_ids for p, q in zip(prompts, (short, long),
                                                                 strict=True)]
    monkeypatch.setattr(generator_module, "prompt_lookup", lambda tokens, count: [7] * count)
    engine, records = started(generator, max_batch_size=4, prefix_cache_bytes=0)
    try:
        engine._lock.acquire()  # both are admitted in one step
        requests = [engine.submit(p, q) for p, q in zip(prompts, (short, long), strict=True)]
        engine._lock.release()
        results = [r.result(timeout=60) for r in requests]
    finally:
        engine.close()
    assert [r.token_ids for r in results] == alone
    decodes = [r for r in records if r.kind == "decode"]
    together = [r for r in decodes if len(r.request_ids) == 2]
    assert together and all(r.tokens == 2 for r in together)
    assert any(r.tokens > 1 for r in decodes if len(r.request_ids) == 1)


def test_the_engines_default_drafts_for_requests_that_set_none(
        generator: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    prompt = generator.encode(COPY)
    plain = generator.generate(prompt, params)
    monkeypatch.setattr(generator_module, "prompt_lookup", oracle(plain.token_ids, len(prompt)))
    engine, _ = started(generator, prompt_lookup=3, prefix_cache_bytes=0)
    try:
        drafted = engine.submit(prompt, params).result(timeout=60)
    finally:
        engine.close()
    assert drafted.token_ids == plain.token_ids
    assert drafted.stats.accepted_draft_tokens > 0


def test_a_prediction_drafts_the_answer_it_resembles(generator: Generator) -> None:
    """A prediction (OpenAI's Predicted Outputs) is searched for drafts too: given the plain
    answer's own text, most tokens come from confirmed drafts, in the Generator and in the
    engine, and the tokens are the plain ones; a prediction unlike the answer costs rejected
    drafts only."""
    prompt = generator.encode(SYSTEM)
    generator.prefix_cache_bytes = 0
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = generator.generate(prompt, params)
    predicted = replace(params, prediction=plain.text)
    drafted = generator.generate(prompt, predicted)
    engine, _ = started(generator, prefix_cache_bytes=0)
    try:
        served = engine.submit(prompt, predicted).result(timeout=60)
        unlike = engine.submit(prompt, replace(params, prediction=COPY * 3)).result(timeout=60)
    finally:
        engine.close()
    for result in (drafted, served, unlike):
        assert result.token_ids == plain.token_ids and result.text == plain.text
    for result in (drafted, served):
        assert result.stats.accepted_draft_tokens > len(plain.token_ids) // 2
    assert served.stats.accepted_draft_tokens == drafted.stats.accepted_draft_tokens
    assert unlike.stats.accepted_draft_tokens < len(plain.token_ids) // 2
    assert plain.stats.rejected_draft_tokens == 0


def test_prompt_lookup_is_validated() -> None:
    for bad in (-1, 8, True, 2.0):
        with pytest.raises(InvalidInputError, match="prompt_lookup must be an integer"):
            SamplingParams(prompt_lookup=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="prompt_lookup must be an integer"):
            EngineConfig(prompt_lookup=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="prompt_lookup must be an integer"):
            ModelConfig(prompt_lookup=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="prediction must be a string"):
        SamplingParams(prediction=["not", "text"])  # type: ignore[arg-type]
    assert SamplingParams(prediction="the answer").drafts == 4
    assert SamplingParams(prediction="the answer", prompt_lookup=2).drafts == 2
