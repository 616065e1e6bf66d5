"""Many streaming HTTP clients at once: no errors, greedy answers identical to single requests;
and a client that disconnects mid-stream frees its batch slot at once."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from llmopt.server import ServerConfig
from tests.server.conftest import DECODER, make_repository, sample, slow_steps

PROMPTS = ["the quick brown fox", "hello world , how are you ?", "one two three"]
QUESTIONS = ["What is the capital of France?", "List three fruits.",
             "Write a short poem about the sea."]


def _stream(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> str:
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=max_tokens, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def hammer(url: str, model: str, prompts: list[str], *, clients: int, seconds: float,
           max_tokens: int) -> tuple[dict[str, str], list[str], int]:
    """``clients`` threads streaming greedy chats for ``seconds``: the single-request answers,
    every mismatch or error, and the number of streams done."""
    def client() -> openai.OpenAI:
        return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                             timeout=300)

    alone = {p: _stream(client(), model, p, max_tokens) for p in prompts}
    problems: list[str] = []
    done = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        own = client()
        turn = index
        while time.monotonic() < deadline:
            prompt = prompts[turn % len(prompts)]
            turn += 1
            try:
                text = _stream(own, model, prompt, max_tokens)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
                with lock:
                    problems.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                done[0] += 1
                if text != alone[prompt]:
                    problems.append(f"{prompt!r}: {text!r} != {alone[prompt]!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return alone, problems, done[0]


def test_16_streaming_clients_agree_with_single_requests(server: Any) -> None:
    _, problems, done = hammer(server.http_url, DECODER, PROMPTS, clients=16, seconds=15,
                               max_tokens=16)
    assert problems == []
    assert done >= 16


@pytest.fixture
def one_slot(start_server: Any, packages: dict[str, Path], tmp_path: Path) -> Any:
    repo = make_repository(tmp_path / "repo", packages, [DECODER],
                           {DECODER: "max_batch_size: 1\nwarmup: false\n"})
    srv = start_server(repo, ServerConfig(http_port=0))
    slow_steps(srv.repository.get(DECODER), 0.02)
    return srv


def _wait(condition: Callable[[], bool], seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_a_disconnecting_client_frees_its_slot(one_slot: Any, stream: bool) -> None:
    model = one_slot.repository.get(DECODER)
    host, port = one_slot.http_url.split("://", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": DECODER, "prompt": "hello", "max_tokens": 250, "temperature": 0,
            "stream": stream}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json"})
    assert _wait(lambda: model.batch_size() == 1)  # it runs, holding the only slot
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()
    freed_at = time.monotonic()
    assert _wait(lambda: model.batch_size() == 0, 3)
    assert time.monotonic() - freed_at < 2.5  # 250 tokens at 20 ms a step would take 5 s
    assert _wait(lambda: sample(one_slot, "llmopt_generations_total",
                                {"model": DECODER, "finish_reason": "cancelled"}) == 1)
    generated = sample(one_slot, "llmopt_generated_tokens_total", {"model": DECODER})
    assert generated < 100


@pytest.mark.slow
@pytest.mark.real_model
def test_16_streaming_clients_on_smollm2_for_a_minute(smollm2_package: Path,
                                                      tmp_path: Path) -> None:
    from llmopt.server import create_server

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "smollm2").symlink_to(smollm2_package, target_is_directory=True)
    srv, _ = create_server(repo, "127.0.0.1:0", ServerConfig(http_port=0))
    with srv:
        alone, problems, done = hammer(srv.http_url, "smollm2", QUESTIONS, clients=16,
                                       seconds=60, max_tokens=24)
    assert problems == []
    assert done >= 16 and "Paris" in alone[QUESTIONS[0]]
