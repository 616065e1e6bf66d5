"""ResponseFormat shapes and errors, OpenAI request shapes, tool-call grammars, and the token
masks of a grammar over a tiny byte-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmopt.errors import InvalidInputError
from llmopt.runtime.constraints import ResponseFormat, TokenConstraint, grammar_tokenizer
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.tool_calls import (
    ArgumentsDelta,
    CallStarted,
    ContentDelta,
    ToolCallStream,
    parse_tool_call,
    parse_tool_calls,
)
from tests import tiny_tokenizers

EOS = 2
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_tokenizers.byte_level_tokenizer(tmp_path_factory.mktemp("byte-level"))


def follow(fmt: ResponseFormat, tokenizer: Any, text: str) -> TokenConstraint:
    """A constraint that consumed ``text`` token by token, each one checked against the mask."""
    constraint = TokenConstraint(fmt, tokenizer, [EOS])
    for token in tokenizer(text)["input_ids"]:
        assert constraint.allowed(len(tokenizer))[token], (text, tokenizer.decode([token]))
        constraint.consume(token)
    return constraint


def allows(fmt: ResponseFormat, tokenizer: Any, prefix: str, text: str) -> bool:
    token = tokenizer(text)["input_ids"][0]
    return bool(follow(fmt, tokenizer, prefix).allowed(len(tokenizer))[token])


# -- shapes and errors -------------------------------------------------------------------------

def test_constructors_keep_what_they_were_given() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {}}}
    fmt = ResponseFormat.json_schema(schema)
    assert (fmt.kind, fmt.strict, fmt.schema) == ("json_schema", True, schema)
    assert list(fmt.schema or {}) == list(schema)  # property order kept: it is the output's
    assert ResponseFormat.json_object().schema == {"type": "object"}
    digits = ResponseFormat.regex(r"\d+")
    assert digits.text == r"\d+" and digits.schema is None
    assert ResponseFormat.lark('start: "a"').kind == "lark"
    assert ResponseFormat.regex("a+") == ResponseFormat.regex("a+") != ResponseFormat.regex("b+")


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ResponseFormat.json_schema({"type": "objec"}), "Invalid type"),
    (lambda: ResponseFormat.json_schema({"type": "string", "format": "zip-code"}),
     "Unknown format"),
    (lambda: ResponseFormat.json_schema(["not", "a", "schema"]), "is an object"),  # type: ignore[arg-type]
    (lambda: ResponseFormat.json_schema({"enum": [{1, 2}]}), "is not JSON"),
    (lambda: ResponseFormat.regex("[0-9"), "invalid regex"),
    (lambda: ResponseFormat.regex(""), "needs its pattern"),
    (lambda: ResponseFormat.lark("start: undefined_rule"), "invalid lark"),
    (lambda: ResponseFormat("yaml", "x"), "unknown response format"),
])
def test_bad_formats_fail_when_made_with_a_fix(make: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as caught:
        make()
    assert caught.value.fix


def test_strict_false_ignores_what_the_compiler_does_not_implement() -> None:
    schema = {"type": "string", "format": "zip-code"}
    with pytest.raises(InvalidInputError, match="strict=False"):
        ResponseFormat.json_schema(schema)
    assert not ResponseFormat.json_schema(schema, strict=False).strict


@pytest.mark.parametrize(("response_format", "kind"), [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, "json_object"),
    ({"type": "json_schema", "json_schema": {"name": "answer", "strict": True,
                                             "schema": {"type": "object"}}}, "json_schema"),
])
def test_openai_response_formats(response_format: Any, kind: str | None) -> None:
    fmt = ResponseFormat.from_openai(response_format)
    assert (fmt.kind if fmt else None) == kind


@pytest.mark.parametrize(("response_format", "tools", "tool_choice", "message"), [
    ("json", None, None, "must be an object"),
    ({"type": "xml"}, None, None, "unsupported response_format type 'xml'"),
    ({"type": "json_schema"}, None, None, "needs a \"json_schema\" object"),
    ({"type": "json_schema", "json_schema": {"schema": []}}, None, None, "needs a"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, None, None,
     "is not 1-64 letters"),
    ({"type": "json_schema", "json_schema": {"strict": "yes", "schema": {}}}, None, None,
     "strict must be true or false"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": 5}}}, None, None,
     "invalid json schema"),
    (None, None, "required", "has no tools"),
    (None, [], "auto", "non-empty list"),
    (None, [{"type": "function"}], "auto", "each tool is"),
    (None, [{"type": "function", "function": {"name": "bad name"}}], "auto", "tool name"),
    (None, [WEATHER, WEATHER], "auto", "two tools are named"),
    (None, [{"type": "function", "function": {"name": "f", "parameters": 3}}], "auto",
     "parameters must be"),
    (None, [WEATHER], "sometimes", "is not understood"),
    (None, [WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
])
def test_bad_openai_shapes_name_the_fix(response_format: Any, tools: Any, tool_choice: Any,
                                        message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as caught:
        ResponseFormat.from_openai(response_format, tools, tool_choice)
    assert caught.value.fix


def test_sampling_params_take_a_format_or_openais_dict() -> None:
    params = SamplingParams(response_format={"type": "json_object"})  # type: ignore[arg-type]
    assert params.response_format == ResponseFormat.json_object()
    with pytest.raises(InvalidInputError, match="ignore_eos cannot combine"):
        SamplingParams(response_format=ResponseFormat.json_object(), ignore_eos=True)
    with pytest.raises(InvalidInputError, match="must be a ResponseFormat"):
        SamplingParams(response_format="json")  # type: ignore[arg-type]


# -- masks -------------------------------------------------------------------------------------

def test_the_mask_allows_only_what_continues_the_schema(tokenizer: Any) -> None:
    fmt = ResponseFormat.json_schema({
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False})
    first = TokenConstraint(fmt, tokenizer, [EOS]).allowed(len(tokenizer))
    assert [tokenizer.decode([t]) for t in np.flatnonzero(first)] == ["{"]
    assert allows(fmt, tokenizer, '{"ok": ', "t") and allows(fmt, tokenizer, '{"ok": ', "f")
    assert not allows(fmt, tokenizer, '{"ok": ', "1")
    assert not allows(fmt, tokenizer, '{"ok": true', ",")  # no other properties
    assert not follow(fmt, tokenizer, '{"ok": tru').complete
    done = follow(fmt, tokenizer, '{"ok": true}')
    assert done.complete  # nothing may follow: only end-of-sequence is left
    assert np.flatnonzero(done.allowed(len(tokenizer))).tolist() == [EOS]


def test_end_of_sequence_is_allowed_only_where_the_grammar_accepts(tokenizer: Any) -> None:
    fmt = ResponseFormat.regex(r"[0-9]{1,3}")
    assert not TokenConstraint(fmt, tokenizer, [EOS]).allowed(len(tokenizer))[EOS]
    two = follow(fmt, tokenizer, "42")
    assert two.allowed(len(tokenizer))[EOS] and not two.complete
    assert follow(fmt, tokenizer, "421").complete


def test_the_mask_fits_a_wider_logits_row(tokenizer: Any) -> None:
    constraint = TokenConstraint(ResponseFormat.regex("a"), tokenizer, [EOS])
    wide = constraint.allowed(len(tokenizer) + 37)
    assert wide.shape == (len(tokenizer) + 37,) and not wide[len(tokenizer):].any()
    assert constraint.allowed(10).shape == (10,)


def test_the_grammar_tokenizer_is_built_once_per_tokenizer(tokenizer: Any) -> None:
    assert grammar_tokenizer(tokenizer, [EOS]) is grammar_tokenizer(tokenizer, [EOS])
    assert grammar_tokenizer(tokenizer, [EOS]) is not grammar_tokenizer(tokenizer, [EOS, 1])


def test_a_tokenizer_it_cannot_read_is_a_clear_error(tmp_path: Path) -> None:
    words = tiny_tokenizers.decoder_tokenizer(tmp_path)  # word-level: no byte decoder
    with pytest.raises(InvalidInputError, match="cannot read this package's tokenizer"):
        TokenConstraint(ResponseFormat.json_object(), words, [EOS])
    with pytest.raises(InvalidInputError, match="has none"):
        TokenConstraint(ResponseFormat.json_object(), None, [EOS])


# -- tool calls --------------------------------------------------------------------------------

def test_a_required_tool_call_names_a_tool_with_its_arguments(tokenizer: Any) -> None:
    fmt = ResponseFormat.from_openai(None, [WEATHER, TIME], "required")
    assert fmt is not None
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert follow(fmt, tokenizer, call).complete
    assert not allows(fmt, tokenizer, '{"name": "get_', "x")  # no tool named get_x...
    assert not allows(fmt, tokenizer, "", "H")  # a call, not text
    assert not allows(fmt, tokenizer, "{", "\n")  # compact, like the JSON formats
    assert parse_tool_call(call) == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_a_named_tool_choice_allows_that_tool_only(tokenizer: Any) -> None:
    fmt = ResponseFormat.from_openai(None, [WEATHER, TIME],
                                     {"type": "function", "function": {"name": "get_time"}})
    assert fmt is not None
    assert allows(fmt, tokenizer, '{"name": "get_', "t")
    assert not allows(fmt, tokenizer, '{"name": "get_', "w")


def test_auto_tool_choice_allows_a_plain_answer(tokenizer: Any) -> None:
    fmt = ResponseFormat.from_openai(None, [WEATHER])
    assert fmt is not None
    assert allows(fmt, tokenizer, "", "H") and allows(fmt, tokenizer, "", "{")
    assert follow(fmt, tokenizer, "Hello {there}").allowed(len(tokenizer))[EOS]
    assert parse_tool_call("Hello {there}") is None
    assert parse_tool_call('{"name": "x"}') is None
    assert ResponseFormat.from_openai({"type": "json_object"}, [WEATHER], "none") \
        == ResponseFormat.json_object()


def test_auto_tool_choice_with_a_json_answer(tokenizer: Any) -> None:
    answer = {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"],
        "additionalProperties": False}}}
    fmt = ResponseFormat.from_openai(answer, [WEATHER], "auto")
    assert fmt is not None
    assert not allows(fmt, tokenizer, "", "H")
    assert follow(fmt, tokenizer, json.dumps({"reply": "hi"})).complete
    assert follow(fmt, tokenizer, '{"name": "get_weather", "arguments": {"city": "x"}}').complete
    with pytest.raises(InvalidInputError, match="not regex"):
        ResponseFormat.tool_call([WEATHER], "auto", ResponseFormat.regex("a"))


CALLS = ('{"name": "get_weather", "arguments": {"city": "Pa}ri\\"s", "days": [1.50, 2]}}\n'
         '{"name": "get_time", "arguments": {}}')


def test_parallel_calls_are_one_per_line_and_only_when_asked(tokenizer: Any) -> None:
    parallel = ResponseFormat.from_openai(None, [WEATHER, TIME], "required", parallel=True)
    single = ResponseFormat.from_openai(None, [WEATHER, TIME], "required")
    assert parallel is not None and single is not None
    first = '{"name": "get_time", "arguments": {}}'
    assert follow(single, tokenizer, first).complete  # one call, then the end
    after_one = follow(parallel, tokenizer, first)
    assert after_one.allowed(len(tokenizer))[EOS] and allows(parallel, tokenizer, first, "\n")
    assert follow(parallel, tokenizer, first + "\n" + first).allowed(len(tokenizer))[EOS]
    assert not allows(parallel, tokenizer, first + "\n", "H")  # a call follows a newline


def test_calls_are_read_back_with_their_arguments_as_generated() -> None:
    calls = parse_tool_calls(CALLS)
    assert calls == [{"name": "get_weather",
                      "arguments": '{"city": "Pa}ri\\"s", "days": [1.50, 2]}'},
                     {"name": "get_time", "arguments": "{}"}]
    assert parse_tool_call(CALLS) is None  # two calls are not one
    assert parse_tool_calls(CALLS + "\nand some text") is None
    assert parse_tool_calls('{"arguments": {}, "name": "x"}') == [  # another layout: re-written
        {"name": "x", "arguments": "{}"}]


def events_of(text: str, step: int, names: list[str]) -> list[Any]:
    stream = ToolCallStream(names)
    events = [e for i in range(0, len(text), step) for e in stream.push(text[i:i + step])]
    return events + list(stream.finish())


@pytest.mark.parametrize("step", [1, 2, 5, 17, 1000])
def test_a_streamed_call_adds_up_to_the_whole_one(step: int) -> None:
    events = events_of(CALLS, step, ["get_weather", "get_time"])
    calls: list[dict[str, str]] = []
    for event in events:
        assert not isinstance(event, ContentDelta)
        if isinstance(event, CallStarted):
            assert event.index == len(calls)
            calls.append({"name": event.name, "arguments": ""})
        else:
            assert isinstance(event, ArgumentsDelta)
            calls[event.index]["arguments"] += event.text
    assert calls == parse_tool_calls(CALLS)
    if step == 1:  # arguments stream as they come, held back by one character only
        assert sum(isinstance(e, ArgumentsDelta) for e in events) > 10


@pytest.mark.parametrize("text", ["Hello {there}", '{"reply": "a JSON answer"}',
                                  '{"name": "get_weathe"}', '{"name": "other", "arguments": {}}'])
def test_answer_text_streams_as_content(text: str) -> None:
    for step in (1, 4):
        events = events_of(text, step, ["get_weather"])
        assert all(isinstance(e, ContentDelta) for e in events)
        assert "".join(e.text for e in events) == text
    assert events_of("Hi there", 1, ["get_weather"])[0] == ContentDelta("H")  # not held back


def test_a_call_cut_short_streams_what_was_generated() -> None:
    cut = '{"name": "get_weather", "arguments": {"city": "Pa'
    events = events_of(cut, 3, ["get_weather"])
    assert events[0] == CallStarted(0, "get_weather")
    assert "".join(e.text for e in events[1:]) == '{"city": "Pa'
