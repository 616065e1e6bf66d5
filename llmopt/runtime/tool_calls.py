"""Tool (function) calling as structured output: the grammar of a call of OpenAI-shaped tools,
and the calls read back from the generated text, whole or as it streams.

A call is generated as one compact JSON object, ``{"name": "get_weather", "arguments": {...}}``,
whose ``arguments`` match that tool's ``parameters`` schema; with ``parallel`` several calls
follow each other, one per line (compact JSON holds no raw newline, so a newline always ends a
call). With ``tool_choice="auto"`` the model may write a plain answer instead (text that does
not start with ``{``, or the request's JSON answer format).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmopt.errors import InvalidInputError

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for tool and schema names
TOOL_EXAMPLE = ('{"type": "function", "function": {"name": "get_weather", "parameters": '
                '{"type": "object", "properties": {"city": {"type": "string"}}}}}')


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], tool_choice: Any,
                      answer_schema: Mapping[str, Any] | None = None,
                      layout: Mapping[str, Any] | None = None, parallel: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) of a call of ``tools`` under ``tool_choice`` (one
    call or, with ``parallel``, one or more, a line each); ``layout`` is the JSON compiler's
    options (``x-guidance``: whitespace, separators)."""
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes) or not tools:
        raise InvalidInputError("tools must be a non-empty list of tools",
                                fix=f"e.g. [{TOOL_EXAMPLE}]")
    calls: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" \
                or not isinstance(function, Mapping):
            raise InvalidInputError("each tool is {\"type\": \"function\", \"function\": {...}}",
                                    fix=f"e.g. {TOOL_EXAMPLE}")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidInputError(f"tool name {name!r} is not 1-64 letters, digits, _ or -",
                                    fix='e.g. "name": "get_weather"')
        if name in calls:
            raise InvalidInputError(f"two tools are named {name!r}", fix="name each tool once")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, Mapping):
            raise InvalidInputError(f"tool {name!r}: parameters must be a JSON schema object",
                                    fix='e.g. "parameters": {"type": "object"}')
        calls[name] = {"type": "object", "properties": {"name": {"const": name},
                                                        "arguments": dict(parameters)},
                       "required": ["name", "arguments"], "additionalProperties": False}
    chosen, required = _choose(calls, tool_choice)
    call = {"anyOf": [calls[n] for n in chosen]} if len(chosen) > 1 else dict(calls[chosen[0]])
    options = {"x-guidance": dict(layout)} if layout else {}
    rules = [f"call: %json {json.dumps({**call, **options})}"]
    calls_rule = r'call ("\n" call)*' if parallel else "call"
    if required:
        return "\n".join([f"start: {calls_rule}", *rules])
    if answer_schema is not None:
        rules.append(f"answer: %json {json.dumps({**answer_schema, **options})}")
    else:
        rules.append(r"answer: /[^{\s][\s\S]*/")
    return "\n".join([f"start: {calls_rule} | answer", *rules])


def _choose(calls: dict[str, dict[str, Any]], tool_choice: Any) -> tuple[list[str], bool]:
    """The tools a call may name, and whether a call is required."""
    if tool_choice in ("auto", "required"):
        return list(calls), tool_choice == "required"
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if isinstance(function, Mapping) and tool_choice.get("type") == "function":
        name = function.get("name")
        if name not in calls:
            raise InvalidInputError(f"tool_choice names {name!r}, which is not among the tools",
                                    fix="name one of: " + ", ".join(calls))
        return [name], True
    raise InvalidInputError(f"tool_choice {tool_choice!r} is not understood",
                            fix='use "auto", "required", "none" or {"type": "function", '
                                '"function": {"name": ...}}')


def call_head(name: str) -> str:
    """What a call of tool ``name`` starts with, up to its arguments (the grammar's layout)."""
    return '{"name": ' + json.dumps(name) + ', "arguments": '


def parse_tool_calls(text: str) -> list[dict[str, str]] | None:
    """The calls in generated ``text``, each as ``{"name": ..., "arguments": "<JSON text>"}``
    (OpenAI's ``tool_calls[].function`` shape; the arguments as generated), or None when the
    text is a plain answer."""
    calls = []
    for line in text.split("\n"):
        try:
            value = json.loads(line)
        except ValueError:
            return None
        if not isinstance(value, dict) or set(value) != {"name", "arguments"} \
                or not isinstance(value["name"], str):
            return None
        head = call_head(value["name"])
        arguments = line[len(head):-1] if line.startswith(head) and line.endswith("}") \
            else json.dumps(value["arguments"])
        calls.append({"name": value["name"], "arguments": arguments})
    return calls


def parse_tool_call(text: str) -> dict[str, str] | None:
    """The one call in ``text`` (see :func:`parse_tool_calls`), or None if it holds no call."""
    calls = parse_tool_calls(text)
    return calls[0] if calls and len(calls) == 1 else None


@dataclass(frozen=True)
class ContentDelta:
    """Answer text (the model did not call a tool)."""

    text: str


@dataclass(frozen=True)
class CallStarted:
    """Call number ``index`` of the answer names tool ``name``; its arguments follow."""

    index: int
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    """More of the JSON text of call ``index``'s arguments."""

    index: int
    text: str


StreamEvent = ContentDelta | CallStarted | ArgumentsDelta


class ToolCallStream:
    """Reads generated text as it streams and tells answer text from calls, so a call can be
    streamed as OpenAI streams one: its name first, then its arguments piece by piece.

    Text is held back only while it may still be the start of a call (``{"name": "get_w``) and,
    inside a call, by one character (the closing brace that is not the arguments'). The events'
    concatenated arguments equal :func:`parse_tool_calls`' for the whole text.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.heads = {call_head(name): name for name in names}
        self.pending = ""
        self.calls = 0  # calls started
        self.in_call = False
        self.answer = False  # the text is an answer, not calls

    def push(self, text: str) -> Iterator[StreamEvent]:
        self.pending += text
        if self.answer:
            yield from self._content()
            return
        while True:
            if not self.in_call:
                head = next((h for h in self.heads if self.pending.startswith(h)), None)
                if head is None:
                    if not any(h.startswith(self.pending) for h in self.heads):
                        self.answer = True
                        yield from self._content()
                    return
                self.pending = self.pending[len(head):]
                self.in_call = True
                self.calls += 1
                yield CallStarted(self.calls - 1, self.heads[head])
            end = self.pending.find("\n")
            if end < 0:
                yield from self._arguments(self.pending[:-1])
                self.pending = self.pending[-1:]
                return
            yield from self._arguments(self.pending[:end - 1])  # less the call's own "}"
            self.pending = self.pending[end + 1:]
            self.in_call = False

    def finish(self) -> Iterator[StreamEvent]:
        """What is still held back, once the text is complete (or cut by max_tokens)."""
        if self.in_call:
            yield from self._arguments(self.pending[:-1] if self.pending.endswith("}")
                                       else self.pending)
        elif self.pending:
            yield from self._content()
        self.pending = ""

    def _content(self) -> Iterator[StreamEvent]:
        if self.pending:
            yield ContentDelta(self.pending)
        self.pending = ""

    def _arguments(self, text: str) -> Iterator[StreamEvent]:
        if text:
            yield ArgumentsDelta(self.calls - 1, text)
