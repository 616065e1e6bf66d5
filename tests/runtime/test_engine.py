"""Continuous batching: joins and leaves at step boundaries, equal results, limits."""

from __future__ import annotations

import threading
import time

import pytest

import llmopt
from llmopt.runtime.engine import Engine, EngineConfig
from llmopt.runtime.generator import Generator
from llmopt.runtime.sampling import SamplingParams

PROMPTS = ["the quick brown fox", "hello world , how are you ?", "one two three four five six",
           "a", "the sea and the sky", "what is the capital of france ?"]


def test_concurrent_greedy_results_equal_single_requests(generator: Generator) -> None:
    params = [SamplingParams(max_new_tokens=8 + 3 * i, ignore_eos=True) for i in range(6)]
    singles = [generator.generate(p, q).token_ids for p, q in zip(PROMPTS, params, strict=True)]
    engine = Engine(generator, EngineConfig(max_batch_size=4, max_prefill_batch=2)).start()
    try:
        requests = []
        for prompt, p in zip(PROMPTS, params, strict=True):  # staggered: later ones join mid-run
            requests.append(engine.submit(prompt, p))
            time.sleep(0.01)
        results = [r.result(timeout=60) for r in requests]
    finally:
        engine.close()
    assert [r.token_ids for r in results] == singles
    assert engine.steps < sum(len(s) for s in singles)  # forward passes were shared


def test_streamed_deltas_add_up_per_request(generator: Generator) -> None:
    engine = Engine(generator).start()
    try:
        requests = [engine.submit(p, SamplingParams(max_new_tokens=10, ignore_eos=True))
                    for p in PROMPTS[:3]]
        texts = {}

        def read(r) -> None:  # type: ignore[no-untyped-def]
            texts[r.id] = "".join(r)

        threads = [threading.Thread(target=read, args=(r,)) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for r in requests:
            assert texts[r.id] == r.result().text
    finally:
        engine.close()


def test_cancel_frees_the_slot_for_the_next_request(generator: Generator) -> None:
    engine = Engine(generator, EngineConfig(max_batch_size=1)).start()
    try:
        long = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True))
        waiting = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=5, ignore_eos=True))
        next(iter(long))  # it is running
        long.cancel()
        assert long.result(timeout=30).finish_reason == "cancelled"
        assert len(long.result().token_ids) < 200
        assert waiting.result(timeout=30).stats.generated_tokens == 5
    finally:
        engine.close()


def test_deadline_stops_a_request(generator: Generator) -> None:
    engine = Engine(generator)
    # at least 2 ms a pass, so 240 tokens surely outlast the 50 ms deadline however fast the CPU
    engine.on_step = lambda record: time.sleep(0.002)
    engine.start()
    try:
        request = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=240, ignore_eos=True),
                                timeout=0.05)
        result = request.result(timeout=30)
        assert result.finish_reason == "deadline" and len(result.token_ids) < 240
    finally:
        engine.close()


def test_full_queue_fails_fast(generator: Generator) -> None:
    engine = Engine(generator, EngineConfig(max_batch_size=1, max_queue=2))  # not started
    engine.submit(PROMPTS[0])
    engine.submit(PROMPTS[1])
    with pytest.raises(llmopt.BusyError, match="queue is full"):
        engine.submit(PROMPTS[2])


def test_kv_budget_limits_the_batch(generator: Generator) -> None:
    """The budget bounds the memory the KV stores hold (preallocated slots and positions
    included), not an estimate of the rows' lengths: at every step the stores stay within it,
    and it still lets more than one request run."""
    per_token = Engine(generator).kv_bytes_per_token
    budget = per_token * 60
    seen: list[tuple[int, int]] = []
    engine = Engine(generator, EngineConfig(max_batch_size=8, kv_budget_bytes=budget))
    engine.on_step = lambda record: seen.append((engine.batch_size, engine.kv_bytes))
    engine.start()
    try:
        requests = [engine.submit(p, SamplingParams(max_new_tokens=12, ignore_eos=True))
                    for p in PROMPTS]
        results = [r.result(timeout=60) for r in requests]
    finally:
        engine.close()
    assert all(r.stats.generated_tokens == 12 for r in results)
    peak = max(rows for rows, _ in seen)
    assert 2 <= peak < len(PROMPTS)
    assert max(held for _, held in seen) <= budget, seen


def test_a_lone_row_does_not_hold_a_whole_batch_of_slots(generator: Generator) -> None:
    """The slot store grows with the rows (doubling up to max_batch_size), so one request
    on a server configured for 64 holds one row's cache, not 64."""
    engine = Engine(generator, EngineConfig(max_batch_size=64))
    seen: list[int] = []
    engine.on_step = lambda record: seen.append(engine.kv_bytes)
    engine.start()
    try:
        engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True)).result(
            timeout=60)
    finally:
        engine.close()
    prompt = len(generator.encode(PROMPTS[0]))
    assert 0 < max(seen) <= (prompt + 6 + 1) * engine.kv_bytes_per_token


def test_bad_input_fails_in_the_callers_thread(generator: Generator) -> None:
    engine = Engine(generator)
    with pytest.raises(llmopt.InvalidInputError):
        engine.submit("")
    with pytest.raises(llmopt.InvalidInputError, match="context"):
        engine.submit(" ".join(["word"] * 400))


def test_close_drains_running_requests(generator: Generator) -> None:
    engine = Engine(generator).start()
    request = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=20, ignore_eos=True))
    engine.close(grace=30)
    assert request.result(timeout=1).finish_reason == "length"
    with pytest.raises(llmopt.BusyError, match="shutting down"):
        engine.submit(PROMPTS[0])
