"""Bad HTTP requests: each a 4xx in OpenAI's error shape (Triton's on /v2), and the server
keeps serving; tokens, size limit, backpressure and draining as on the gRPC side."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llmopt.server import ServerConfig
from tests.server.conftest import DECODER, ENCODER, make_repository, slow_steps

TOKEN = "http-s3cret"
CHAT = {"model": DECODER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ONE_SLOT = "max_batch_size: 1\nmax_queue: 1\nwarmup: false\n"


def call(srv: Any, path: str, body: Any = None, *, method: str = "POST",
         token: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    """One request on a fresh connection: the status and the JSON body."""
    host, port = srv.http_url.split("://", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def assert_openai_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    error = body["error"]
    assert isinstance(error["message"], str) and "fix:" in error["message"]
    assert isinstance(error["type"], str) and "code" in error and "param" in error


BAD = [
    ("malformed JSON", b'{"model": ', 400),
    ("not an object", b"[1, 2]", 400),
    ("no model", {"messages": CHAT["messages"]}, 400),
    ("unknown model", {**CHAT, "model": "nope"}, 404),
    ("an encoder", {**CHAT, "model": ENCODER}, 400),
    ("messages wrong type", {**CHAT, "messages": "hi"}, 400),
    ("bad role", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("image part", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("temperature string", {**CHAT, "temperature": "hot"}, 400),
    ("temperature too high", {**CHAT, "temperature": 9}, 400),
    ("max_tokens zero", {**CHAT, "max_tokens": 0}, 400),
    ("max_tokens bool", {**CHAT, "max_tokens": True}, 400),
    ("n too large", {**CHAT, "n": 1000}, 400),
    ("five stops", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("top_logprobs without logprobs", {**CHAT, "top_logprobs": 2}, 400),
    ("unknown field", {**CHAT, "frobnicate": 1}, 400),
    ("stream_options without stream", {**CHAT, "stream_options": {"include_usage": True}}, 400),
    ("prompt too long", {**CHAT, "messages": [{"role": "user", "content": "word " * 5000}]},
     400),
]


@pytest.mark.parametrize(("body", "status"), [(b, s) for _, b, s in BAD],
                         ids=[name for name, _, _ in BAD])
def test_bad_chat_requests_are_4xx_in_openai_shape(server: Any, body: Any, status: int) -> None:
    raw = body if isinstance(body, bytes) else None
    got, answer = call(server, "/v1/chat/completions", None if raw else body, raw=raw)
    assert_openai_error(got, answer, status)
    ok, reply = call(server, "/v1/chat/completions", CHAT)  # and it keeps serving
    assert ok == 200 and reply["choices"][0]["message"]["role"] == "assistant"


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
BAD_TOOLS = [
    ("tools not a list", {"tools": {"type": "function"}}, "tools"),
    ("tool without function", {"tools": [{"type": "function"}]}, "tools"),
    ("tool name with spaces", {"tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools"),
    ("two tools one name", {"tools": [TOOL, TOOL]}, "tools"),
    ("parameters not a schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": "object"}}]}, "tools"),
    ("invalid parameters schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "no-such-type"}}}]}, "tools"),
    ("choice of an unknown tool", {"tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("choice not understood", {"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("parallel_tool_calls not a bool", {"tools": [TOOL], "parallel_tool_calls": "yes"},
     "parallel_tool_calls"),
    ("bad answer format beside tools", {"tools": [TOOL], "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}},
     "response_format"),
    ("history call not JSON", {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
         "function": {"name": "get_weather", "arguments": "{city"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ("history calls not a list", {"messages": [
        {"role": "assistant", "content": None, "tool_calls": "get_weather"}]},
     "messages[0].tool_calls"),
    ("tool result without its call id", {"messages": [{"role": "tool", "content": "sunny"}]},
     "messages[0].tool_call_id"),
]


@pytest.mark.parametrize(("extra", "param"), [(b, p) for _, b, p in BAD_TOOLS],
                         ids=[name for name, _, _ in BAD_TOOLS])
def test_bad_tool_specs_are_400_naming_the_field(server: Any, extra: dict[str, Any],
                                                 param: str) -> None:
    status, answer = call(server, "/v1/chat/completions", {**CHAT, **extra})
    assert_openai_error(status, answer, 400)
    assert answer["error"]["param"] == param, answer
    assert call(server, "/v1/chat/completions", CHAT)[0] == 200


def test_other_routes_refuse_bad_input(server: Any) -> None:
    assert_openai_error(*call(server, "/v1/completions", {"model": DECODER, "prompt": 5}), 400)
    assert_openai_error(*call(server, "/v1/completions", {"model": DECODER, "prompt": "x",
                                                          "echo": True}), 400)
    assert_openai_error(*call(server, "/v1/embeddings", {"model": ENCODER, "input": []}), 400)
    assert_openai_error(*call(server, "/v1/embeddings", {"model": ENCODER, "input": "x",
                                                         "encoding_format": "hex"}), 400)
    assert_openai_error(*call(server, "/v1/embeddings", {"model": DECODER, "input": "x"}), 400)
    assert_openai_error(*call(server, "/v1/nothing-here", method="GET"), 404)
    status, body = call(server, "/v2/models/nope/infer", {"inputs": [
        {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}]})
    assert status == 404 and "no model named" in body["error"]


def test_fuzzed_bodies_get_4xx_and_the_server_keeps_serving(server: Any) -> None:
    rng = random.Random(13)
    fields = ["model", "messages", "prompt", "input", "max_tokens", "temperature", "top_p", "n",
              "stop", "stream", "logprobs", "top_logprobs", "seed", "presence_penalty",
              "encoding_format", "stream_options", "echo", "response_format", "tools",
              "tool_choice", "parallel_tool_calls"]
    values: list[Any] = [None, True, -1, 0, 3, 1e300, -0.5, "", "x", DECODER, ENCODER, [],
                         [1, 2], ["a"], {}, {"role": "user"}, [{"role": "user", "content": 7}],
                         [{"role": "user", "content": "hi"}], 2**70, "\u0000\udfff"[:1]]
    routes = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
              f"/v2/models/{ENCODER}/infer", f"/v2/models/{DECODER}/infer"]
    deadline = time.monotonic() + 8
    count = 0
    while time.monotonic() < deadline:
        body = {rng.choice(fields): rng.choice(values) for _ in range(rng.randint(0, 6))}
        if rng.random() < 0.5:
            body.setdefault("model", rng.choice([DECODER, ENCODER]))
        route = rng.choice(routes)
        if rng.random() < 0.1:
            status, answer = call(server, route, raw=json.dumps(body).encode()[:-1])
        else:
            status, answer = call(server, route, body)
        assert status == 200 or 400 <= status < 500, (route, body, answer)
        if status != 200:
            error = answer["error"]
            assert isinstance(error, str if route.startswith("/v2") else dict), answer
        count += 1
    assert count > 20
    assert call(server, "/v1/chat/completions", CHAT)[0] == 200


@pytest.fixture
def guarded(start_server: Any, packages: dict[str, Path], tmp_path: Path) -> Any:
    """A server with a bearer token, a 4 KiB request limit and a one-slot, one-queue decoder
    that takes 20 ms a step."""
    repo = make_repository(tmp_path / "repo", packages, [DECODER], {DECODER: ONE_SLOT})
    srv = start_server(repo, ServerConfig(tokens=(TOKEN,), max_message_bytes=4096,
                                          http_port=0))
    slow_steps(srv.repository.get(DECODER), 0.02)
    return srv


def test_tokens_size_limit_backpressure_and_draining(guarded: Any) -> None:
    for token in (None, "wrong"):
        assert_openai_error(*call(guarded, "/v1/models", method="GET", token=token), 401)
    assert call(guarded, "/v2/health/live", method="GET")[0] == 200  # probes need no token
    assert call(guarded, "/v1/models", method="GET", token=TOKEN)[0] == 200
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(*call(guarded, "/v1/chat/completions", huge, token=TOKEN), 413)

    # one request runs, one waits: the third is refused 429 (the queue is full)
    long = {**CHAT, "max_tokens": 200, "temperature": 0}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        call(guarded, "/v1/chat/completions", long, token=TOKEN)[0])) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    model = guarded.repository.get(DECODER)
    deadline = time.monotonic() + 10
    while model.queue_depth() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert_openai_error(*call(guarded, "/v1/chat/completions", CHAT, token=TOKEN), 429)

    # draining: new requests 503, readiness 503, running ones finish
    stopper = threading.Thread(target=guarded.stop, args=(60,))
    stopper.start()
    while not guarded.draining:
        time.sleep(0.01)
    assert_openai_error(*call(guarded, "/v1/chat/completions", CHAT, token=TOKEN), 503)
    assert call(guarded, "/v2/health/ready", method="GET")[0] == 503
    for thread in threads:
        thread.join(timeout=60)
    stopper.join(timeout=60)
    assert results == [200, 200]
