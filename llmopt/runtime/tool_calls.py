"""Tool (function) calling as structured output: the grammar of a call of OpenAI-shaped tools,
and the call read back from the generated text.

A call is generated as one JSON object, ``{"name": "get_weather", "arguments": {...}}``, whose
``arguments`` match that tool's ``parameters`` schema; with ``tool_choice="auto"`` the model may
write a plain answer instead (text that does not start with ``{``, or the request's JSON answer
format).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmopt.errors import InvalidInputError

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for tool and schema names
TOOL_EXAMPLE = ('{"type": "function", "function": {"name": "get_weather", "parameters": '
                '{"type": "object", "properties": {"city": {"type": "string"}}}}}')


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], tool_choice: Any,
                      answer_schema: Mapping[str, Any] | None = None,
                      layout: Mapping[str, Any] | None = None) -> str:
    """A Lark grammar (llguidance's dialect) of a call of ``tools`` under ``tool_choice``;
    ``layout`` is the JSON compiler's options (``x-guidance``: whitespace, separators)."""
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
    if required:
        return "\n".join(["start: call", *rules])
    if answer_schema is not None:
        rules.append(f"answer: %json {json.dumps({**answer_schema, **options})}")
    else:
        rules.append(r"answer: /[^{\s][\s\S]*/")
    return "\n".join(["start: call | answer", *rules])


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


def parse_tool_call(text: str) -> dict[str, str] | None:
    """The call in generated ``text`` as ``{"name": ..., "arguments": "<JSON text>"}`` (OpenAI's
    ``tool_calls[].function`` shape), or None when the text is a plain answer."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"} \
            or not isinstance(value["name"], str):
        return None
    return {"name": value["name"], "arguments": json.dumps(value["arguments"])}
