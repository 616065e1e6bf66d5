"""Chat messages (with tools, tool calls and tool results) rendered by the package's chat template.

A model can only call the tools it is told about. Where the chat template takes ``tools`` (the
Hugging Face convention: ``apply_chat_template(messages, tools=...)``), the tools go to the
template, which writes them the way the model was trained to read them. Where it does not, they
go into a system message (:func:`tools_system_message`) that describes each tool and the call
format the grammar enforces (``{"name": ..., "arguments": {...}}``, see
:mod:`llmopt.runtime.tool_calls`); earlier calls in the history are written in that same format,
so the model sees its own calls as it made them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmopt.errors import InvalidInputError

CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates render
TOOLS_INTRO = "You can call these tools; each is described by a JSON schema:"
CALL_FORMAT = ('To call a tool, answer with only one JSON object: {"name": <tool name>, '
               '"arguments": <arguments object>}.')
CHOICE_LINE = {"auto": "Otherwise, answer in plain text.",
               "required": "You must call one of the tools."}


def template_takes_tools(template: str) -> bool:
    """Whether a Jinja chat template reads a ``tools`` variable (so it renders tool specs)."""
    import jinja2
    import jinja2.meta

    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own ({% generation %}, ...)
        return re.search(r"\btools\b", template) is not None


def tools_system_message(tools: Sequence[Mapping[str, Any]], tool_choice: Any = "auto") -> str:
    """The system text that offers ``tools`` to a model whose template cannot: one JSON line per
    tool (name, description, parameters), the call format, and what ``tool_choice`` asks."""
    lines = [TOOLS_INTRO]
    for tool in tools:
        function = tool.get("function") or {}
        lines.append(json.dumps({key: function[key] for key in ("name", "description",
                                                                "parameters")
                                 if key in function}))
    lines.append(CALL_FORMAT)
    named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, Mapping) \
        else None
    lines.append(f"You must call {named}." if named else CHOICE_LINE.get(tool_choice, ""))
    return "\n".join(line for line in lines if line)


def call_text(call: Mapping[str, Any]) -> str:
    """An earlier call (OpenAI's ``tool_calls[].function``) as the model writes one."""
    arguments = call.get("arguments")
    return json.dumps({"name": call.get("name"), "arguments": arguments},
                      ensure_ascii=False)


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None,
                tool_choice: Any = "auto") -> str:
    """The prompt text of ``messages`` (and the ``tools`` offered, if any), ending with the
    assistant's turn. Messages are ``{"role", "content"}``; an assistant message may carry
    ``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments"}}]``, the
    arguments a dict) and a ``tool`` message ``tool_call_id``."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        raise InvalidInputError("this package's tokenizer has no chat template",
                                fix="pass plain text instead of messages")
    checked = [_checked(message) for message in messages]
    if template_takes_tools(template):
        return _apply(tokenizer, checked, [_with_parameters(t) for t in tools] if tools else None)
    flat = [_folded(message) for message in checked]
    if tools:
        offer = tools_system_message(tools, tool_choice)
        if flat and flat[0]["role"] == "system":
            flat[0] = {**flat[0], "content": f"{flat[0]['content']}\n\n{offer}"}
        else:
            flat.insert(0, {"role": "system", "content": offer})
    return _apply(tokenizer, flat, None)


def _checked(message: Mapping[str, Any]) -> dict[str, Any]:
    role = message.get("role") if isinstance(message, Mapping) else None
    content = message.get("content") if isinstance(message, Mapping) else None
    # content may be left out (or None) only where the message is a call
    if not isinstance(role, str) or not (isinstance(content, str) or (
            content is None and message.get("tool_calls"))):
        raise InvalidInputError("each chat message needs a string 'role' and 'content'",
                                fix='e.g. {"role": "user", "content": "Hello"}')
    if role not in CHAT_ROLES:
        raise InvalidInputError(f"unknown chat role {role[:50]!r}",
                                fix=f"use one of {', '.join(CHAT_ROLES)}")
    checked = dict(message)
    checked["content"] = message.get("content") or ""
    if not checked.get("tool_calls"):
        checked.pop("tool_calls", None)
    return checked


def _with_parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool as templates expect one: ``parameters`` present (an empty object schema where the
    request left it out, the schema its calls are held to)."""
    function = dict(tool.get("function") or {})
    function.setdefault("parameters", {"type": "object", "properties": {}})
    return {**tool, "function": function}


def _folded(message: dict[str, Any]) -> dict[str, Any]:
    """A message for a template that knows no tools: calls become content text."""
    calls = message.get("tool_calls") or []
    texts = [message["content"]] if message["content"] else []
    texts += [call_text(call.get("function") or {}) for call in calls]
    return {"role": message["role"], "content": "\n".join(texts)}


def _apply(tokenizer: Any, messages: list[dict[str, Any]],
           tools: list[Mapping[str, Any]] | None) -> str:
    import jinja2

    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                             tokenize=False)
    except (jinja2.TemplateError, TypeError, ValueError) as exc:  # its checks (role order...)
        raise InvalidInputError(f"the chat template refused the messages: {exc}",
                                fix="order the messages as the model expects (e.g. user and "
                                    "assistant turns alternating)") from None
    return str(text)
