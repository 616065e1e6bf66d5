"""Structured output through a real server: Generate with a response format (llmopt.Client and
``llmopt generate --server``), and a bad format answered INVALID_ARGUMENT while serving goes on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest

import llmopt
from llmopt import _proto
from llmopt.cli.main import main
from llmopt.errors import InvalidInputError
from llmopt.runtime.constraints import ResponseFormat
from llmopt.runtime.generator import Generator
from llmopt.runtime.tool_calls import parse_tool_call
from tests.runtime.test_constraints import TIME as TIME_TOOL
from tests.runtime.test_structured import SCHEMA
from tests.server.conftest import make_repository

MODEL = "tiny-json"


@pytest.fixture
def served(byte_level_decoder: Path, start_server: Callable[..., Any], tmp_path: Path) -> Any:
    return start_server(make_repository(tmp_path / "repo", {MODEL: byte_level_decoder}, [MODEL]))


def test_generate_with_a_schema_equals_in_process(served: Any, byte_level_decoder: Path) -> None:
    generator = llmopt.load(byte_level_decoder)
    assert isinstance(generator, Generator)
    fmt = ResponseFormat.json_schema(SCHEMA)
    with llmopt.Client(served.address, timeout=60) as client:
        for prompt in ("hello", "the sea"):
            result = client.generate(MODEL, prompt, max_new_tokens=120, response_format=fmt)
            expected = generator.generate(prompt, max_new_tokens=120, response_format=fmt)
            assert result.token_ids == expected.token_ids
            jsonschema.validate(json.loads(result.text), SCHEMA)
            assert result.finish_reason == "eos"
        digits = client.generate(MODEL, "hi", response_format=ResponseFormat.regex(r"[0-9]{5}"))
        assert len(digits.text) == 5 and digits.text.isdigit()
        cut = client.generate(MODEL, "hi", max_new_tokens=4, response_format=fmt)
        assert cut.finish_reason == "length"


def test_a_required_tool_call_travels_as_its_grammar(served: Any) -> None:
    tools = [{"type": "function", "function": {"name": "set_color", "parameters": {
        "type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
        "required": ["color"], "additionalProperties": False}}}, TIME_TOOL]
    fmt = ResponseFormat.from_openai(None, tools, "required")
    with llmopt.Client(served.address, timeout=60) as client:
        result = client.generate(MODEL, "paint it", max_new_tokens=60, response_format=fmt)
    call = parse_tool_call(result.text)
    assert call is not None and result.finish_reason == "eos", result.text
    assert call["name"] in ("set_color", "get_time")
    if call["name"] == "set_color":
        assert json.loads(call["arguments"])["color"] in ("red", "blue")


@pytest.mark.parametrize(("wire", "message"), [
    ({"json_schema": '{"type": "objec"}'}, "Invalid type"),
    ({"json_schema": "not json"}, "not a JSON object"),
    ({"regex": "[0-9"}, "invalid regex"),
    ({"lark": "start: nothing_here"}, "invalid lark"),
    ({}, "names no format"),
])
def test_a_bad_format_is_invalid_argument_and_serving_goes_on(served: Any, wire: dict[str, str],
                                                             message: str) -> None:
    """Raw requests, as any gRPC client may send them (llmopt.Client checks formats first)."""
    request = _proto.message("llmopt.v1.GenerateRequest")(model=MODEL, text="hello")
    request.sampling.response_format.SetInParent()
    for field, value in wire.items():
        setattr(request.sampling.response_format, field, value)
    with grpc.insecure_channel(served.address) as channel:
        call = channel.unary_stream(
            "/llmopt.v1.Llmopt/Generate", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=_proto.message("llmopt.v1.GenerateResponse").FromString)
        with pytest.raises(grpc.RpcError) as caught:
            list(call(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    with llmopt.Client(served.address, timeout=60) as client:
        assert client.generate(MODEL, "hello", max_new_tokens=3).stats.generated_tokens > 0


def test_the_client_refuses_a_bad_format_before_calling() -> None:
    with pytest.raises(InvalidInputError, match="unsupported response_format type"):
        llmopt.Client("127.0.0.1:1").generate(MODEL, "hi", response_format={"type": "yaml"})


def test_cli_generate_with_a_schema_file(served: Any, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(["generate", MODEL, "hello", "--server", served.address, "--raw",
                 "--max-new-tokens", "120", "--json-schema", str(schema), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(result["text"]), SCHEMA)
    assert main(["generate", MODEL, "hello", "--server", served.address, "--raw",
                 "--regex", "(yes|no)", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] in ("yes", "no")
    schema.write_text("{not json")
    assert main(["generate", MODEL, "hello", "--server", served.address,
                 "--json-schema", str(schema)]) == 1
    assert "is not JSON" in capsys.readouterr().err
    assert main(["generate", MODEL, "hello", "--server", served.address,
                 "--lark", str(tmp_path / "missing.lark")]) == 1
    assert "cannot read" in capsys.readouterr().err
