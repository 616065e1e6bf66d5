"""Bearer-token authentication: ``authorization: Bearer <token>`` on every call but health.

Health checks stay open so load balancers and Kubernetes probes need no secret. Tokens are
compared in constant time; a refused call learns only that it is UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: Sequence[str],
                 on_refused: Callable[[str], None] | None = None) -> None:
        if not tokens:
            raise ValueError("no tokens: leave the interceptor out to serve without auth")
        self._tokens = [t.encode() for t in tokens]
        self._on_refused = on_refused or (lambda method: None)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        method = handler_call_details.method or ""
        metadata = handler_call_details.invocation_metadata
        if method.startswith(OPEN_PREFIXES) or self._allowed(metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method stays UNIMPLEMENTED, and reveals nothing
            return None
        self._on_refused(method)
        return _refusal(handler)

    def _allowed(self, metadata: Sequence[Any] | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer":
                continue
            given = token.strip().encode()
            # every token is compared, so the time taken does not tell which one nearly matched
            if sum(hmac.compare_digest(given, t) for t in self._tokens):
                return True
        return False


def _refusal(handler: Any) -> Any:
    """A handler of the same kind as ``handler`` that ends the call UNAUTHENTICATED at once."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)
