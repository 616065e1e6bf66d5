"""OpenAI request bodies -> validated llmopt requests, every field checked with a clear 400.

Fields llmopt does not implement are refused by name (never silently ignored), except the
ones that carry no behaviour (``user``, ``metadata``, ...). Defaults are OpenAI's: temperature
1, top_p 1, n 1; ``max_tokens`` defaults to the rest of the context for chat and to 16 for
completions, as OpenAI documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from llmopt.errors import InvalidInputError, UnsupportedError
from llmopt.runtime.constraints import ResponseFormat
from llmopt.runtime.generator import Prompt
from llmopt.runtime.sampling import MAX_PROMPT_LOOKUP, MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions route's limit
INERT = frozenset({"user", "metadata", "store", "service_tier"})
# not OpenAI's: vLLM's name, for benchmarks; prompt-lookup draft tokens (SamplingParams')
EXTENSIONS = frozenset({"ignore_eos", "prompt_lookup"})
CHAT_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
    "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "prediction"}) | INERT | EXTENSIONS
COMPLETION_FIELDS = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
    "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs", "echo", "best_of",
    "suffix"}) | INERT | EXTENSIONS
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions"}) | INERT
ROLES = ("system", "developer", "user", "assistant", "tool")


class ParamError(InvalidInputError):
    """A request field is missing, of the wrong type or out of range; ``param`` names it."""

    def __init__(self, param: str, message: str, *, fix: str | None = None) -> None:
        super().__init__(message, fix=fix or f"correct {param} as the message says (OpenAI's "
                         "API reference has the field; docs/http.md what llmopt supports)")
        self.param = param


class UnsupportedParamError(ParamError, UnsupportedError):
    """A field OpenAI defines that llmopt does not implement."""


@dataclass(frozen=True)
class GenerateRequest:
    """A chat or completions request: prompts to run ``n`` times each, with one set of params."""

    model: str
    prompts: tuple[Prompt, ...]
    chat: bool
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs asked for
    tools: tuple[dict[str, Any], ...] = ()  # offered (tool_choice not "none"): calls answer
    tool_choice: Any = "auto"

    @property
    def tool_calls(self) -> bool:
        """Tools are offered: a generated call is answered as ``tool_calls``."""
        return bool(self.tools)

    @property
    def tool_names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    def choice_params(self, index: int) -> SamplingParams:
        """Choice ``index`` of a seeded request gets its own seed, so n > 1 choices differ."""
        seed = self.params.seed
        return self.params if seed is None or index == 0 else replace(
            self.params, seed=(seed + index) % 2**63)


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: tuple[str, ...]
    base64: bool
    dimensions: int | None


def chat_request(body: Any, max_n: int, context_length: int) -> GenerateRequest:
    body = _object(body, CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    limit = _opt_int(body, "max_completion_tokens", 1)
    if limit is None:
        limit = _opt_int(body, "max_tokens", 1)
    logprobs = _opt_bool(body, "logprobs") or False
    top = _opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise ParamError("top_logprobs", "top_logprobs needs logprobs: true",
                         fix="set logprobs to true, or leave top_logprobs out")
    return _generate(body, (messages,), chat=True, max_n=max_n,
                     max_tokens=limit if limit is not None else context_length,
                     top_logprobs=(top or 0) if logprobs else None)


def completion_request(body: Any, max_n: int) -> GenerateRequest:
    body = _object(body, COMPLETION_FIELDS)
    if body.get("echo"):
        raise _unsupported("echo", "echo is not supported", "leave echo out or false")
    if body.get("suffix") is not None:
        raise _unsupported("suffix", "suffix (insertion) is not supported", "leave suffix out")
    best_of = _opt_int(body, "best_of", 1)
    if best_of is not None and best_of != (_opt_int(body, "n", 1) or 1):
        raise _unsupported("best_of", "best_of other than n is not supported",
                           "leave best_of out")
    limit = _opt_int(body, "max_tokens", 1)
    return _generate(body, _prompts(body.get("prompt")), chat=False, max_n=max_n,
                     max_tokens=16 if limit is None else limit,
                     top_logprobs=_opt_int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS))


def embedding_request(body: Any, max_batch: int) -> EmbeddingRequest:
    body = _object(body, EMBEDDING_FIELDS)
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(
            isinstance(t, str) and t for t in texts):
        raise ParamError("input", "input must be a non-empty string or a list of them",
                         fix='e.g. "input": ["first text", "second text"] (token arrays are '
                         "not supported)")
    if len(texts) > max_batch:
        raise ParamError("input", f"{len(texts)} inputs in one request; this model takes at "
                         f"most {max_batch}", fix="split the inputs over several requests")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ParamError("encoding_format", f"encoding_format must be float or base64, not "
                         f"{_short(encoding)}", fix='use "float" or "base64"')
    return EmbeddingRequest(_model(body), tuple(texts), encoding == "base64",
                            _opt_int(body, "dimensions", 1))


def constraints(body: dict[str, Any]) -> ResponseFormat | None:
    """The request's output constraint (``response_format``, ``tools``, ``tool_choice``,
    ``parallel_tool_calls``) for SamplingParams, or None: enforced by constrained decoding
    (docs/structured-output.md). A bad one is a 400 naming the field at fault."""
    parallel = _opt_bool(body, "parallel_tool_calls") or False
    try:
        return ResponseFormat.from_openai(body.get("response_format"), tools=body.get("tools"),
                                          tool_choice=body.get("tool_choice"), parallel=parallel)
    except ParamError:
        raise
    except InvalidInputError as exc:
        raise ParamError(_constraint_param(body, exc.message), exc.message, fix=exc.fix) \
            from None


def _constraint_param(body: dict[str, Any], message: str) -> str:
    """Which field a constraint error is about, for the error's ``param`` (on the error path
    only: the answer format alone is compiled again to see whether it is the one at fault)."""
    try:
        ResponseFormat.from_openai(body.get("response_format"))
    except InvalidInputError:
        return "response_format"
    return "tool_choice" if "tool_choice" in message else "tools"


def _generate(body: dict[str, Any], prompts: tuple[Prompt, ...], *, chat: bool, max_n: int,
              max_tokens: int, top_logprobs: int | None) -> GenerateRequest:
    n = _opt_int(body, "n", 1) or 1
    if n > max_n:
        raise ParamError("n", f"n={n}, but this model runs at most {max_n} choices per request",
                         fix=f"ask for n <= {max_n}, or send several requests")
    if len(prompts) * n > max_n:
        raise ParamError("prompt", f"{len(prompts)} prompts x n={n} choices is more than this "
                         f"model's {max_n}", fix="send fewer prompts per request")
    stream = _opt_bool(body, "stream") or False
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise ParamError("stream_options", "stream_options must be an object, and only with "
                         "stream: true", fix='e.g. "stream_options": {"include_usage": true}')
    include_usage = bool(_opt_bool(options or {}, "include_usage", "stream_options."))
    values: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "temperature": _opt_float(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _opt_float(body, "top_p", 0.0, 1.0, 1.0),
        "presence_penalty": _opt_float(body, "presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": _opt_float(body, "frequency_penalty", -2.0, 2.0, 0.0),
        "seed": _opt_seed(body),
        "stop": _stop(body.get("stop")),
        "logprobs": top_logprobs,
        "ignore_eos": _opt_bool(body, "ignore_eos") or False,
        "prompt_lookup": _opt_int(body, "prompt_lookup", 0, MAX_PROMPT_LOOKUP) or 0,
    }
    if values["top_p"] == 0.0:
        raise ParamError("top_p", "top_p must be above 0", fix="use 1 to disable, or e.g. 0.9")
    constraint = constraints(body) if chat else None  # checks tools and tool_choice
    if constraint is not None:
        values["response_format"] = constraint
    if chat and body.get("prediction") is not None:
        values["prediction"] = _prediction(body["prediction"])
    try:
        params = SamplingParams(**values)
    except InvalidInputError as exc:
        raise ParamError("max_tokens", exc.message, fix=exc.fix) from None
    choice = body.get("tool_choice") or "auto"
    offered = tuple(body.get("tools") or ()) if chat and choice != "none" else ()
    return GenerateRequest(_model(body), prompts, chat, params, n, stream, include_usage,
                           top_logprobs, offered, choice)


def _prediction(value: Any) -> str:
    """OpenAI's Predicted Outputs: ``{"type": "content", "content": text or text parts}``."""
    fix = 'e.g. "prediction": {"type": "content", "content": "the text the answer resembles"}'
    if not isinstance(value, dict) or value.get("type") != "content" or set(value) - {
            "type", "content"}:
        raise ParamError("prediction", "prediction must be an object of type \"content\"",
                         fix=fix)
    if value.get("content") is None:
        raise ParamError("prediction", "prediction.content must be a string or text parts",
                         fix=fix)
    return _content(value["content"], "prediction")  # a message's content, read alike


def _object(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidInputError("the request body must be a JSON object",
                                fix="send Content-Type: application/json with an object body")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _unsupported(unknown[0], f"unsupported field(s): {', '.join(map(_short, unknown))}",
                           "leave them out (docs/http.md lists what is supported)")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ParamError("model", "model is missing or not a string",
                         fix="name a served model (GET /v1/models lists them)")
    return model


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ParamError("messages", "messages must be a non-empty list",
                         fix='e.g. "messages": [{"role": "user", "content": "Hello"}]')
    out = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ParamError(where, f"{where} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ParamError(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, "
                             f"not {_short(role)}")
        item: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                "content": _content(message.get("content"), where)}
        if role == "assistant" and message.get("tool_calls") is not None:
            item["tool_calls"] = _history_calls(message["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ParamError(f"{where}.tool_call_id", f"{where} (a tool result) needs the "
                                 "tool_call_id of the call it answers",
                                 fix='e.g. "tool_call_id": "call_abc123", the id from the '
                                     "assistant message's tool_calls")
            item["tool_call_id"] = call_id
        out.append(item)
    return out


def _history_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier ``tool_calls``, arguments parsed into an object (what
    chat templates render)."""
    example = ('e.g. [{"id": "call_1", "type": "function", "function": {"name": "get_weather", '
               '"arguments": "{\\"city\\": \\"Paris\\"}"}}]')
    if not isinstance(raw, list):
        raise ParamError(where, f"{where} must be a list of calls", fix=example)
    calls = []
    for index, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function" \
                or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), str):
            raise ParamError(f"{where}[{index}]", f"{where}[{index}] must be a function call "
                             "with a name and its arguments as JSON text", fix=example)
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            raise ParamError(f"{where}[{index}].function.arguments",
                             f"{where}[{index}].function.arguments is not JSON text",
                             fix="send the arguments exactly as the reply gave them") from None
        calls.append({"id": str(call.get("id") or f"call_{index}"), "type": "function",
                      "function": {"name": function["name"], "arguments": arguments}})
    return calls


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise _unsupported(f"{where}.content", f"{where}.content holds a part that is "
                                   "not text", "send text parts only (no images or audio)")
            texts.append(part["text"])
        return "".join(texts)
    raise ParamError(f"{where}.content", f"{where}.content must be a string or a list of text "
                     "parts")


def _prompts(raw: Any) -> tuple[Prompt, ...]:
    def is_ids(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)

    if isinstance(raw, str) and raw:
        return (raw,)
    if is_ids(raw):
        return (list(raw),)
    if isinstance(raw, list) and raw and all(
            (isinstance(p, str) and p) or is_ids(p) for p in raw):
        return tuple(raw)
    raise ParamError("prompt", "prompt must be a non-empty string, a list of them, or token id "
                     "lists", fix='e.g. "prompt": "Once upon a time"')


def _stop(raw: Any) -> tuple[str, ...]:
    stops = [raw] if isinstance(raw, str) else [] if raw is None else raw
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and s for s in stops):
        raise ParamError("stop", f"stop must be a non-empty string or a list of up to {MAX_STOP}",
                         fix='e.g. "stop": ["\\n\\n"]')
    return tuple(stops)


def _opt_int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
            high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ParamError(name, f"{name} must be an integer {bound}, not {_short(value)}")
    return value


def _opt_float(body: dict[str, Any], name: str, low: float, high: float,
               default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not (
            low <= value <= high):
        raise ParamError(name, f"{name} must be a number from {low:g} to {high:g}, not "
                         f"{_short(value)}")
    return float(value)


def _opt_bool(body: dict[str, Any], name: str, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ParamError(prefix + name, f"{prefix}{name} must be true or false, not "
                         f"{_short(value)}")
    return value


def _opt_seed(body: dict[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**64:
        raise ParamError("seed", f"seed must be a 64-bit integer, not {_short(seed)}")
    return seed % 2**63


def _unsupported(param: str, message: str, fix: str) -> ParamError:
    return UnsupportedParamError(param, message, fix=fix)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
