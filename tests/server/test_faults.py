"""Faults: cancellation and deadlines free the engine slot, a full queue fails fast, and fuzzed
requests get errors while the server keeps answering."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

import llmopt
from llmopt import _proto
from llmopt.server.status import DeadlineExceededError
from tests.server.conftest import DECODER, make_repository, sample, slow_steps

ONE_SLOT = "max_batch_size: 1\nmax_queue: 1\nwarmup: false\n"
FULL = 255  # tokens the tiny model generates before its context (256) is full


@pytest.fixture
def one_slot(start_server: Any, packages: dict[str, Path], tmp_path: Path) -> Any:
    """A server whose decoder runs one request at a time with one waiting, 10 ms a step."""
    repo = make_repository(tmp_path / "repo", packages, [DECODER], {DECODER: ONE_SLOT})
    srv = start_server(repo)
    slow_steps(srv.repository.get(DECODER), 0.01)
    return srv


def _finished(srv: Any, *reasons: str) -> float:
    """Generations that ended for ``reasons``: the server records a call's end on its handler
    thread, possibly just after the client has seen it, so wait for it (bounded)."""
    deadline = time.monotonic() + 10
    while True:
        count = sum(sample(srv, "llmopt_generations_total",
                           {"model": DECODER, "finish_reason": r}) for r in reasons)
        if count or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def test_cancel_mid_stream_frees_the_slot(one_slot: Any) -> None:
    with llmopt.Client(one_slot.address) as client:
        long = client.stream(DECODER, "hello", max_new_tokens=FULL, ignore_eos=True)
        next(long)  # it runs, and holds the only slot
        waiting = client.stream(DECODER, "the sea", max_new_tokens=5, ignore_eos=True)
        long.cancel()
        with pytest.raises(llmopt.LlmoptError, match=r"(?i)cancel"):
            list(long)
        assert "".join(waiting) == waiting.result.text
        assert waiting.result.stats.generated_tokens == 5
    # the server saw the cancellation and ended the long request early
    assert _finished(one_slot, "cancelled") == 1
    generated = sample(one_slot, "llmopt_generated_tokens_total", {"model": DECODER})
    assert generated < FULL


def test_deadline_stops_generation_and_frees_the_slot(one_slot: Any) -> None:
    with llmopt.Client(one_slot.address) as client:
        with pytest.raises(DeadlineExceededError):
            client.generate(DECODER, "hello", max_new_tokens=FULL, ignore_eos=True, timeout=0.3)
        after = client.generate(DECODER, "the sea", max_new_tokens=4, ignore_eos=True, timeout=30)
        assert after.stats.generated_tokens == 4
    assert _finished(one_slot, "deadline", "cancelled") == 1
    assert sample(one_slot, "llmopt_generated_tokens_total", {"model": DECODER}) < FULL + 4


def test_full_queue_gives_resource_exhausted(one_slot: Any) -> None:
    outcomes: list[Any] = []
    barrier = threading.Barrier(6)

    def call() -> None:
        with llmopt.Client(one_slot.address) as client:
            client.list_models()  # connected before the race starts
            barrier.wait()
            try:
                outcomes.append(client.generate(DECODER, "hello", max_new_tokens=50,
                                                ignore_eos=True, timeout=60))
            except llmopt.LlmoptError as exc:
                outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    busy = [o for o in outcomes if isinstance(o, llmopt.BusyError)]
    done = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(outcomes) == 6 and len(busy) + len(done) == 6
    assert busy and len(done) >= 2  # one ran, one waited; the rest were refused at once
    assert "queue is full" in str(busy[0])
    assert all(d.stats.generated_tokens == 50 for d in done)
    refused = sample(one_slot, "llmopt_requests_total",
                     {"method": "Generate", "model": DECODER, "code": "RESOURCE_EXHAUSTED"})
    assert refused == len(busy)


def _methods() -> list[tuple[str, bool, bool]]:
    out = []
    for name in (_proto.LLMOPT_SERVICE, _proto.KSERVE_SERVICE):
        for m in _proto.service(name).methods:
            out.append((f"/{name}/{m.name}", m.client_streaming, m.server_streaming))
    return out


def _call(channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool,
          payload: bytes) -> grpc.StatusCode:
    try:
        if client_streaming:
            responses = channel.stream_stream(path)(iter([payload]), timeout=20)
            list(responses)
        elif server_streaming:
            list(channel.unary_stream(path)(payload, timeout=20))
        else:
            channel.unary_unary(path)(payload, timeout=20)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_fuzzed_requests_get_errors_and_the_server_still_answers(server: Any) -> None:
    rng = random.Random(1234)
    payloads = [rng.randbytes(rng.choice([1, 3, 17, 64, 512, 4096])) for _ in range(24)]
    wrong_types = [_proto.message("llmopt.v1.GenerateRequest")(
                       model=DECODER, text="hi", sampling={"max_new_tokens": 2}),
                   _proto.message("inference.ModelInferRequest")(model_name=DECODER, id="x"),
                   _proto.message("llmopt.v1.EmbedRequest")(model=DECODER, texts=["a"] * 50)]
    payloads += [m.SerializeToString() for m in wrong_types]
    payloads += [b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 10, b"\x0a\x02\xc3\x28"]  # bad length, UTF-8
    seen: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(server.address) as channel:
        for path, client_streaming, server_streaming in _methods():
            for payload in payloads:
                code = _call(channel, path, client_streaming, server_streaming, payload)
                seen[code] = seen.get(code, 0) + 1
                assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                    path, payload[:40])
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 50
    with llmopt.Client(server.address) as client:
        assert client.generate(DECODER, "hello", max_new_tokens=3,
                               ignore_eos=True).stats.generated_tokens == 3
        assert {m.state for m in client.list_models()} == {"READY"}


def test_health_checks_are_answered_when_every_worker_is_busy(
        start_server: Any, packages: dict[str, Path], tmp_path: Path) -> None:
    """max_workers counts API calls only: with both slots streaming, a third call is refused
    RESOURCE_EXHAUSTED at once, while health checks (what Kubernetes probes) still answer."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llmopt.server import ServerConfig

    repo = make_repository(tmp_path / "repo", packages, [DECODER],
                           {DECODER: "max_batch_size: 4\nwarmup: false\n"})
    srv = start_server(repo, ServerConfig(max_workers=2))
    slow_steps(srv.repository.get(DECODER), 0.01)
    with llmopt.Client(srv.address) as client:
        streams = [client.stream(DECODER, "hello", max_new_tokens=FULL, ignore_eos=True)
                   for _ in range(2)]
        for stream in streams:
            next(stream)  # both are running: every API slot is taken
        with pytest.raises(llmopt.BusyError, match="limit of 2 calls"):
            client.list_models()
        with grpc.insecure_channel(srv.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", _proto.LLMOPT_SERVICE):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for stream in streams:
            stream.cancel()
    with llmopt.Client(srv.address) as client:  # the slots are free again
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.list_models()
                break
            except llmopt.BusyError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
