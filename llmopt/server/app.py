"""The server: ``create_server`` builds and binds it, ``serve`` runs it until a signal.

One process serves gRPC (llmopt's API and KServe v2) and, with ``http_port`` set, HTTP
(OpenAI-compatible routes and KServe v2 REST, see :mod:`llmopt.server.http`) over one model
repository, with grpc.health.v1 (overall,
per service and per model), server reflection, Prometheus metrics, optional bearer tokens and
(mutual) TLS. Shutdown drains: health turns NOT_SERVING, new calls are refused, in-flight ones
get ``grace_s`` to finish, then the engines close.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from llmopt import _proto
from llmopt.errors import InvalidInputError
from llmopt.server.auth import BearerTokenInterceptor
from llmopt.server.config import ServerConfig
from llmopt.server.http import HttpServer, build_app
from llmopt.server.http_context import HttpContext
from llmopt.server.kserve import KServeService
from llmopt.server.llmopt_api import LlmoptService
from llmopt.server.metrics import Metrics
from llmopt.server.repository import ModelRepository
from llmopt.server.rpc import CallLimit, service_handler

log = logging.getLogger("llmopt.server")
SERVICES = (_proto.LLMOPT_SERVICE, _proto.KSERVE_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SPARE_THREADS = 4  # grpc threads beyond max_workers: health checks and reflection never wait
CUT_WAIT_S = 5.0  # after the grace, how long calls get to end UNAVAILABLE before grpc stops


class Server:
    """A bound, not yet started server. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, server: Any, port: int, *, repository: ModelRepository,
                 metrics: Metrics, health_servicer: Any, config: ServerConfig,
                 host: str) -> None:
        self.grpc_server = server
        self.port = port
        self.host = host
        self.repository = repository
        self.metrics = metrics
        self.health = health_servicer
        self.config = config
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None
        self.draining = False
        self.cut = False  # the grace is over: running calls end UNAVAILABLE
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._deadline = float("inf")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    @property
    def http_url(self) -> str | None:
        """``http(s)://host:port`` of the HTTP door, or None without one."""
        if self.http is None:
            return None
        return f"{'https' if self.config.tls else 'http'}://{self.host}:{self.http.port}"

    def start(self) -> Server:
        if self.config.metrics_port is not None:  # first: a port in use fails before serving
            self.metrics_port = self.metrics.serve_http(self.config.metrics_host,
                                                        self.config.metrics_port)
        self.grpc_server.start()
        if self.http is not None:
            try:
                self.http.start()
            except BaseException:
                self.grpc_server.stop(0)
                raise
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, give running ones ``grace`` seconds (default
        the config's), close the models. A second call shortens the grace."""
        grace = self.config.grace_s if grace is None else grace
        with self._lock:
            first = not self.draining
            self.draining = True
            self._deadline = min(self._deadline, time.monotonic() + grace)
        if not first:
            self._stopped.wait()
            return
        log.info("server shutting down: in-flight requests get %.0f s", grace)
        self.health.enter_graceful_shutdown()
        # New calls are refused UNAVAILABLE by the guard from now on (grpc's own stop would
        # answer calls on open connections CANCELLED, which clients do not retry elsewhere).
        # grpc.stop(grace) would also wait for health Watch streams, which never end by
        # themselves: so wait for the work, then stop at once.
        while self.metrics.running > 0 and time.monotonic() < self._deadline:
            time.sleep(0.02)
        if self.metrics.running > 0:
            # Calls still running end UNAVAILABLE "shutting down" (retryable, and said so)
            # rather than with grpc's generic CANCELLED: closing the engines ends their work.
            log.warning("grace over: %d calls still running end UNAVAILABLE",
                        self.metrics.running)
            self.cut = True
            self.repository.close(0)
            cut_until = time.monotonic() + CUT_WAIT_S
            while self.metrics.running > 0 and time.monotonic() < cut_until:
                time.sleep(0.02)
        if self.http is not None:
            self.http.stop()
        self.grpc_server.stop(0).wait()
        self.repository.close(0)
        self.metrics.close()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def create_server(repository: str | Path, address: str = "127.0.0.1:0",
                  config: ServerConfig | None = None) -> tuple[Server, int]:
    """Load every package of ``repository`` and bind ``address``; returns the server and the
    port it bound (``:0`` picks a free one). Call ``start()`` to serve."""
    config = config or ServerConfig()
    if config.tls is not None:
        config.tls.check()  # before loading models: a bad file fails at once, named
    host, port_text = address.rsplit(":", 1) if ":" in address else (address, "")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidInputError(f"cannot bind {address}: the port must be 0 to 65535",
                                fix="give the address as HOST:PORT, e.g. 127.0.0.1:8001")
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2))

    def on_state(name: str, ready: bool) -> None:
        health_servicer.set(name, SERVING if ready else NOT_SERVING)

    repo = ModelRepository(repository, config.model_defaults, on_state=on_state)
    metrics = Metrics(repo)
    repo.load_all()
    holder: list[Server] = []

    def draining() -> bool:
        return bool(holder) and holder[0].draining

    def cut() -> bool:
        return bool(holder) and holder[0].cut

    interceptors = []
    if config.tokens:
        interceptors.append(BearerTokenInterceptor(config.tokens, on_refused=lambda method: (
            metrics.rpc(method.rsplit("/", 1)[-1], "", grpc.StatusCode.UNAUTHENTICATED, 0.0))))
    # API calls are limited to max_workers by CallLimit; the pool has threads beyond that for
    # health checks, reflection and refusals, and grpc's own cap is only a backstop.
    limit = CallLimit(config.max_workers)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers + SPARE_THREADS,
                                   thread_name_prefix="llmopt-rpc"),
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", config.max_message_bytes),
                 ("grpc.max_send_message_length", config.max_message_bytes),
                 ("grpc.so_reuseport", 0)],  # never share a port with another process
        maximum_concurrent_rpcs=2 * config.max_workers + SPARE_THREADS,
    )
    kserve = KServeService(repo, metrics, draining, config.max_message_bytes)
    server.add_generic_rpc_handlers([
        service_handler(_proto.LLMOPT_SERVICE, LlmoptService(repo, metrics), metrics,
                        draining, limit, cut),
        service_handler(_proto.KSERVE_SERVICE, kserve, metrics, draining, limit, cut),
    ])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        health_servicer.set(name, SERVING)
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        _proto.add_file(file.serialized_pb)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool=_proto.pool())
    try:
        if config.tls is not None:
            port = server.add_secure_port(address, config.tls.credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        port, reason = 0, str(exc)
    else:
        reason = "the address is in use or not local"
    if not port:
        repo.close(0)
        raise InvalidInputError(f"cannot bind {address}: {reason}",
                                fix="pick a free port (or 0), and a host of this machine")
    holder.append(Server(server, port, repository=repo, metrics=metrics,
                         health_servicer=health_servicer, config=config, host=host))
    if config.http_port is not None:
        # the same repository, metrics, call limit, tokens and TLS as the gRPC door
        context = HttpContext(repo, metrics, futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix="llmopt-http"), draining,
            config.max_message_bytes, kserve)
        try:
            holder[0].http = HttpServer(build_app(context, config.tokens, limit), host,
                                        config.http_port, config.tls)
        except BaseException:
            server.stop(0)
            repo.close(0)
            raise
    return holder[0], port


def serve(repository: str | Path, address: str = "127.0.0.1:8001",
          config: ServerConfig | None = None, *, on_ready: Any = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain (a second signal cuts the grace short)."""
    server, _ = create_server(repository, address, config)
    stop = threading.Event()
    signals = 0

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            threading.Thread(target=server.stop, args=(0,), daemon=True).start()
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start()
        except BaseException:
            server.repository.close(0)
            raise
        if on_ready is not None:
            on_ready(server)
        while not stop.wait(0.5):
            pass
        server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
