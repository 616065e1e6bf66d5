"""Chat messages, tools and tool calls rendered by a template that takes tools, or offered in a
system message where the template does not."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmopt.errors import InvalidInputError
from llmopt.runtime.chat_template import (
    CALL_FORMAT,
    render_chat,
    template_takes_tools,
    tools_system_message,
)
from tests import tiny_tokenizers

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
HISTORY = [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_tokenizers.byte_level_tokenizer(tmp_path_factory.mktemp("chat-template"))


@pytest.fixture
def with_template(tokenizer: Any) -> Any:
    """The tokenizer with another template for one test."""
    original = tokenizer.chat_template

    def use(template: str) -> Any:
        tokenizer.chat_template = template
        return tokenizer

    yield use
    tokenizer.chat_template = original


def test_a_template_that_reads_tools_is_told_apart() -> None:
    assert template_takes_tools(tiny_tokenizers.TOOLS_CHAT_TEMPLATE)
    assert not template_takes_tools(tiny_tokenizers.DECODER_CHAT_TEMPLATE)
    assert not template_takes_tools("{{ 'tools are fun' }}{% for m in messages %}{% endfor %}")
    # a tag of transformers' own that plain Jinja cannot parse: the name decides
    assert template_takes_tools("{% generation %}{{ tools }}{% endgeneration %}")


def test_a_template_that_takes_tools_renders_them_and_earlier_calls(with_template: Any) -> None:
    text = render_chat(with_template(tiny_tokenizers.TOOLS_CHAT_TEMPLATE), HISTORY,
                       [WEATHER, TIME])
    assert text.startswith('<|system|> tools: get_weather {"type": "object"')
    assert "get_time" in text
    assert '<call> get_weather {"city": "Paris"}' in text  # the call, as the template writes it
    assert "<|tool|> sunny </s>" in text and text.endswith("<|assistant|> ")
    assert CALL_FORMAT not in text  # the template's own way, not the fallback's


def test_without_tool_support_the_tools_go_in_a_system_message(tokenizer: Any) -> None:
    text = render_chat(tokenizer, HISTORY, [WEATHER, TIME])
    offer = tools_system_message([WEATHER, TIME])
    assert text.startswith(f"<|system|> {offer} </s> <|user|> weather in Paris? </s> ")
    lines = offer.splitlines()
    assert json.loads(lines[1]) == WEATHER["function"]  # name, description, parameters
    assert json.loads(lines[2]) == {"name": "get_time"}
    assert CALL_FORMAT in lines and lines[-1] == "Otherwise, answer in plain text."
    # the earlier call, written as the grammar makes the model write one
    assert '<|assistant|> {"name": "get_weather", "arguments": {"city": "Paris"}} </s>' in text
    assert "<|tool|> sunny </s> <|assistant|> " in text


def test_a_call_may_leave_its_content_out(tokenizer: Any) -> None:
    call = {**HISTORY[1], "content": None}
    assert render_chat(tokenizer, [HISTORY[0], call]) == render_chat(tokenizer, HISTORY[:2])


def test_the_offer_joins_an_existing_system_message_and_says_the_choice(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    text = render_chat(tokenizer, messages, [WEATHER, TIME], named)
    assert text.startswith("<|system|> be brief\n\n" + tools_system_message([WEATHER, TIME],
                                                                            named))
    assert text.count("<|system|>") == 1 and "You must call get_time." in text
    assert "You must call one of the tools." in tools_system_message([WEATHER], "required")
    assert render_chat(tokenizer, messages) == (  # no tools: the template alone
        "<|system|> be brief </s> <|user|> hi </s> <|assistant|> ")


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "wizard", "content": "hi"}], "unknown chat role 'wizard'"),
    ([{"role": "user", "content": 5}], "string 'role' and 'content'"),
    ([{"role": "user"}], "string 'role' and 'content'"),  # only a call may leave content out
    (["hello"], "string 'role' and 'content'"),
])
def test_bad_messages_name_the_fix(tokenizer: Any, messages: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        render_chat(tokenizer, messages)


def test_a_template_that_refuses_the_messages_is_a_clear_error(with_template: Any) -> None:
    strict = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('Conversation must start with a user message') }}{% endif %}"
              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(InvalidInputError, match="refused the messages: Conversation must start"):
        render_chat(with_template(strict), [{"role": "assistant", "content": "hi"}])
    with pytest.raises(InvalidInputError, match="no chat template"):
        render_chat(object(), [{"role": "user", "content": "hi"}])
