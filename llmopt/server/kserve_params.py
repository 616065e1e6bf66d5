"""Request parameters of the KServe service: typed, range-checked, unknown names refused.

Decoders take Triton's LLM convention: a BYTES ``text_input`` tensor, generation options as
request parameters (``max_tokens``, ``temperature``, ...), and a BYTES ``text_output`` back.
Parameters that Triton clients set for their own protocol features are accepted and ignored,
except ``timeout`` (microseconds), which bounds the request like a deadline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.runtime.sampling import SamplingParams
from llmopt.server.status import RequestTooLargeError

# parameter -> (type, SamplingParams field or None)
DECODER_PARAMETERS: dict[str, tuple[type, str | None]] = {
    "max_tokens": (int, "max_new_tokens"),
    "temperature": (float, "temperature"),
    "top_k": (int, "top_k"),
    "top_p": (float, "top_p"),
    "repetition_penalty": (float, "repetition_penalty"),
    "seed": (int, "seed"),
    "stop": (str, "stop"),
    "ignore_eos": (bool, "ignore_eos"),
    "prompt_lookup": (int, "prompt_lookup"),
    "prediction": (str, "prediction"),
    "chat": (bool, None),
}
# Triton's own request parameters (sequence batching, priorities, empty final responses)
RESERVED = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
            "triton_enable_empty_final_response", "binary_data_output")
TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"


@dataclass
class DecoderRequest:
    prompts: list[str]
    shape: tuple[int, ...]
    params: SamplingParams
    chat: bool
    timeout: float | None
    empty_final: bool


def value(name: str, parameter: Any, kind: type) -> Any:
    """The parameter's value as ``kind`` (int, float, bool, str), or INVALID_ARGUMENT."""
    which = parameter.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidInputError(f"parameter {name!r} has no value", fix="set one of its fields")
    raw = getattr(parameter, which)
    ok = {int: which in ("int64_param", "uint64_param"),
          float: which in ("double_param", "int64_param", "uint64_param"),
          bool: which == "bool_param", str: which == "string_param"}[kind]
    if not ok:
        raise InvalidInputError(f"parameter {name!r} must be {kind.__name__}, not {which}",
                                fix=f"send {name} as {kind.__name__}")
    return kind(raw)


def check_reserved(parameters: Any, allowed: tuple[str, ...] = ()) -> float | None:
    """Refuse unknown request parameters; returns the ``timeout`` in seconds if one is set."""
    timeout = None
    for name in parameters:
        if name == "timeout":
            micros = value(name, parameters[name], int)
            if micros <= 0:
                raise InvalidInputError("timeout must be positive (microseconds)",
                                        fix="e.g. timeout=5000000 for 5 s")
            timeout = micros / 1e6
        elif name not in RESERVED and name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidInputError(f"unknown request parameter {name[:50]!r}",
                                    fix=f"parameters this model takes: {known}")
    return timeout


def decoder_request(request: Any, tensors: dict[str, np.ndarray],
                    max_batch: int) -> DecoderRequest:
    """Prompts and options of a decoder's ModelInfer request."""
    unknown = set(tensors) - {TEXT_INPUT}
    if unknown:
        raise InvalidInputError(f"unknown input(s) {sorted(unknown)}",
                                fix=f"a text-generation model takes one BYTES {TEXT_INPUT}")
    if TEXT_INPUT not in tensors:
        raise InvalidInputError(f"the {TEXT_INPUT} tensor is missing",
                                fix=f"send the prompt as BYTES {TEXT_INPUT} of shape [1]")
    array = tensors[TEXT_INPUT]
    if array.dtype != np.object_:
        raise InvalidInputError(f"{TEXT_INPUT} must be BYTES, not {array.dtype}",
                                fix="send UTF-8 text as BYTES")
    if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] != 1) or not array.size:
        raise InvalidInputError(f"{TEXT_INPUT} has shape {list(array.shape)}",
                                fix="use [batch] or [batch, 1], batch >= 1")
    if array.size > max_batch:
        raise RequestTooLargeError(f"{array.size} prompts in one request; this model takes at "
                                   f"most {max_batch}", fix="split them over several requests")
    prompts = []
    for item in array.reshape(-1):
        try:
            prompts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInputError(f"{TEXT_INPUT} is not valid UTF-8",
                                    fix="encode the prompt as UTF-8") from None
    timeout = check_reserved(request.parameters, tuple(DECODER_PARAMETERS))
    options: dict[str, Any] = {}
    chat = False
    for name in request.parameters:
        if name not in DECODER_PARAMETERS:
            continue
        kind, field = DECODER_PARAMETERS[name]
        got = value(name, request.parameters[name], kind)
        if name == "chat":
            chat = got
        elif name == "stop":
            options["stop"] = _stops(got)
        else:
            options[str(field)] = got
    empty_final = "triton_enable_empty_final_response" in request.parameters and value(
        "triton_enable_empty_final_response",
        request.parameters["triton_enable_empty_final_response"], bool)
    return DecoderRequest(prompts, tuple(array.shape), SamplingParams(**options), chat, timeout,
                          bool(empty_final))


def _stops(text: str) -> tuple[str, ...]:
    """``stop`` is one string, or a JSON list of strings."""
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise InvalidInputError("stop looks like a JSON list but is not one of strings",
                                    fix='e.g. stop="\\n" or stop=["\\n", "User:"]')
        return tuple(items)
    return (text,)
