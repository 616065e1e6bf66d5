"""Clients that set no deadline: the common case for tritonclient and perf_analyzer.

grpc reports an unbounded remaining time for such calls; a request that then had to wait for a
free encoder session failed INTERNAL (OverflowError from ``Semaphore.acquire``). The encoder is
served with one session, each run slowed to take 20 ms, so that concurrent requests surely
wait as they would on a real model."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llmopt
from llmopt.server import ServerConfig
from llmopt.server.deadline import NO_LIMIT_BEYOND_S, finite, request_timeout
from llmopt.server.status import DeadlineExceededError
from tests.server.conftest import ENCODER, make_repository

tc = pytest.importorskip("tritonclient.grpc")
THREADS, REQUESTS = 8, 6
NO_DEADLINE_US = 2**63 - 1  # the largest KServe timeout parameter a client can send


@pytest.fixture
def one_session_server(packages: dict[str, Path], tmp_path: Path,
                       start_server: Callable[..., Any]) -> Any:
    repository = make_repository(tmp_path / "repo", packages, [ENCODER],
                                 {ENCODER: "max_concurrency: 1\n"})
    server = start_server(repository, ServerConfig())
    slow_runs(server.repository.get(ENCODER), 0.02)
    return server


def slow_runs(model: Any, seconds: float) -> None:
    """Make a served encoder's session take ``seconds`` longer per run."""
    session = model.embedder.session

    class Slowed:
        def run(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return session.run(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(session, name)

    model.embedder.session = Slowed()


def _ids_input() -> Any:
    ids = np.random.default_rng(0).integers(1, 50, size=(8, 64), dtype=np.int64)
    tensor = tc.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    return tensor


def _concurrently(work: Callable[[], None]) -> list[str]:
    """Run ``work`` REQUESTS times in each of THREADS threads; the errors it raised."""
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def loop() -> None:
        start.wait()
        for _ in range(REQUESTS):
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - each failure is counted
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=loop) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_model_infer_without_deadline(one_session_server: Any) -> None:
    clients = threading.local()

    def infer() -> None:
        if not hasattr(clients, "c"):
            clients.c = tc.InferenceServerClient(one_session_server.address)
        result = clients.c.infer(ENCODER, [_ids_input()])  # no client_timeout: no deadline
        assert result.as_numpy("last_hidden_state").shape[:2] == (8, 64)

    assert _concurrently(infer) == []


def test_model_infer_with_the_largest_timeout_parameter(one_session_server: Any) -> None:
    def infer() -> None:
        with tc.InferenceServerClient(one_session_server.address) as client:
            client.infer(ENCODER, [_ids_input()], timeout=NO_DEADLINE_US)

    assert _concurrently(infer) == []


def test_model_stream_infer_without_stream_deadline(one_session_server: Any) -> None:
    def stream() -> None:
        answers: queue.Queue[Any] = queue.Queue()
        with tc.InferenceServerClient(one_session_server.address) as client:
            client.start_stream(callback=lambda result, error: answers.put(error or result))
            try:
                client.async_stream_infer(ENCODER, [_ids_input()])
                answer = answers.get(timeout=60)
            finally:
                client.stop_stream()
        if isinstance(answer, Exception):
            raise answer

    assert _concurrently(stream) == []


def test_embed_without_deadline(one_session_server: Any) -> None:
    def embed() -> None:
        with llmopt.Client(one_session_server.address) as client:  # timeout None: no deadline
            vectors = client.embed(ENCODER, ["the quick brown fox " * 12] * 8)
        assert vectors.shape[0] == 8

    assert _concurrently(embed) == []


def test_the_server_default_bounds_requests_without_deadline(
        packages: dict[str, Path], tmp_path: Path, start_server: Callable[..., Any]) -> None:
    """``request_timeout_s`` applies when the client sets nothing, and only then."""
    repository = make_repository(tmp_path / "repo", packages, [ENCODER],
                                 {ENCODER: "max_concurrency: 1\nrequest_timeout_s: 0.05\n"})
    server = start_server(repository, ServerConfig())
    model = server.repository.get(ENCODER)
    answered = threading.Event()
    with llmopt.Client(server.address) as client:
        model._slots.acquire()  # the one session is busy until released: every request waits
        try:
            with pytest.raises(DeadlineExceededError, match="free session"):
                client.embed(ENCODER, ["hello"])
            waiting = threading.Thread(target=lambda: (
                client.embed(ENCODER, ["hello"], timeout=30), answered.set()))
            waiting.start()
            waiting.join(0.5)
            assert not answered.is_set()  # still waiting: its own deadline replaced the default
        finally:
            model._slots.release()
        waiting.join(30)
    assert answered.is_set()


@pytest.mark.parametrize(("seconds", "expected"), [
    (None, None), (float("inf"), None), (float("nan"), None), (NO_LIMIT_BEYOND_S * 2, None),
    (2**63 - 1, None), (-1.0, 0.0), (2.5, 2.5)])
def test_finite_turns_unbounded_times_into_none(seconds: float | None,
                                                expected: float | None) -> None:
    assert finite(seconds) == expected


class _Context:
    def __init__(self, remaining: float) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float:
        return self.remaining


def test_request_timeout_takes_the_shortest_client_limit_else_the_default() -> None:
    no_deadline = _Context(9.2e9)  # what grpc reports for a call without a deadline
    assert request_timeout(no_deadline) is None
    assert request_timeout(no_deadline, default=30.0) == 30.0
    assert request_timeout(no_deadline, 2**63 - 1, default=30.0) == 30.0
    assert request_timeout(no_deadline, 5.0, default=30.0) == 5.0
    assert request_timeout(_Context(2.0), 5.0, default=30.0) == 2.0
    assert request_timeout(_Context(60.0), default=1.0) == 60.0
    assert request_timeout(None, default=None) is None


@pytest.mark.parametrize("bad", [0, -1, float("inf"), "30", True])
def test_request_timeout_s_must_be_a_positive_number(bad: Any) -> None:
    from llmopt.errors import InvalidInputError
    from llmopt.server import ModelConfig

    with pytest.raises(InvalidInputError, match="request_timeout_s"):
        ModelConfig(request_timeout_s=bad)
