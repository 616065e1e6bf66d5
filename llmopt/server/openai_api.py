"""OpenAI-compatible routes: chat completions, completions, embeddings and the model list.

Each generation is one engine request (``n`` choices are ``n`` requests, batched together by
the engine). Streams are server-sent events in OpenAI's chunk shapes, ending ``[DONE]``; a
client that disconnects, streaming or not, has its requests cancelled at once, which frees
their batch slots at the next decode step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmopt.errors import UnsupportedError
from llmopt.runtime.sequence import GenerationResult, TokenLogprob
from llmopt.runtime.tool_calls import parse_tool_call
from llmopt.server.http_context import HttpContext, json_body
from llmopt.server.http_errors import openai_body
from llmopt.server.llmopt_api import Generation
from llmopt.server.models import Decoder
from llmopt.server.openai_params import (
    GenerateRequest,
    ParamError,
    chat_request,
    completion_request,
    embedding_request,
)
from llmopt.server.rpc import as_llmopt

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length",
          "cancelled": "stop"}


async def chat_completions(request: Request, ctx: HttpContext) -> Response:
    body = await json_body(request)
    model = ctx.repository.decoder(_model_name(body, request))
    spec = chat_request(body, model.config.max_batch_size, model.context_length)
    return await _generate(request, ctx, model, spec)


async def completions(request: Request, ctx: HttpContext) -> Response:
    body = await json_body(request)
    model = ctx.repository.decoder(_model_name(body, request))
    return await _generate(request, ctx, model,
                           completion_request(body, model.config.max_batch_size))


async def embeddings(request: Request, ctx: HttpContext) -> Response:
    body = await json_body(request)
    model = ctx.repository.encoder(_model_name(body, request))
    spec = embedding_request(body, model.config.max_batch_size)
    vectors, tokens = await ctx.blocking(model.embed, list(spec.texts), None,
                                         model.config.request_timeout_s)
    if spec.dimensions not in (None, vectors.shape[-1]):
        raise UnsupportedError(f"this model's embeddings have {vectors.shape[-1]} dimensions; "
                               "shortening them is not supported",
                               fix="leave dimensions out")

    def encoded(row: np.ndarray) -> Any:
        if spec.base64:
            return base64.b64encode(row.astype("<f4").tobytes()).decode()
        return row.tolist()

    return JSONResponse({
        "object": "list", "model": spec.model,
        "data": [{"object": "embedding", "index": i, "embedding": encoded(row)}
                 for i, row in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def list_models(request: Request, ctx: HttpContext) -> Response:
    return JSONResponse({"object": "list",
                         "data": [_model_card(m.name) for m in ctx.repository.loaded()]})


async def get_model(request: Request, ctx: HttpContext) -> Response:
    name = request.path_params["model"]
    ctx.repository.get(name)  # not found or not ready: 404 / 503
    request.state.model = name
    return JSONResponse(_model_card(name))


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmopt"}


def _model_name(body: Any, request: Request) -> str:
    name = body.get("model") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise ParamError("model", "model is missing or not a string",
                         fix="name a served model (GET /v1/models lists them)")
    request.state.model = name
    return name


# -- generation -------------------------------------------------------------------------------

async def _generate(request: Request, ctx: HttpContext, model: Decoder,
                    spec: GenerateRequest) -> Response:
    generations = await ctx.blocking(_submit, ctx, model, spec)
    reply = _Reply(spec, model)
    if spec.stream:
        return StreamingResponse(_events(request, ctx, generations, reply),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    watcher = asyncio.ensure_future(_on_disconnect(request, generations))
    try:
        results = await ctx.blocking(lambda: [g.result() for g in generations])
    finally:
        watcher.cancel()
        _release(ctx, generations)
    return JSONResponse(reply.whole(results))


def _submit(ctx: HttpContext, model: Decoder, spec: GenerateRequest) -> list[Generation]:
    generations: list[Generation] = []
    try:
        for prompt in spec.prompts:
            for index in range(spec.n):
                generations.append(Generation(model, prompt, spec.choice_params(index),
                                              chat=spec.chat, metrics=ctx.metrics,
                                              timeout=model.config.request_timeout_s))
    except Exception:
        _cancel(generations)  # one refused (queue full, too long): drop them all
        raise
    return generations


def _cancel(generations: list[Generation]) -> None:
    for generation in generations:
        generation.cancel()


def _release(ctx: HttpContext, generations: list[Generation]) -> None:
    """Cancel what still runs (the client left, or the call failed) and record each ending in
    the metrics, off the event loop; a no-op for requests already finished and recorded."""
    _cancel(generations)
    for generation in generations:
        ctx.pool.submit(generation.close)


async def _on_disconnect(request: Request, generations: list[Generation]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            _cancel(generations)
            return


async def _events(request: Request, ctx: HttpContext, generations: list[Generation],
                  reply: _Reply) -> AsyncIterator[str]:
    """SSE chunks of each choice in turn (they generate together; later ones are buffered).
    Cancelled (the client left) or failed, every request is cancelled before this returns."""
    results = []
    try:
        yield _sse(reply.first_chunk())
        for index, generation in enumerate(generations):
            deltas, waiting = iter(generation.request), generation.request.events.qsize
            while (text := await ctx.blocking(_take_text, deltas, waiting)) is not None:
                yield _sse(reply.delta_chunk(index, text))
            result = await ctx.blocking(generation.result)
            results.append(result)
            yield _sse(reply.final_chunk(index, result))
        if reply.spec.include_usage:
            yield _sse(reply.usage_chunk(results))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 - the status is sent; the error goes in the stream
        error = as_llmopt(exc, "stream")
        yield _sse(openai_body(error, getattr(error, "param", None)))
    finally:
        _release(ctx, generations)


def _take_text(deltas: Iterator[str], waiting: Callable[[], int]) -> str | None:
    """The next delta joined with every delta already waiting, None at the end: when the
    client falls behind the engine, it gets fewer, longer chunks instead of a growing lag."""
    first = next(deltas, None)
    if first is None:
        return None
    parts = [first]
    while waiting():  # items are queued, so next() does not block (this is the one reader)
        item = next(deltas, None)
        if item is None:
            break
        parts.append(item)
    return "".join(parts)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class _Reply:
    """Builds one request's response objects, chat or completions shape."""

    def __init__(self, spec: GenerateRequest, model: Decoder) -> None:
        self.spec = spec
        self.chat = spec.chat
        self.model = model
        self.id = ("chatcmpl-" if spec.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if spec.chat else "text_completion"

    def _head(self, chunk: bool) -> dict[str, Any]:
        name = self.object + (".chunk" if chunk and self.chat else "")
        head = {"id": self.id, "object": name, "created": self.created, "model": self.spec.model}
        if chunk and self.spec.include_usage:
            head["usage"] = None
        return head

    def whole(self, results: list[GenerationResult]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {"index": index,
                                      "finish_reason": FINISH[result.finish_reason]}
            call = parse_tool_call(result.text) if self.spec.tool_calls else None
            if call is not None:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                     "function": call}]}
                choice["finish_reason"] = "tool_calls"
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            choice["logprobs"] = self._logprobs(result.logprobs)
            choices.append(choice)
        return {**self._head(False), "choices": choices, "usage": self._usage(results)}

    def first_chunk(self) -> dict[str, Any]:
        if not self.chat:
            return {**self._head(True), "choices": []}
        return {**self._head(True), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(len(self.spec.prompts) * self.spec.n)]}

    def delta_chunk(self, index: int, text: str) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": None}
        choice["delta" if self.chat else "text"] = {"content": text} if self.chat else text
        return {**self._head(True), "choices": [choice]}

    def final_chunk(self, index: int, result: GenerationResult) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": None,
                                  "finish_reason": FINISH[result.finish_reason]}
        choice["delta" if self.chat else "text"] = {} if self.chat else ""
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, results: list[GenerationResult]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": self._usage(results)}

    def _usage(self, results: list[GenerationResult]) -> dict[str, int]:
        # each prompt is counted once however many choices it has, as OpenAI counts it
        prompt = sum(r.stats.prompt_tokens for r in results[::self.spec.n])
        completion = sum(r.stats.generated_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> Any:
        if logprobs is None:
            return None
        text: Callable[[int], str] = self._token_text
        if self.chat:
            def entry(token: int, value: float) -> dict[str, Any]:
                piece = text(token)
                return {"token": piece, "logprob": value, "bytes": list(piece.encode())}

            return {"content": [{**entry(lp.token_id, lp.logprob),
                                 "top_logprobs": [entry(t, v) for t, v in lp.top]}
                                for lp in logprobs]}
        tokens = [text(lp.token_id) for lp in logprobs]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{text(t): v for t, v in lp.top} for lp in logprobs],
                "text_offset": list(_offsets(tokens))}

    def _token_text(self, token: int) -> str:
        tokenizer = self.model.tokenizer
        return str(token) if tokenizer is None else str(tokenizer.decode([token]))


def _offsets(tokens: list[str]) -> Iterator[int]:
    offset = 0
    for token in tokens:
        yield offset
        offset += len(token)


ROUTES = (
    ("POST", "/v1/chat/completions", "chat.completions", chat_completions),
    ("POST", "/v1/completions", "completions", completions),
    ("POST", "/v1/embeddings", "embeddings", embeddings),
    ("GET", "/v1/models", "models.list", list_models),
    ("GET", "/v1/models/{model:path}", "models.get", get_model),
)
