"""Chunked prefill: a long prompt runs one chunk per engine step, between decode steps of the
running streams, and stops within one chunk once it is cancelled or past its deadline.

The bounds are asserted on the engine's step records (``Engine.on_step``), in prompt tokens per
chunk, never on wall-clock speed.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from llmopt.errors import InvalidInputError
from llmopt.runtime.engine import Engine, EngineConfig, Request
from llmopt.runtime.generator import Generator
from llmopt.runtime.prefill import StepRecord
from llmopt.runtime.sampling import SamplingParams

CHUNK = 16
LONG = "the quick brown fox jumps over the lazy dog . " * 18  # 180 tokens of a 256 context
SHORT = "hello world , how are you ?"
GREEDY = SamplingParams(max_new_tokens=20, ignore_eos=True)


def started(generator: Generator, chunk: int | None) -> tuple[Engine, list[StepRecord]]:
    engine = Engine(generator, EngineConfig(prefill_chunk=chunk))
    records: list[StepRecord] = []
    engine.on_step = records.append
    return engine.start(), records


def prefill_chunks(records: list[StepRecord], request: Request) -> list[StepRecord]:
    return [r for r in records if r.kind == "prefill" and request.id in r.request_ids]


@pytest.mark.parametrize("chunk", [0, CHUNK, 7])
def test_chunked_greedy_output_equals_one_pass(generator: Generator, chunk: int) -> None:
    single = generator.generate(LONG, GREEDY).token_ids
    engine, records = started(generator, chunk)
    try:
        request = engine.submit(LONG, GREEDY)
        result = request.result(timeout=60)
    finally:
        engine.close()
    assert result.token_ids == single
    prompt = len(generator.encode(LONG))
    sizes = [r.tokens for r in prefill_chunks(records, request)]
    assert sum(sizes) == prompt
    assert sizes == ([prompt] if chunk == 0 else [chunk] * (prompt // chunk) + [prompt % chunk])


def test_short_prompts_share_one_chunk_and_a_long_one_prefills_alone(
        generator: Generator) -> None:
    engine = Engine(generator, EngineConfig(prefill_chunk=CHUNK * 4, max_prefill_batch=4))
    records: list[StepRecord] = []
    engine.on_step = records.append
    requests = [engine.submit(p, GREEDY) for p in (SHORT, SHORT, LONG)]  # queued, then started
    engine.start()
    try:
        singles = [generator.generate(p, GREEDY).token_ids for p in (SHORT, SHORT, LONG)]
        assert [r.result(timeout=60).token_ids for r in requests] == singles
    finally:
        engine.close()
    prefills = [r for r in records if r.kind == "prefill"]
    assert prefills[0].request_ids == (requests[0].id, requests[1].id)
    assert all(r.request_ids == (requests[2].id,) for r in prefills[1:])
    assert max(r.tokens for r in prefills) <= CHUNK * 4


def test_long_prompt_delays_a_running_stream_by_at_most_one_chunk(
        generator: Generator) -> None:
    engine, records = started(generator, CHUNK)
    try:
        # long enough to outlive the chunks even where a loaded machine admits LONG late
        running = engine.submit(SHORT, SamplingParams(max_new_tokens=200, ignore_eos=True))
        next(iter(running))  # it is decoding
        joining = engine.submit(LONG, GREEDY)
        joining.result(timeout=60)
        running.result(timeout=60)
    finally:
        engine.close()
    decodes = [i for i, r in enumerate(records) if r.kind == "decode"
               and running.id in r.request_ids]
    between = [sum(r.tokens for r in records[a + 1:b] if r.kind == "prefill")
               for a, b in itertools.pairwise(decodes)]
    chunks = prefill_chunks(records, joining)
    assert len(chunks) == -(-len(generator.encode(LONG)) // CHUNK)  # it was chunked
    assert max(between) <= CHUNK  # between two tokens of the stream, at most one chunk
    at = [records.index(c) for c in chunks]
    assert at[-1] < decodes[-1]  # the stream was still running when the last chunk ran
    assert all(any(a < i < b for i in decodes) for a, b in itertools.pairwise(at))  # interleaved


def stop_after_first_chunk(engine: Engine, action: str) -> tuple[Request, list[StepRecord]]:
    """Submit the long prompt; after its first chunk, the engine thread waits until the test
    has the request, then ``action``: ``cancel`` it, or let its deadline pass (and cancel it,
    as the server does when a call's deadline ends it)."""
    records: list[StepRecord] = []
    submitted = threading.Event()
    holder: list[Request] = []

    def on_step(record: StepRecord) -> None:
        records.append(record)
        if record.kind != "prefill" or len(records) > 1:
            return
        submitted.wait(10)
        request = holder[0]
        if action == "deadline":
            assert request.deadline is not None
            time.sleep(max(0.0, request.deadline - time.monotonic()) + 0.01)
        request.cancel()

    engine.on_step = on_step
    engine.start()
    holder.append(engine.submit(LONG, GREEDY, timeout=0.5 if action == "deadline" else None))
    submitted.set()
    return holder[0], records


@pytest.mark.parametrize("action", ["cancel", "deadline"])
def test_abandoned_prompt_stops_within_one_chunk(generator: Generator, action: str) -> None:
    engine = Engine(generator, EngineConfig(prefill_chunk=CHUNK))
    try:
        request, records = stop_after_first_chunk(engine, action)
        result = request.result(timeout=60)
    finally:
        engine.close()
    assert result.finish_reason == ("cancelled" if action == "cancel" else "deadline")
    assert result.token_ids == []
    assert len(prefill_chunks(records, request)) == 1  # not one chunk more ran
    assert engine.batch_size == 0


def test_prompt_over_max_prompt_tokens_is_refused_naming_the_limit_and_flag(
        generator: Generator) -> None:
    engine = Engine(generator, EngineConfig(max_prompt_tokens=100))
    with pytest.raises(InvalidInputError) as error:
        engine.submit(LONG, GREEDY)
    message = f"{error.value} {error.value.fix}"
    assert "180 tokens" in message and "at most 100" in message
    assert "max_prompt_tokens" in message and "--max-prompt-tokens" in message
    assert engine.queue_depth == 0


@pytest.mark.parametrize("field, value", [("prefill_chunk", -1), ("max_prompt_tokens", 0)])
def test_bad_limits_are_refused(field: str, value: int) -> None:
    with pytest.raises(InvalidInputError, match=field):
        EngineConfig(**{field: value})
