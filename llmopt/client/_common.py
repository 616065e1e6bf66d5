"""What the sync and asyncio clients share: connection options, requests, results."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from llmopt import _proto
from llmopt.errors import InvalidInputError
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import GenerationResult, GenerationStats
from llmopt.server.status import ServerError

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "/" + _proto.LLMOPT_SERVICE + "/"
Prompt = str | Sequence[Mapping[str, str]] | Sequence[int]


@dataclass(frozen=True)
class ModelSummary:
    name: str
    task: str
    architecture: str
    state: str  # READY, LOADING, UNAVAILABLE
    reason: str = ""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # a name for a dynamic axis


@dataclass(frozen=True)
class ModelDetails:
    summary: ModelSummary
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    manifest: dict[str, Any]
    providers: tuple[str, ...]            # what onnxruntime runs the session on
    requested_providers: tuple[str, ...]
    provider_fallback: bool
    fallback_reason: str
    limits: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class Connection:
    """How to reach the server: address, bearer token, TLS material (PEM bytes or paths)."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | str | Path | None = None
    client_cert: bytes | str | Path | None = None
    client_key: bytes | str | Path | None = None
    server_name: str | None = None  # the name the certificate is for, if not the address'
    timeout: float | None = None    # default per-call deadline, seconds
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidInputError("client_cert and client_key go together",
                                    fix="pass both for mutual TLS, or neither")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise InvalidInputError("the token is empty or holds whitespace",
                                    fix="pass the bearer token exactly as the server has it")

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None or self.client_cert is not None

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes)]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def credentials(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.client_key), certificate_chain=_pem(self.client_cert))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {value}: {exc.strerror}",
                                fix="pass PEM bytes or a readable file") from None


def sampling(params: SamplingParams | None, overrides: Mapping[str, Any]) -> Any:
    """SamplingOptions of ``params`` with ``overrides`` (validated here, before any call)."""
    params = params or SamplingParams()
    if overrides:
        names = {f.name for f in fields(SamplingParams)}
        unknown = set(overrides) - names
        if unknown:
            raise InvalidInputError(f"unknown generation option(s): {', '.join(sorted(unknown))}",
                                    fix="valid: " + ", ".join(sorted(names)))
        values = dict(overrides)
        if isinstance(values.get("stop"), str):
            values["stop"] = (values["stop"],)
        for key in ("stop", "eos_token_ids"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        params = replace(params, **values)
    options = msg("SamplingOptions")(
        max_new_tokens=params.max_new_tokens, temperature=params.temperature,
        top_k=params.top_k, top_p=params.top_p, repetition_penalty=params.repetition_penalty,
        stop=list(params.stop), ignore_eos=params.ignore_eos,
        eos_token_ids=list(params.eos_token_ids or ()))
    if params.seed is not None:
        options.seed = params.seed
    if params.prompt_lookup:
        options.prompt_lookup = params.prompt_lookup
    if params.prediction is not None:
        options.prediction = params.prediction
    if params.response_format is not None:
        fmt = params.response_format
        wire = options.response_format
        if fmt.kind == "json_object":
            wire.json_object = True
        else:
            setattr(wire, fmt.kind, fmt.text)
        wire.lenient = not fmt.strict
    return options


def generate_request(model: str, prompt: Prompt, params: SamplingParams | None, chat: bool,
                     overrides: Mapping[str, Any]) -> Any:
    request = msg("GenerateRequest")(model=model, chat=chat,
                                      sampling=sampling(params, overrides))
    _set_prompt(request, prompt)
    return request


def tokenize_request(model: str, prompt: str | Sequence[Mapping[str, str]], chat: bool) -> Any:
    request = msg("TokenizeRequest")(model=model, chat=chat)
    _set_prompt(request, prompt, allow_ids=False)
    return request


def _set_prompt(request: Any, prompt: Any, allow_ids: bool = True) -> None:
    if isinstance(prompt, str):
        request.text = prompt
        return
    items = list(prompt)
    if items and all(isinstance(m, Mapping) for m in items):
        for m in items:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidInputError("each chat message needs string 'role' and 'content'",
                                        fix='e.g. {"role": "user", "content": "Hello"}')
            request.messages.messages.add(role=m["role"], content=m["content"])
        return
    if allow_ids and items and all(isinstance(t, int) and not isinstance(t, bool)
                                   for t in items):
        request.token_ids.ids.extend(items)
        return
    raise InvalidInputError("a prompt is a string, a non-empty list of chat messages, or a "
                            "non-empty list of token ids", fix="pass one of those")


class Collector:
    """Turns a stream of GenerateResponse messages into deltas and one GenerationResult."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.result: GenerationResult | None = None

    def take(self, response: Any) -> str | None:
        """The delta in ``response``, or None when it was the completion."""
        if response.WhichOneof("event") == "delta":
            self.parts.append(response.delta)
            return response.delta
        c = response.completion
        s = c.stats
        self.result = GenerationResult(
            text="".join(self.parts), token_ids=list(c.token_ids),
            finish_reason=_finish_reason(c.finish_reason),
            stats=GenerationStats(
                prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
                ttft_s=s.ttft_s, total_s=s.total_s,
                prefill_tokens_per_s=s.prefill_tokens_per_s,
                decode_tokens_per_s=s.decode_tokens_per_s,
                cached_prompt_tokens=s.cached_prompt_tokens,
                accepted_draft_tokens=s.accepted_draft_tokens,
                rejected_draft_tokens=s.rejected_draft_tokens))
        return None

    def finished(self) -> GenerationResult:
        if self.result is None:
            raise ServerError("the stream ended without a completion",
                              fix="the server may have shut down; retry")
        return self.result


def _finish_reason(number: int) -> str:
    enum = _proto.pool().FindEnumTypeByName("llmopt.v1.FinishReason")
    value = enum.values_by_number.get(number)
    return value.name.removeprefix("FINISH_REASON_").lower() if value else "unspecified"


def _state(number: int) -> str:
    enum = _proto.pool().FindEnumTypeByName("llmopt.v1.ModelState")
    value = enum.values_by_number.get(number)
    return value.name.removeprefix("MODEL_STATE_") if value else "UNSPECIFIED"


def summary(message: Any) -> ModelSummary:
    return ModelSummary(message.name, message.task, message.architecture,
                        _state(message.state), message.reason)


def details(response: Any) -> ModelDetails:
    def tensors(items: Any) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(t.name, t.dtype, tuple(d.name if d.name else d.size
                                                       for d in t.shape)) for t in items)

    p, lim = response.providers, response.limits
    return ModelDetails(
        summary=summary(response.summary), inputs=tensors(response.inputs),
        outputs=tensors(response.outputs), manifest=json.loads(response.manifest_json or "{}"),
        providers=tuple(p.active), requested_providers=tuple(p.requested),
        provider_fallback=p.fallback, fallback_reason=p.reason,
        limits={f.name: getattr(lim, f.name) for f in lim.DESCRIPTOR.fields})


def embed_request(model: str, texts: str | Sequence[str], normalize: bool | None) -> Any:
    if isinstance(texts, str):
        texts = [texts]
    request = msg("EmbedRequest")(model=model, texts=list(texts))
    if normalize is not None:
        request.normalize = normalize
    return request


def embeddings(response: Any) -> Any:
    import numpy as np

    if not response.embeddings:
        return np.zeros((0, response.dimensions), np.float32)
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def method(name: str) -> tuple[str, Any, Any]:
    """Path, request serializer and response parser of an ``llmopt.v1.Llmopt`` method."""
    descriptor = _proto.service(_proto.LLMOPT_SERVICE).methods_by_name[name]
    request_type = _proto.message(descriptor.input_type.full_name)
    response_type = _proto.message(descriptor.output_type.full_name)
    return SERVICE + name, request_type.SerializeToString, response_type.FromString


def msg(name: str) -> Any:
    return _proto.message("llmopt.v1." + name)
