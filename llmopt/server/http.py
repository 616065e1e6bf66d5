"""The HTTP front door: OpenAI-compatible routes and KServe v2 REST on Starlette + uvicorn.

It runs in the gRPC server's process, on its own thread and event loop, over the same model
repository, engines, metrics and limits, so a model answers alike through either door:

    client ──HTTP──▶ uvicorn ─▶ HttpGate (auth, drain, size, call limit, metrics) ─▶ routes
                                                                                     │
    client ──gRPC──▶ grpc server ─▶ _guard (the same checks) ─▶ servicers ──────────┴─▶ engines

Blocking work (generation, encoder runs) goes to a thread pool of ``max_workers`` threads, as
gRPC's does; the event loop only parses, streams and watches for disconnects.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmopt.errors import InvalidInputError, LlmoptError
from llmopt.server import kserve_rest, openai_api
from llmopt.server.config import TLSConfig
from llmopt.server.http_context import HttpContext, error_response
from llmopt.server.http_errors import kserve_body, openai_body
from llmopt.server.rpc import CallLimit, as_llmopt
from llmopt.server.status import (
    AuthenticationError,
    RequestTooLargeError,
    ServerUnavailableError,
)

log = logging.getLogger("llmopt.server")
OPEN_PREFIXES = ("/v2/health/",)  # probes need no token and answer while draining


class HttpGate:
    """ASGI middleware applying the gRPC side's policy to every HTTP request: bearer token
    (401), draining (503), body size (413), the shared call limit (429), then per-route
    metrics, with the status and model the route reports."""

    def __init__(self, app: Any, context: HttpContext, tokens: Sequence[str],
                 limit: CallLimit) -> None:
        self.app = app
        self.context = context
        self.tokens = [t.encode() for t in tokens]
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})

        async def observed_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        metrics = self.context.metrics
        metrics.started()
        entered = False
        try:
            error = self._refusal(scope)
            if error is None:
                try:
                    self.limit.enter()
                    entered = True
                except LlmoptError as exc:
                    error = exc
            if error is not None:
                await error_response(error, path)(scope, receive, observed_send)
                return
            await self.app(scope, self._bounded(receive), observed_send)
        finally:
            if entered:
                self.limit.exit()
            metrics.ended()
            metrics.rpc(state.get("route", "unrouted"), state.get("model", ""), str(status[0]),
                        time.perf_counter() - started)

    def _refusal(self, scope: dict[str, Any]) -> LlmoptError | None:
        headers = dict(scope["headers"])
        if self.tokens and not self._allowed(headers.get(b"authorization", b"")):
            return AuthenticationError(
                "missing or invalid bearer token",
                fix="send the header 'Authorization: Bearer <token>' (openai: api_key=<token>)")
        if self.context.draining():
            return ServerUnavailableError("the server is shutting down",
                                          fix="retry on another replica, or after the restart")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return InvalidInputError("the Content-Length header is not a number",
                                     fix="send a valid Content-Length")
        if int(length) > self.context.max_body_bytes:
            return _too_large(self.context.max_body_bytes)
        return None

    def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        given = token.strip()
        # every token is compared, so the time taken does not tell which one nearly matched
        return sum(hmac.compare_digest(given, t) for t in self.tokens) > 0

    def _bounded(self, receive: Any) -> Any:
        """``receive`` that refuses a body growing past the limit (chunked uploads have no
        Content-Length to check up front)."""
        seen = 0
        limit = self.context.max_body_bytes

        async def bounded() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return dict(message)

        return bounded


def endpoint(route: str, handler: Callable[[Request, HttpContext], Awaitable[Response]],
             context: HttpContext) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint that names its route for the metrics and turns every failure into
    an error response, so one bad request never reaches uvicorn as an exception."""

    async def run(request: Request) -> Response:
        request.state.route = route
        try:
            return await handler(request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a 4xx/5xx, never a crash
            error = as_llmopt(exc, route)
            return error_response(error, request.url.path, getattr(error, "param", None))

    return run


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"the request body is larger than the server's limit of "
                                f"{limit} bytes", fix="send a smaller request, or raise "
                                "--max-message-bytes")


def build_app(context: HttpContext, tokens: Sequence[str], limit: CallLimit) -> Any:
    routes = [Route(path, endpoint(name, handler, context), methods=[method])
              for method, path, name, handler in (*openai_api.ROUTES, *kserve_rest.ROUTES)]
    app = Starlette(routes=routes)

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        error = InvalidInputError(f"no route {request.method} {request.url.path[:100]}",
                                  fix="see docs/http.md for the routes")
        body = (kserve_body(error) if request.url.path.startswith("/v2")
                else openai_body(error))
        return JSONResponse(body, code)

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_found)
    return HttpGate(app, context, tokens, limit)


class HttpServer:
    """uvicorn on a socket bound at construction (port 0: a free one), serving on a thread of
    its own until :meth:`stop`."""

    def __init__(self, app: Any, host: str, port: int, tls: TLSConfig | None) -> None:
        import uvicorn

        self.host = host.strip("[]")
        self.socket = _bind(self.host, port)
        self.port = int(self.socket.getsockname()[1])
        options: dict[str, Any] = {}
        if tls is not None:
            import ssl

            options = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
            if tls.client_ca_file is not None:
                options |= {"ssl_ca_certs": str(tls.client_ca_file),
                            "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=1, **options)
        try:
            config.load()  # reads the TLS files now, so a bad one fails before serving
        except (OSError, ValueError) as exc:
            self.socket.close()
            raise InvalidInputError(f"cannot serve HTTP with TLS: {exc}",
                                    fix="pass readable PEM files to --tls-cert/--tls-key"
                                    ) from None
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                        name="llmopt-http", daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise InvalidInputError(f"the HTTP server on port {self.port} failed to start",
                                        fix="see the log above")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidInputError(f"cannot serve HTTP on {host}:{port}: {exc.strerror}",
                                fix="pick a free --http-port (0: any), or --no-http") from None
    sock.set_inheritable(True)
    return sock
