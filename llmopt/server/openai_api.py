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
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmopt.errors import UnsupportedError
from llmopt.runtime.generator import Prompt
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
from llmopt.server.openai_reply import Reply
from llmopt.server.rpc import as_llmopt


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
    reply = Reply(spec, model)
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
            tokens = _rendered(model, spec, prompt)  # once for the n choices
            for index in range(spec.n):
                generations.append(Generation(model, tokens, spec.choice_params(index),
                                              chat=False, metrics=ctx.metrics,
                                              timeout=model.config.request_timeout_s))
    except Exception:
        _cancel(generations)  # one refused (queue full, too long): drop them all
        raise
    return generations


def _rendered(model: Decoder, spec: GenerateRequest, prompt: Prompt) -> Prompt:
    """Chat messages as token ids, the tools offered rendered with them (the chat template's
    way, or a system message where the template has none); other prompts as they are."""
    if not spec.chat:
        return prompt
    return model.generator.render_chat(prompt, spec.tools or None,  # type: ignore[arg-type]
                                       spec.tool_choice)


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
                  reply: Reply) -> AsyncIterator[str]:
    """SSE chunks of each choice in turn (they generate together; later ones are buffered).
    Cancelled (the client left) or failed, every request is cancelled before this returns."""
    results = []
    try:
        yield _sse(reply.first_chunk())
        for index, generation in enumerate(generations):
            choice = reply.choice_stream(index, generation.request.state.logprobs)
            chunks, waiting = generation.request.chunks(), generation.request.events.qsize
            while (piece := await ctx.blocking(_take_text, chunks, waiting)) is not None:
                for chunk in choice.delta(*piece):
                    yield _sse(chunk)
            result = await ctx.blocking(generation.result)
            results.append(result)
            for chunk in choice.final(result):
                yield _sse(chunk)
        if reply.spec.include_usage:
            yield _sse(reply.usage_chunk(results))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 - the status is sent; the error goes in the stream
        error = as_llmopt(exc, "stream")
        yield _sse(openai_body(error, getattr(error, "param", None)))
    finally:
        _release(ctx, generations)


def _take_text(chunks: Iterator[tuple[str, int]], waiting: Callable[[], int]
               ) -> tuple[str, int] | None:
    """The next delta joined with every delta already waiting (with the token count of the
    last), None at the end: when the client falls behind the engine, it gets fewer, longer
    chunks instead of a growing lag."""
    first = next(chunks, None)
    if first is None:
        return None
    parts, tokens = [first[0]], first[1]
    while waiting():  # items are queued, so next() does not block (this is the one reader)
        item = next(chunks, None)
        if item is None:
            break
        parts.append(item[0])
        tokens = item[1]
    return "".join(parts), tokens


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


ROUTES = (
    ("POST", "/v1/chat/completions", "chat.completions", chat_completions),
    ("POST", "/v1/completions", "completions", completions),
    ("POST", "/v1/embeddings", "embeddings", embeddings),
    ("GET", "/v1/models", "models.list", list_models),
    ("GET", "/v1/models/{model:path}", "models.get", get_model),
)
