"""``llmopt.Client``: the blocking client of an llmopt server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from llmopt.client import _common as c
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import GenerationResult
from llmopt.server.status import from_rpc_error


class RemoteStream:
    """Iterator of text deltas; ``result`` is the :class:`GenerationResult` once exhausted
    (the deltas concatenate to ``result.text``). ``cancel()`` stops the generation."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._collector = c.Collector()

    def __iter__(self) -> RemoteStream:
        return self

    def __next__(self) -> str:
        while True:
            try:
                response = next(self._call)
            except StopIteration:
                self._collector.finished()
                raise
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            delta = self._collector.take(response)
            if delta is not None:
                return delta

    def cancel(self) -> None:
        self._call.cancel()

    @property
    def result(self) -> GenerationResult:
        if self._collector.result is None:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._collector.result


class Client:
    """Talks to ``llmopt serve`` (``llmopt.v1.Llmopt``); failures raise llmopt's typed errors.

    ``Client("127.0.0.1:8001", token=..., root_certificates=..., client_cert=..., client_key=...)``
    """

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
            self.channel = grpc.secure_channel(address, conn.credentials(), conn.options())
        else:
            self.channel = grpc.insecure_channel(address, conn.options())
        self._calls: dict[str, Any] = {}

    def _call(self, name: str, streaming: bool = False) -> Any:
        if name not in self._calls:
            path, serialize, parse = c.method(name)
            factory = self.channel.unary_stream if streaming else self.channel.unary_unary
            self._calls[name] = factory(path, request_serializer=serialize,
                                        response_deserializer=parse)
        return self._calls[name]

    def _unary(self, name: str, request: Any, timeout: float | None) -> Any:
        try:
            return self._call(name)(request, timeout=self._timeout(timeout),
                                    metadata=self.connection.metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.connection.timeout if timeout is None else timeout

    # -- generation -----------------------------------------------------------------------------

    def stream(self, model: str, prompt: c.Prompt, params: SamplingParams | None = None, *,
               chat: bool = False, timeout: float | None = None,
               **overrides: Any) -> RemoteStream:
        """Stream a completion: iterate for text deltas, then read ``.result``."""
        request = c.generate_request(model, prompt, params, chat, overrides)
        call = self._call("Generate", streaming=True)(
            request, timeout=self._timeout(timeout), metadata=self.connection.metadata())
        return RemoteStream(call)

    def generate(self, model: str, prompt: c.Prompt, params: SamplingParams | None = None, *,
                 chat: bool = False, timeout: float | None = None,
                 **overrides: Any) -> GenerationResult:
        """The completion of ``prompt`` (text, chat messages or token ids)."""
        stream = self.stream(model, prompt, params, chat=chat, timeout=timeout, **overrides)
        for _ in stream:
            pass
        return stream.result

    def chat(self, model: str, messages: str | Sequence[Mapping[str, str]],
             params: SamplingParams | None = None, *, timeout: float | None = None,
             **overrides: Any) -> GenerationResult:
        """The assistant's reply to chat messages (or one user message)."""
        return self.generate(model, messages, params, chat=True, timeout=timeout, **overrides)

    # -- the rest -------------------------------------------------------------------------------

    def embed(self, model: str, texts: str | Sequence[str], *, normalize: bool | None = None,
              timeout: float | None = None) -> np.ndarray:
        """Embeddings ``[len(texts), dimensions]`` (float32)."""
        response = self._unary("Embed", c.embed_request(model, texts, normalize), timeout)
        return c.embeddings(response)

    def tokenize(self, model: str, prompt: str | Sequence[Mapping[str, str]], *,
                 chat: bool = False, timeout: float | None = None) -> c.Tokenized:
        response = self._unary("Tokenize", c.tokenize_request(model, prompt, chat), timeout)
        return c.Tokenized(list(response.token_ids), list(response.tokens))

    def list_models(self, *, timeout: float | None = None) -> list[c.ModelSummary]:
        response = self._unary("ListModels", c.msg("ListModelsRequest")(), timeout)
        return [c.summary(m) for m in response.models]

    def get_model(self, name: str, *, timeout: float | None = None) -> c.ModelDetails:
        return c.details(self._unary("GetModel", c.msg("GetModelRequest")(name=name), timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
