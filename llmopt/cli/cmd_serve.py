"""``llmopt serve --model-repository DIR``: serve every package in DIR over gRPC until SIGTERM.

Prints the bound address first (``listening on HOST:PORT``), so scripts can start it on port 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llmopt.cli._providers import add_provider_args, provider_options

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model repository over gRPC and HTTP (llmopt, KServe v2, OpenAI)",
        description="Serve every package in a model repository over gRPC (llmopt's API and the "
        "KServe v2 / Triton protocol) and HTTP (OpenAI-compatible routes and KServe v2 REST), "
        "with health, reflection and Prometheus metrics. Runs "
        "until SIGTERM or SIGINT, then drains in-flight requests.")
    p.add_argument("--model-repository", required=True, type=Path, metavar="DIR",
                   help="folder holding one package directory per model")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001; 0: any)")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus /metrics HTTP port (default 8002; 0: any)")
    p.add_argument("--metrics-host", metavar="HOST",
                   help="address of the /metrics endpoint (default: --host); it is plain HTTP "
                   "without auth even when TLS and tokens guard gRPC, so bind it where only "
                   "your scraper reaches it")
    p.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    p.add_argument("--http-port", type=int, default=8000,
                   help="HTTP port on the same host: OpenAI-compatible /v1 routes and KServe v2 "
                   "REST (default 8000; 0 picks a free one)")
    p.add_argument("--no-http", action="store_true", help="serve gRPC only")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token-file", type=Path, help="bearer tokens, one per line")
    auth.add_argument("--token-env", metavar="VAR",
                      help="environment variable holding bearer tokens (comma-separated)")
    p.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path,
                   help="CA of client certificates: enables mutual TLS")
    p.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024,
                   help="largest request or response message (default 64 MiB)")
    p.add_argument("--workers", type=int, default=64,
                   help="concurrent RPCs; more get RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds in-flight requests get on shutdown (default 30)")
    p.add_argument("--request-timeout", type=float, metavar="SECONDS",
                   help="limit of a request whose client sets no deadline (default: none, it "
                   "waits as long as needed); a model's llmopt-serve.yaml may set its own "
                   "request_timeout_s")
    add_provider_args(p)  # every model's defaults; a package's llmopt-serve.yaml overrides them
    p.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="decoders: one shared left-padded batch (faster with many streams; "
                   "greedy answers may then change with the load, docs/batch_invariance.md)")
    p.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                   help="decoders: prompt tokens prefilled per engine step, between decode "
                   "steps of running streams (default 256; 0: whole prompts at once); "
                   "llmopt-serve.yaml overrides it per model")
    p.add_argument("--prefix-cache-mib", type=float, metavar="MIB",
                   help="decoders: host memory for the keys and values of recent prompts and "
                   "answers, so a prompt that starts with them (a shared system prompt, a "
                   "chat's earlier turns) skips their prefill with the same results (default "
                   "128; 0: off); llmopt-serve.yaml's prefix_cache_bytes overrides it per model")
    p.add_argument("--prompt-lookup", type=int, metavar="N",
                   help="decoders: draft up to N tokens per step from the text so far for "
                   "requests that set none, checked in one step while a request runs alone in "
                   "its batch: the same tokens, fewer steps where answers repeat their prompts "
                   "(default 0: off); llmopt-serve.yaml overrides it per model")
    p.add_argument("--max-prompt-tokens", type=int, metavar="TOKENS",
                   help="decoders: refuse longer prompts with INVALID_ARGUMENT (default: the "
                   "model's context); llmopt-serve.yaml overrides it per model")


def run(args: argparse.Namespace) -> int:
    from llmopt.errors import InvalidInputError
    from llmopt.server import ModelConfig, ServerConfig, TLSConfig, read_tokens, serve

    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            raise InvalidInputError("TLS needs both --tls-cert and --tls-key",
                                    fix="pass both (and --tls-client-ca for mutual TLS)")
        tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    tokens: tuple[str, ...] = ()
    if args.token_file or args.token_env:
        tokens = read_tokens(file=args.token_file, env=args.token_env)
    if args.prefix_cache_mib is not None and not 0 <= args.prefix_cache_mib < 2 ** 40:
        raise InvalidInputError(f"--prefix-cache-mib must be >= 0, not {args.prefix_cache_mib}",
                                fix="e.g. --prefix-cache-mib 128; 0 turns prefix caching off")
    prefix_bytes = None if args.prefix_cache_mib is None else int(args.prefix_cache_mib * 2 ** 20)
    model_options = {name: value for name, value in (
        ("prefill_chunk", args.prefill_chunk), ("max_prompt_tokens", args.max_prompt_tokens),
        ("prefix_cache_bytes", prefix_bytes), ("prompt_lookup", args.prompt_lookup))
        if value is not None}
    config = ServerConfig(tokens=tokens, tls=tls, max_message_bytes=args.max_message_bytes,
                          max_workers=args.workers, grace_s=args.grace,
                          metrics_port=None if args.no_metrics else args.metrics_port,
                          metrics_host=args.metrics_host or args.host,
                          model_defaults=ModelConfig(
                              providers=tuple(args.providers or ("cpu",)),
                              provider_options=provider_options(args),
                              strict_providers=args.strict_providers,
                              request_timeout_s=args.request_timeout,
                              batch_invariant=args.batch_invariant,
                          ).merged(model_options, "serve options"),
                          http_port=None if args.no_http else args.http_port)
    if args.host not in LOOPBACK and (tls is None or not tokens):
        print(f"llmopt serve: warning: binding {args.host} without "
              f"{'TLS' if tls is None else 'tokens'}; anyone who can reach it can use it",
              file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    return serve(args.model_repository, f"{host}:{args.port}", config, on_ready=_announce)


def _announce(server: Any) -> None:
    scheme = "TLS" if server.config.tls else "plaintext"
    if server.config.tls and server.config.tls.client_ca_file:
        scheme = "mutual TLS"
    auth = "bearer token" if server.config.tokens else "none"
    print(f"llmopt serve: listening on {server.address} ({scheme}, auth: {auth})", flush=True)
    if server.http_url is not None:
        print(f"llmopt serve: http on {server.http_url} (OpenAI /v1, KServe v2 REST)",
              flush=True)
    if server.metrics_port is not None:
        print(f"llmopt serve: metrics on http://{server.config.metrics_host}:"
              f"{server.metrics_port}/metrics", flush=True)
    for entry in server.repository.index():
        reason = f": {entry.reason}" if entry.reason else ""
        print(f"llmopt serve: model {entry.name} {entry.state}{reason}", flush=True)
