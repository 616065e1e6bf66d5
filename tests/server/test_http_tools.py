"""Tool calling on the chat route through the real ``openai`` SDK: tools rendered into the
prompt, the call equal to the in-process one, streamed calls the SDK's stream helper adds up,
``tool_choice`` and ``parallel_tool_calls``, tool results in the history."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

import llmopt
from llmopt.runtime.constraints import ResponseFormat
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.tool_calls import parse_tool_calls
from tests import tiny_tokenizers
from tests.server.conftest import make_repository, openai_client

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
    "additionalProperties": False}}}
SCHEMAS = {"get_weather": CITY, "get_time": TIME["function"]["parameters"]}
TOOLS = [WEATHER, TIME]


class Weather(pydantic.BaseModel):
    """The weather in a city."""

    city: str = pydantic.Field(max_length=12)


def ask(client: openai.OpenAI, **extra: Any) -> Any:
    asked = {"model": "bytes", "messages": MESSAGES, "temperature": 0, "max_tokens": 96,
             "tools": TOOLS, **extra}
    return client.chat.completions.create(**asked)


def valid_calls(message: Any) -> list[tuple[str, str]]:
    """The message's calls as (name, arguments), each checked against its tool's schema."""
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    return calls


@pytest.fixture(scope="module")
def byte_level_generator(byte_level_decoder: Path) -> Any:
    return llmopt.load(byte_level_decoder)


def test_the_tools_are_rendered_and_the_call_equals_in_process(
        byte_level_oai: openai.OpenAI, byte_level_generator: Any) -> None:
    reply = ask(byte_level_oai, tool_choice="required")
    prompt = byte_level_generator.render_chat(MESSAGES, TOOLS, "required")
    assert reply.usage.prompt_tokens == len(prompt)  # the tools are in the prompt
    assert "get_weather" in byte_level_generator.tokenizer.decode(prompt)
    expected = byte_level_generator.generate(prompt, SamplingParams(
        max_new_tokens=96, response_format=ResponseFormat.from_openai(None, TOOLS, "required")))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert valid_calls(choice.message) == [
        (c["name"], c["arguments"]) for c in parse_tool_calls(expected.text) or []]
    assert choice.message.tool_calls[0].id.startswith("call_")


def test_a_streamed_call_accumulated_by_the_sdk_equals_the_whole_one(
        byte_level_oai: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    asked: dict[str, Any] = {"model": "bytes", "messages": MESSAGES, "temperature": 0,
                             "max_tokens": 96, "tools": [tool], "tool_choice": "required"}
    whole = byte_level_oai.chat.completions.create(**asked).choices[0]
    with byte_level_oai.chat.completions.stream(**asked) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert final.message.content is None and whole.message.content is None
    (streamed,), (call,) = final.message.tool_calls or [], whole.message.tool_calls or []
    assert (streamed.function.name, streamed.function.arguments) == (
        call.function.name, call.function.arguments)
    assert isinstance(streamed.function.parsed_arguments, Weather)  # the SDK parsed them
    assert streamed.id.startswith("call_")


def streamed_calls(client: openai.OpenAI, **asked: Any) -> tuple[list[tuple[str, str]], Any]:
    """The calls of a streamed reply, put together from its ``delta.tool_calls`` chunks, and
    its finish_reason."""
    pieces: dict[int, list[str]] = {}
    finish = None
    for chunk in ask(client, **asked, stream=True):
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            if delta.id:  # a call starts: id, type and name come once
                assert delta.type == "function" and delta.index == len(pieces)
                pieces[delta.index] = [delta.function.name, ""]
            pieces[delta.index][1] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return [(name, arguments) for name, arguments in pieces.values()], finish


def test_parallel_calls_come_one_per_entry_streamed_or_whole(byte_level_oai: openai.OpenAI
                                                             ) -> None:
    asked = {"tool_choice": "required", "parallel_tool_calls": True, "max_tokens": 200,
             "temperature": 1.0}
    for seed in range(16):  # the random model ends after a call about every other time
        whole = ask(byte_level_oai, **asked, seed=seed).choices[0]
        if whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) >= 2:
            break
    else:
        pytest.fail("no seed gave two calls that ended within max_tokens")
    calls = valid_calls(whole.message)
    assert streamed_calls(byte_level_oai, **asked, seed=seed) == (calls, "tool_calls")


def test_without_parallel_calls_one_call_ends_the_answer(byte_level_oai: openai.OpenAI) -> None:
    asked = {"tool_choice": "required", "parallel_tool_calls": False}
    whole = ask(byte_level_oai, **asked).choices[0]
    assert len(valid_calls(whole.message)) == 1 and whole.finish_reason == "tool_calls"
    assert streamed_calls(byte_level_oai, **asked) == (valid_calls(whole.message), "tool_calls")


def test_tool_choice_variants(byte_level_oai: openai.OpenAI) -> None:
    named = ask(byte_level_oai, tool_choice={"type": "function",
                                             "function": {"name": "get_time"}})
    assert [name for name, _ in valid_calls(named.choices[0].message)] == ["get_time"]
    none = ask(byte_level_oai, tool_choice="none", max_tokens=8)
    plain = byte_level_oai.chat.completions.create(model="bytes", messages=MESSAGES,
                                                   temperature=0, max_tokens=8)
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # not offered: not rendered
    auto = ask(byte_level_oai, tool_choice="auto").choices[0]
    if auto.message.tool_calls:
        assert auto.finish_reason == "tool_calls" and valid_calls(auto.message)
    else:
        assert not (auto.message.content or "").startswith("{")
    assert ask(byte_level_oai).usage.prompt_tokens > plain.usage.prompt_tokens  # auto offers


def test_tool_results_in_the_history_are_rendered(byte_level_oai: openai.OpenAI,
                                                  byte_level_generator: Any) -> None:
    first = ask(byte_level_oai, tool_choice="required").choices[0].message
    (call,) = first.tool_calls or []
    history = [*MESSAGES, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    reply = ask(byte_level_oai, messages=history, tool_choice="none", max_tokens=8)
    assert reply.choices[0].message.content is not None
    rendered = byte_level_generator.render_chat([
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.id}])
    assert reply.usage.prompt_tokens == len(rendered)
    text = byte_level_generator.tokenizer.decode(rendered)
    assert f'{{"name": "{call.function.name}", "arguments": ' in text and "sunny, 21 C" in text


def test_a_template_that_takes_tools_renders_them(byte_level_decoder: Path, tmp_path: Path,
                                                  start_server: Callable[..., Any]) -> None:
    from llmopt.server import ServerConfig

    package = tmp_path / "tools-template"
    shutil.copytree(byte_level_decoder, package)
    (package / "chat_template.jinja").write_text(tiny_tokenizers.TOOLS_CHAT_TEMPLATE)
    srv = start_server(make_repository(tmp_path / "repo", {"bytes": package}, ["bytes"]),
                       ServerConfig(http_port=0))
    reply = ask(openai_client(srv), tool_choice="required")
    expected = llmopt.load(package).render_chat(MESSAGES, TOOLS)
    assert reply.usage.prompt_tokens == len(expected)
    assert valid_calls(reply.choices[0].message)


@pytest.mark.real_model
def test_smollm2_calls_the_tool_its_prompt_offers(smollm2_package: Path, tmp_path: Path,
                                                  start_server: Callable[..., Any]) -> None:
    """SmolLM2's template takes no tools, so they reach it in the system message; it reads
    them and the question, and calls the tool with the city asked about."""
    from llmopt.server import ServerConfig

    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {**CITY, "properties": {"city": {"type": "string", "maxLength": 40}}}}}
    srv = start_server(make_repository(tmp_path / "repo", {"smollm2": smollm2_package},
                                       ["smollm2"]), ServerConfig(http_port=0))
    client = openai_client(srv)
    asked: dict[str, Any] = {
        "model": "smollm2", "temperature": 0, "max_tokens": 48, "tools": [weather],
        "tool_choice": "required",
        "messages": [{"role": "user", "content": "What is the weather like in Paris today?"}]}
    whole = client.chat.completions.create(**asked).choices[0]
    (call,) = whole.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    with client.chat.completions.stream(**asked) as stream:
        (streamed,) = stream.get_final_completion().choices[0].message.tool_calls or []
    assert streamed.function.arguments == call.function.arguments
