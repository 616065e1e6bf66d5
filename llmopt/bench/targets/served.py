"""A llmopt gRPC server as a bench target: at a given address, or started by the harness.

The target talks to the server through :class:`ServedClient`, a small adapter, so how it calls
the server can change without touching the measurement; :class:`ClientAdapter` uses
``llmopt.Client``, as a user would. The clock starts when the request is handed to the client
(building the request message, a few microseconds, is inside it) and each text delta is
time-stamped the moment the client's stream yields it, before the bench looks at it, so TTFT is
"request sent -> first token received" and comparable with the in-process numbers; the bench
channel is opened and warmed up before measuring, so connection set-up is out.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Protocol

from llmopt.bench.config import ServerOptions
from llmopt.bench.targets.base import StreamFanout, Timing, TokenClock
from llmopt.errors import LlmoptError, UnsupportedError


class ServedClient(Protocol):
    def generate(self, model: str, token_ids: list[int], max_new_tokens: int,
                 clock: TokenClock, timeout: float) -> int:
        """Stream a greedy completion (EOS ignored), ticking ``clock`` at each token message;
        returns the generated token count the server reports."""
        ...

    def embed(self, model: str, texts: list[str], timeout: float) -> None: ...

    def model_info(self, model: str) -> dict[str, Any]: ...

    def wait_ready(self, models: list[str], timeout: float) -> None: ...

    def close(self) -> None: ...


class ClientAdapter:
    """:class:`ServedClient` over ``llmopt.Client``, the client users call."""

    def __init__(self, address: str, token: str | None = None) -> None:
        from llmopt.client import Client

        self.address = address
        self.client = Client(address, token=token)

    def generate(self, model: str, token_ids: list[int], max_new_tokens: int,
                 clock: TokenClock, timeout: float) -> int:
        stream = self.client.stream(model, token_ids, max_new_tokens=max_new_tokens,
                                    ignore_eos=True, timeout=timeout)
        for _ in stream:
            clock.tick()
        generated = int(stream.result.stats.generated_tokens)
        clock.tokens = generated  # a delta may carry more than one token
        return generated

    def embed(self, model: str, texts: list[str], timeout: float) -> None:
        self.client.embed(model, texts, timeout=timeout)

    def model_info(self, model: str) -> dict[str, Any]:
        details = asdict(self.client.get_model(model, timeout=30))
        details.pop("manifest", None)  # the package's own; the record names the package
        details.pop("inputs", None)
        details.pop("outputs", None)
        return details

    def wait_ready(self, models: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(models)
        while pending:
            try:
                states = {m.name: m for m in self.client.list_models(timeout=10)}
            except LlmoptError:
                states = {}  # not listening yet
            for name in list(pending):
                summary = states.get(name)
                if summary is not None and summary.state == "READY":
                    pending.discard(name)
                elif summary is not None and summary.state == "UNAVAILABLE":
                    raise LlmoptError(f"the server at {self.address} cannot serve {name!r}: "
                                      f"{summary.reason}", fix="check the package and the "
                                      "server's log")
            if pending and time.monotonic() > deadline:
                raise LlmoptError(f"models {sorted(pending)} not ready at {self.address} after "
                                  f"{timeout:.0f} s", fix="raise server.startup_timeout_s, or "
                                  "check that the server is running")
            if pending:
                time.sleep(0.25)

    def close(self) -> None:
        self.client.close()


class ServedTarget:
    """One model on a server; requests of several prompts become parallel streams."""

    supports_concurrency = True

    def __init__(self, client: ServedClient, model: str, tokenizer: Any, *,
                 options: ServerOptions, server: Any = None, timeout: float = 600.0) -> None:
        self.name = "server"
        self.client = client
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.server = server  # a ServerProcess the harness started, or None
        self.timeout = timeout
        self._fanout = StreamFanout()
        self._info = client.model_info(model)

    def info(self) -> dict[str, Any]:
        address = self.server.address if self.server else self.options.address
        return {"library": "llmopt server", "address": address,
                "started_by_harness": self.server is not None, "model": self._info}

    def decode(self, prompts: list[list[int]], new_tokens: int, issued: float) -> Timing:
        def open_stream(prompt: list[int], clock: TokenClock) -> None:
            self.client.generate(self.model, prompt, new_tokens, clock, self.timeout)

        return self._fanout.run(open_stream, prompts, issued)

    def encode(self, texts: list[str], issued: float) -> Timing:
        self.client.embed(self.model, texts, self.timeout)
        return Timing(e2e_s=time.perf_counter() - issued, sequences=len(texts))

    def memory(self) -> dict[str, Any]:
        return self.server.memory() if self.server else {}

    def close(self) -> None:
        self._fanout.close()


def connect(address: str, token: str | None) -> ServedClient:
    """The client the served target uses: ``llmopt.Client`` behind the adapter."""
    try:
        return ClientAdapter(address, token)
    except ImportError as exc:
        raise UnsupportedError(f"the served target needs llmopt.Client, which this llmopt "
                               f"cannot import ({exc})", fix="install llmopt with its gRPC "
                               "client, or leave the server target out") from None
