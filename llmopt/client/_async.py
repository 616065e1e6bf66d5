"""``llmopt.AsyncClient``: the asyncio client (grpc.aio), with the same calls as ``Client``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from llmopt.client import _common as c
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import GenerationResult
from llmopt.server.status import from_rpc_error


class AsyncRemoteStream:
    """Async iterator of text deltas; ``result`` once exhausted; ``cancel()`` stops it."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._collector = c.Collector()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        try:
            async for response in self._call:
                delta = self._collector.take(response)
                if delta is not None:
                    yield delta
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._collector.finished()

    def cancel(self) -> None:
        self._call.cancel()

    @property
    def result(self) -> GenerationResult:
        if self._collector.result is None:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._collector.result


class AsyncClient:
    """``async with AsyncClient(address) as client: await client.generate(...)``."""

    def __init__(self, address: str = c.DEFAULT_ADDRESS, *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | Path | None = None,
                 client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None, server_name: str | None = None,
                 timeout: float | None = None,
                 max_message_bytes: int = c.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.connection = c.Connection(address, token, tls, root_certificates, client_cert,
                                       client_key, server_name, timeout, max_message_bytes)
        conn = self.connection
        if conn.secure:
            self.channel = grpc.aio.secure_channel(address, conn.credentials(), conn.options())
        else:
            self.channel = grpc.aio.insecure_channel(address, conn.options())

    def _callable(self, name: str, streaming: bool = False) -> Any:
        path, serialize, parse = c.method(name)
        factory = self.channel.unary_stream if streaming else self.channel.unary_unary
        return factory(path, request_serializer=serialize, response_deserializer=parse)

    async def _unary(self, name: str, request: Any, timeout: float | None) -> Any:
        try:
            return await self._callable(name)(request, timeout=self._timeout(timeout),
                                              metadata=self.connection.metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.connection.timeout if timeout is None else timeout

    def stream(self, model: str, prompt: c.Prompt, params: SamplingParams | None = None, *,
               chat: bool = False, timeout: float | None = None,
               **overrides: Any) -> AsyncRemoteStream:
        """``async for delta in client.stream(...)``, then ``.result``."""
        request = c.generate_request(model, prompt, params, chat, overrides)
        call = self._callable("Generate", streaming=True)(
            request, timeout=self._timeout(timeout), metadata=self.connection.metadata())
        return AsyncRemoteStream(call)

    async def generate(self, model: str, prompt: c.Prompt, params: SamplingParams | None = None,
                       *, chat: bool = False, timeout: float | None = None,
                       **overrides: Any) -> GenerationResult:
        stream = self.stream(model, prompt, params, chat=chat, timeout=timeout, **overrides)
        async for _ in stream:
            pass
        return stream.result

    async def chat(self, model: str, messages: str | Sequence[Mapping[str, str]],
                   params: SamplingParams | None = None, *, timeout: float | None = None,
                   **overrides: Any) -> GenerationResult:
        return await self.generate(model, messages, params, chat=True, timeout=timeout,
                                   **overrides)

    async def embed(self, model: str, texts: str | Sequence[str], *,
                    normalize: bool | None = None, timeout: float | None = None) -> np.ndarray:
        response = await self._unary("Embed", c.embed_request(model, texts, normalize), timeout)
        return c.embeddings(response)

    async def tokenize(self, model: str, prompt: str | Sequence[Mapping[str, str]], *,
                       chat: bool = False, timeout: float | None = None) -> c.Tokenized:
        response = await self._unary("Tokenize", c.tokenize_request(model, prompt, chat),
                                     timeout)
        return c.Tokenized(list(response.token_ids), list(response.tokens))

    async def list_models(self, *, timeout: float | None = None) -> list[c.ModelSummary]:
        response = await self._unary("ListModels", c.msg("ListModelsRequest")(), timeout)
        return [c.summary(m) for m in response.models]

    async def get_model(self, name: str, *, timeout: float | None = None) -> c.ModelDetails:
        return c.details(await self._unary("GetModel", c.msg("GetModelRequest")(name=name),
                                           timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
