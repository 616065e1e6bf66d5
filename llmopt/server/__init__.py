"""Serve a model repository over gRPC (llmopt's own API and the KServe v2 / Triton protocol)
and, with ``ServerConfig(http_port=...)``, HTTP (OpenAI-compatible routes, KServe v2 REST).

    from llmopt.server import create_server, ServerConfig
    server, port = create_server("models/", "127.0.0.1:0", ServerConfig())
    with server:
        ...

``llmopt serve --model-repository DIR`` runs :func:`serve`. Imports are lazy, so the client can
use :mod:`llmopt.server.status` without loading the server's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmopt.server.app import Server, create_server, serve
    from llmopt.server.config import ModelConfig, ServerConfig, TLSConfig, read_tokens

__all__ = ["ModelConfig", "Server", "ServerConfig", "TLSConfig", "create_server", "read_tokens",
           "serve"]

_LAZY = {
    "Server": "llmopt.server.app",
    "create_server": "llmopt.server.app",
    "serve": "llmopt.server.app",
    "ModelConfig": "llmopt.server.config",
    "ServerConfig": "llmopt.server.config",
    "TLSConfig": "llmopt.server.config",
    "read_tokens": "llmopt.server.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmopt.server' has no attribute {name!r}")
