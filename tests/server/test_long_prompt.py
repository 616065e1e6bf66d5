"""A long prompt sent with a short deadline, through the real server, while another stream
generates: the stream waits at most one prefill chunk between two of its tokens, the abandoned
prompt stops within one chunk of its deadline, and the metrics count a deadline."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

import llmopt
from llmopt.errors import InvalidInputError
from llmopt.runtime.engine import Request
from llmopt.runtime.prefill import StepRecord
from llmopt.server.status import DeadlineExceededError
from tests.server.conftest import DECODER, make_repository, sample, slow_steps
from tests.server.test_faults import _finished

CHUNK = 16
LONG = "the quick brown fox jumps over the lazy dog . " * 18  # 180 tokens: 12 chunks
CONFIG = f"prefill_chunk: {CHUNK}\nmax_prompt_tokens: 200\nwarmup: false\n"


@pytest.fixture
def chunked(start_server: Any, packages: dict[str, Path], tmp_path: Path) -> Any:
    """A server whose decoder prefills 16 tokens a step, 50 ms at least a forward pass (so the
    long prompt's 12 chunks and the stream's steps between them take over 1.2 s, and a 0.5 s
    deadline surely passes in the middle), recording every step and request."""
    from llmopt.server import ServerConfig

    repo = make_repository(tmp_path / "repo", packages, [DECODER], {DECODER: CONFIG})
    srv = start_server(repo, ServerConfig(metrics_port=0))
    model = srv.repository.get(DECODER)
    slow_steps(model, 0.05)
    srv.records, srv.requests = [], []
    model.engine.on_step = srv.records.append
    submit = model.engine.submit

    def recorded(*args: Any, **kwargs: Any) -> Request:
        srv.requests.append(submit(*args, **kwargs))
        return srv.requests[-1]

    model.engine.submit = recorded
    return srv


def test_long_prompt_with_short_deadline_stalls_a_stream_by_at_most_one_chunk(
        chunked: Any) -> None:
    with llmopt.Client(chunked.address, timeout=60) as client:
        stream = client.stream(DECODER, "hello", max_new_tokens=40, ignore_eos=True)
        next(stream)  # it is generating
        with pytest.raises(DeadlineExceededError):
            client.generate(DECODER, LONG, max_new_tokens=5, timeout=0.5)
        list(stream)
        assert stream.result.stats.generated_tokens == 40

    running, long = chunked.requests
    records: list[StepRecord] = list(chunked.records)
    decodes = [i for i, r in enumerate(records) if r.kind == "decode"
               and running.id in r.request_ids]
    between = [sum(r.tokens for r in records[a + 1:b] if r.kind == "prefill")
               for a, b in itertools.pairwise(decodes)]
    assert 0 < max(between) <= CHUNK  # the long prompt ran, a chunk at a time, between tokens
    chunks = [r for r in records if r.kind == "prefill" and long.id in r.request_ids]
    assert long.deadline is not None
    assert sum(1 for r in chunks if r.ended > long.deadline) <= 1
    assert len(chunks) < -(-180 // CHUNK)  # it did not run to the end
    assert long.result(timeout=10).finish_reason == "deadline"
    assert _finished(chunked, "deadline") == 1
    assert sample(chunked, "llmopt_generations_total",
                  {"model": DECODER, "finish_reason": "cancelled"}) == 0


def test_prompt_over_the_limit_gets_invalid_argument_naming_it(chunked: Any) -> None:
    over = "the quick brown fox jumps over the lazy dog . " * 22  # 220 tokens, context 256
    with llmopt.Client(chunked.address, timeout=60) as client, pytest.raises(
            InvalidInputError, match=r"220 tokens.*at most 200.*--max-prompt-tokens"):
        client.generate(DECODER, over, max_new_tokens=5)  # INVALID_ARGUMENT, mapped back
    assert chunked.requests == []
