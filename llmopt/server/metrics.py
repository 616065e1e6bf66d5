"""Prometheus metrics of one server, in a registry of its own, served over HTTP on request.

Request counts by method, model and status code; request latency; RPCs in flight; time to
first token, decode tokens/s, token counts and finish reasons per model; and, read at scrape
time, each model's queue depth, running batch size and readiness. Model labels are only ever
names the repository holds, so a client cannot grow the label set by sending made-up names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from llmopt.errors import InvalidInputError
from llmopt.runtime.sequence import GenerationResult

if TYPE_CHECKING:
    from llmopt.server.repository import ModelRepository

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
UNKNOWN = "_unknown"


class Metrics:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llmopt_requests", "RPCs finished, by method, model and status",
                                ["method", "model", "code"], registry=r)
        self.latency = Histogram("llmopt_request_duration_seconds", "RPC wall time",
                                 ["method", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmopt_time_to_first_token_seconds",
                              "Request arrival to first generated token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.decode_rate = Histogram("llmopt_decode_tokens_per_second",
                                     "Decode speed of each generation", ["model"],
                                     buckets=RATE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmopt_prompt_tokens", "Prompt tokens processed",
                                     ["model"], registry=r)
        self.cached_prompt_tokens = Counter(
            "llmopt_prompt_cached_tokens",
            "Prompt tokens whose KV cache came from the prefix cache, not a prefill",
            ["model"], registry=r)
        self.generated_tokens = Counter("llmopt_generated_tokens", "Tokens generated",
                                        ["model"], registry=r)
        self.accepted_draft_tokens = Counter(
            "llmopt_draft_accepted_tokens",
            "Generated tokens that prompt lookup drafted and the model confirmed (no own step)",
            ["model"], registry=r)
        self.generations = Counter("llmopt_generations", "Generations ended, by finish reason",
                                   ["model", "finish_reason"], registry=r)
        self.inflight = Gauge("llmopt_inflight_requests",
                              "RPCs running now (health checks not counted)", registry=r)
        r.register(_LiveCollector(repository))
        self._http: Any = None
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running(self) -> int:
        """RPCs in flight, health checks aside."""
        return self._running

    def started(self) -> None:
        with self._lock:
            self._running += 1
        self.inflight.inc()

    def label(self, model: str) -> str:
        return model if model and self.repository.knows(model) else (UNKNOWN if model else "")

    def ended(self) -> None:
        with self._lock:
            self._running -= 1
        self.inflight.dec()

    def rpc(self, method: str, model: str, code: grpc.StatusCode | str, seconds: float) -> None:
        """Count and time one finished call; ``code`` is a gRPC status or an HTTP status
        (HTTP routes are named like ``chat.completions``, ``v2.infer``)."""
        label = self.label(model)
        self.requests.labels(method, label, code if isinstance(code, str) else code.name).inc()
        self.latency.labels(method, label).observe(seconds)

    def generation(self, model: str, result: GenerationResult) -> None:
        label = self.label(model)
        stats = result.stats
        self.prompt_tokens.labels(label).inc(stats.prompt_tokens)
        self.cached_prompt_tokens.labels(label).inc(stats.cached_prompt_tokens)
        self.generated_tokens.labels(label).inc(stats.generated_tokens)
        self.accepted_draft_tokens.labels(label).inc(stats.accepted_draft_tokens)
        self.generations.labels(label, result.finish_reason).inc()
        if stats.generated_tokens:
            self.ttft.labels(label).observe(stats.ttft_s)
        if stats.decode_tokens_per_s > 0:
            self.decode_rate.labels(label).observe(stats.decode_tokens_per_s)

    def text(self) -> str:
        """The exposition text, as /metrics serves it."""
        return generate_latest(self.registry).decode()

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0: a free port); returns the bound port."""
        from prometheus_client import start_http_server

        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise InvalidInputError(f"cannot serve metrics on {host}:{port}: {exc.strerror}",
                                    fix="pick a free --metrics-port (0: any), or --no-metrics"
                                    ) from None
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _LiveCollector:
    """Gauges read from the loaded models at scrape time."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        queue = GaugeMetricFamily("llmopt_queue_depth", "Requests waiting to run", labels=["model"])
        batch = GaugeMetricFamily("llmopt_batch_size",
                                  "Requests running now (decoders: rows in the running batch)",
                                  labels=["model"])
        ready = GaugeMetricFamily("llmopt_model_ready", "1 when the model serves requests",
                                  labels=["model"])
        kv = GaugeMetricFamily("llmopt_kv_cache_bytes",
                               "Bytes the decoder's KV stores hold (preallocated slots counted; "
                               "what kv_budget_bytes bounds)", labels=["model"])
        for model in self.repository.loaded():
            queue.add_metric([model.name], model.queue_depth())
            batch.add_metric([model.name], model.batch_size())
            kv.add_metric([model.name], model.kv_cache_bytes())
        for entry in self.repository.index():
            ready.add_metric([entry.name], 1.0 if entry.state == "READY" else 0.0)
        yield from (queue, batch, ready, kv)
