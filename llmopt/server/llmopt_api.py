"""The ``llmopt.v1.Llmopt`` service: streaming generation, embeddings, tokenize, model listing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc

from llmopt import _proto
from llmopt.errors import InvalidInputError, LlmoptError
from llmopt.runtime.constraints import ResponseFormat
from llmopt.runtime.generator import Prompt
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import GenerationResult
from llmopt.server.deadline import request_timeout
from llmopt.server.metrics import Metrics
from llmopt.server.models import Decoder
from llmopt.server.repository import ModelRepository
from llmopt.server.status import DeadlineExceededError, ServerError

V1 = "llmopt.v1."
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                   "seed", "prompt_lookup", "prediction")


class Generation:
    """One engine request tied to a call: deltas, then ``result``. ``timeout`` (from
    :func:`~llmopt.server.deadline.request_timeout`) bounds it; with ``context`` given, the call
    ending (cancel, disconnect) cancels it."""

    def __init__(self, model: Decoder, prompt: Prompt, params: SamplingParams, *, chat: bool,
                 metrics: Metrics, context: grpc.ServicerContext | None = None,
                 timeout: float | None = None) -> None:
        self.model = model
        self.metrics = metrics
        self._recorded = False
        self.request = model.submit(prompt, params, chat=chat, timeout=timeout)
        if context is not None and not context.add_callback(self.request.cancel):
            self.request.cancel()  # the call already ended

    def __iter__(self) -> Iterator[str]:
        complete = False
        try:
            yield from self.request
            complete = True
        finally:
            if not complete:  # the consumer stopped early: the call ended
                self.close()

    def cancel(self) -> None:
        self.request.cancel()

    def close(self) -> None:
        """Cancel the request if it still runs (its slot frees at the next step) and record
        how it ended; blocks until it has."""
        self.request.cancel()
        self._record(self.request.result(timeout=60))

    def _record(self, result: GenerationResult) -> None:
        if not self._recorded:
            self._recorded = True
            self.metrics.generation(self.model.name, result)

    def result(self) -> GenerationResult:
        result = self.request.result()
        self._record(result)
        if result.finish_reason == "error":
            raise ServerError("the engine failed while generating this request",
                              fix="this is a bug in llmopt; the server log has the traceback")
        if result.finish_reason == "deadline":
            raise DeadlineExceededError(
                f"the deadline passed after {result.stats.generated_tokens} generated tokens",
                fix="raise the deadline, or ask for fewer tokens")
        return result


def sampling_params(options: Any) -> SamplingParams:
    values: dict[str, Any] = {f: getattr(options, f) for f in SAMPLING_FIELDS
                              if options.HasField(f)}
    if options.stop:
        values["stop"] = tuple(options.stop)
    if options.eos_token_ids:
        values["eos_token_ids"] = tuple(int(t) for t in options.eos_token_ids)
    values["ignore_eos"] = bool(options.ignore_eos)
    if options.HasField("response_format"):
        values["response_format"] = response_format(options.response_format)
    return SamplingParams(**values)


def response_format(message: Any) -> ResponseFormat:
    """The ResponseFormat of a request (compiled here: a bad one is INVALID_ARGUMENT)."""
    which = message.WhichOneof("format")
    if which is None:
        raise InvalidInputError("response_format is set but names no format",
                                fix="set json_object, json_schema, regex or lark")
    if which == "json_object":
        return ResponseFormat.json_object()
    return ResponseFormat(which, getattr(message, which), strict=not message.lenient)


def prompt_of(request: Any, field: str) -> tuple[Prompt, bool]:
    """The request's prompt and whether the chat template applies."""
    which = request.WhichOneof(field)
    if which == "text":
        return request.text, bool(request.chat)
    if which == "messages":
        messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        if not messages:
            raise InvalidInputError("messages is empty", fix="send at least one chat message")
        return messages, True
    if which == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidInputError("token_ids is empty", fix="send at least one token id")
        return ids, False
    raise InvalidInputError("the request has no prompt",
                            fix="set text, messages or token_ids")


def completion(result: GenerationResult) -> Any:
    s = result.stats
    return _msg("Completion")(
        finish_reason=f"FINISH_REASON_{result.finish_reason.upper()}",
        token_ids=result.token_ids,
        stats=_msg("GenerationStats")(
            prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens, ttft_s=s.ttft_s,
            total_s=s.total_s, prefill_tokens_per_s=s.prefill_tokens_per_s,
            decode_tokens_per_s=s.decode_tokens_per_s,
            cached_prompt_tokens=s.cached_prompt_tokens,
            accepted_draft_tokens=s.accepted_draft_tokens,
            rejected_draft_tokens=s.rejected_draft_tokens),
    )


class LlmoptService:
    def __init__(self, repository: ModelRepository, metrics: Metrics) -> None:
        self.repository = repository
        self.metrics = metrics

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        model = self.repository.decoder(request.model)
        prompt, chat = prompt_of(request, "prompt")
        params = sampling_params(request.sampling)
        generation = Generation(model, prompt, params, chat=chat, metrics=self.metrics,
                                context=context, timeout=request_timeout(
                                    context, default=model.config.request_timeout_s))
        response = _msg("GenerateResponse")
        for delta in generation:
            yield response(delta=delta)
        result = generation.result()
        if result.finish_reason != "cancelled":
            yield response(completion=completion(result))

    def Embed(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self.repository.encoder(request.model)
        normalize = request.normalize if request.HasField("normalize") else None
        timeout = request_timeout(context, default=model.config.request_timeout_s)
        vectors, tokens = model.embed(list(request.texts), normalize, timeout)
        embedding = _msg("Embedding")
        return _msg("EmbedResponse")(
            embeddings=[embedding(values=row.tolist()) for row in vectors],
            dimensions=int(vectors.shape[-1]), prompt_tokens=tokens)

    def Tokenize(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self.repository.get(request.model)
        if isinstance(model, Decoder):
            prompt, chat = prompt_of(request, "input")
            ids, tokens = model.tokenize(prompt, chat)
        else:
            if request.WhichOneof("input") != "text":
                raise InvalidInputError(f"model {request.model!r} is an encoder: it tokenizes "
                                        "text, not chat messages", fix="send text")
            ids, tokens = model.tokenize(request.text)  # type: ignore[attr-defined]
        return _msg("TokenizeResponse")(token_ids=ids, tokens=tokens)

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _msg("ListModelsResponse")(
            models=[self._summary(e.name, e.state, e.detail) for e in self.repository.index()])

    def GetModel(self, request: Any, context: grpc.ServicerContext) -> Any:
        package = self.repository.package(request.name)
        entry = next((e for e in self.repository.index() if e.name == request.name), None)
        response = _msg("GetModelResponse")(
            summary=self._summary(request.name, entry.state if entry else "UNAVAILABLE",
                                  entry.detail if entry else ""),
            manifest_json=json.dumps(package.manifest.to_dict(), sort_keys=True))
        signature = package.manifest.signature
        for side, specs in (("inputs", signature["inputs"]), ("outputs", signature["outputs"])):
            for spec in specs:
                tensor = getattr(response, side).add(name=spec["name"], dtype=spec["dtype"])
                for dim in spec["shape"]:
                    if isinstance(dim, int):
                        tensor.shape.add(size=dim)
                    else:
                        tensor.shape.add(size=-1, name=str(dim))
        try:
            model = self.repository.get(request.name)
        except LlmoptError:
            return response
        info = model.session_info
        response.providers.requested.extend(info.requested)
        response.providers.active.extend(info.active)
        response.providers.fallback = info.fallback
        response.providers.reason = info.reason or ""
        c = model.config
        response.limits.max_batch_size = c.max_batch_size
        response.limits.max_queue = c.max_queue
        response.limits.kv_budget_bytes = c.kv_budget_bytes or 0
        response.limits.max_concurrency = c.max_concurrency
        if isinstance(model, Decoder):
            response.limits.context_length = model.context_length
        return response

    def _summary(self, name: str, state: str, reason: str) -> Any:
        try:
            manifest = self.repository.package(name).manifest
            task, architecture = manifest.task, manifest.architecture
        except LlmoptError as exc:
            task, architecture, reason = "", "", reason or str(exc)
        return _msg("ModelSummary")(name=name, task=task, architecture=architecture,
                                    state=f"MODEL_STATE_{state}", reason=reason)


def _msg(name: str) -> Any:
    return _proto.message(V1 + name)
