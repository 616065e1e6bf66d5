"""Server and per-model serving options.

A model repository is a folder of package directories; each may hold an ``llmopt-serve.yaml``
with that model's :class:`ModelConfig` (see docs/grpc.md). Everything has a safe default:
loopback only, no auth unless tokens are given, bounded queues and message sizes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from llmopt.errors import InvalidInputError, PackageError
from llmopt.runtime.engine import DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE_BYTES
from llmopt.runtime.prefix_cache import check_budget
from llmopt.runtime.sampling import check_prompt_lookup

MODEL_CONFIG_NAME = "llmopt-serve.yaml"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ModelConfig:
    """How one model is served. Decoders run in one continuous-batching engine; encoders run
    ``max_concurrency`` sessions at once."""

    providers: tuple[str, ...] = ("cpu",)
    provider_options: Mapping[str, Any] = field(default_factory=dict)
    strict_providers: bool = False
    max_batch_size: int = 8      # decoders: rows in the running batch; encoders: texts per call
    max_queue: int = 64          # requests waiting to run; more get RESOURCE_EXHAUSTED
    kv_budget_bytes: int | None = None  # decoders: KV-cache budget of the running batch
    max_prefill_batch: int = 4   # decoders: prompts prefilled together
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # decoders: prompt tokens per engine step; 0: off
    max_prompt_tokens: int | None = None  # decoders: longest prompt; None: the model's context
    batch_invariant: bool = True  # decoders: rows never padded, greedy answers load-independent
    # decoders: host bytes of recent prompts' and answers' KV kept for reuse; 0: none
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    # decoders: prompt-lookup draft tokens of requests that set none; 0: off
    prompt_lookup: int = 0
    max_concurrency: int = 2     # encoders: session runs at once
    warmup: bool = True          # run one tiny request at load, before reporting READY
    request_timeout_s: float | None = None  # when the client sets no deadline; None: no limit

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_prefill_batch", "max_concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{name} must be an integer >= 1, not {value!r}",
                                        fix=f"set {name} to 1 or more")
        chunk = self.prefill_chunk
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise InvalidInputError(f"prefill_chunk must be an integer >= 0, not {chunk!r}",
                                    fix="e.g. prefill_chunk: 256 (0 turns chunking off)")
        limit = self.max_prompt_tokens
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 1):
            raise InvalidInputError(f"max_prompt_tokens must be a positive integer, not "
                                    f"{limit!r}", fix="leave it out for the model's context")
        if not isinstance(self.batch_invariant, bool):
            raise InvalidInputError(
                f"batch_invariant must be true or false, not {self.batch_invariant!r}",
                fix="batch_invariant: false trades identical greedy answers for throughput")
        check_budget(self.prefix_cache_bytes)
        check_prompt_lookup(self.prompt_lookup)
        budget = self.kv_budget_bytes
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise InvalidInputError(f"kv_budget_bytes must be a positive integer, not {budget!r}",
                                    fix="set it in bytes, or leave it out for no budget")
        timeout = self.request_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or not 0 < timeout < float("inf")):
            raise InvalidInputError(
                f"request_timeout_s must be a positive number of seconds, not {timeout!r}",
                fix="e.g. request_timeout_s: 30, or leave it out to let requests wait")
        if not self.providers or not all(isinstance(p, str) for p in self.providers):
            raise InvalidInputError(f"providers must be a list of names, not {self.providers!r}",
                                    fix="e.g. providers: [cuda, cpu]")
        if not isinstance(self.provider_options, Mapping):
            raise InvalidInputError("provider_options must map a provider name to its options",
                                    fix="e.g. provider_options: {cpu: {intra_op_threads: 2}}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model config") -> ModelConfig:
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"{where} must be a mapping of options",
                                    fix=f"valid options: {', '.join(_names(cls))}")
        unknown = set(data) - set(_names(cls))
        if unknown:
            raise InvalidInputError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}",
                                    fix=f"valid options: {', '.join(_names(cls))}")
        values = dict(data)
        if "providers" in values:
            providers = values["providers"]
            values["providers"] = (providers,) if isinstance(providers, str) else tuple(
                providers or ())
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidInputError(f"{where}: {exc}", fix="check the option types") from None

    def merged(self, overrides: Mapping[str, Any], where: str) -> ModelConfig:
        """This config with ``overrides`` applied (validated like a file)."""
        base = {f.name: getattr(self, f.name) for f in fields(self)}
        return ModelConfig.from_dict({**base, **overrides}, where)


def load_model_config(package_dir: Path, default: ModelConfig | None = None) -> ModelConfig:
    """``<package_dir>/llmopt-serve.yaml`` over ``default``; the default alone without a file."""
    default = default or ModelConfig()
    path = package_dir / MODEL_CONFIG_NAME
    if not path.is_file():
        return default
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PackageError(f"{path} is unreadable: {exc}",
                           fix="fix the YAML, or remove the file to use the defaults") from None
    return default.merged(data, str(path))


@dataclass(frozen=True)
class TLSConfig:
    """PEM files: the server's certificate chain and key, and for mutual TLS the CA that signs
    client certificates (clients without one are refused)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def check(self) -> None:
        """Refuse unreadable or non-PEM files, and a key that does not match the certificate,
        naming the file: grpc would only fail at bind time, after every model has loaded, with
        no word on which file is wrong."""
        import ssl

        files = [("certificate", self.cert_file), ("key", self.key_file)]
        if self.client_ca_file is not None:
            files.append(("client CA", self.client_ca_file))
        for what, path in files:
            try:
                text = Path(path).read_bytes()
            except OSError as exc:
                raise InvalidInputError(f"cannot read the TLS {what} file {path}: {exc.strerror}",
                                        fix="pass a readable PEM file") from None
            if b"-----BEGIN " not in text:
                raise InvalidInputError(f"the TLS {what} file {path} is not PEM",
                                        fix="pass a PEM file (-----BEGIN ...-----); convert DER "
                                        "with openssl x509 -inform der / openssl pkey")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise InvalidInputError(
                f"the TLS key {self.key_file} does not load with the certificate "
                f"{self.cert_file}: {exc.reason or exc}",
                fix="pass the certificate chain and the unencrypted private key made with "
                "it") from None
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self.client_ca_file))
            except ssl.SSLError as exc:
                raise InvalidInputError(
                    f"the TLS client CA file {self.client_ca_file} holds no usable "
                    f"certificate: {exc.reason or exc}",
                    fix="pass the PEM certificate of the CA that signs client certificates"
                ) from None

    def credentials(self) -> Any:
        import grpc

        def read(path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise InvalidInputError(f"cannot read TLS file {path}: {exc.strerror}",
                                        fix="pass readable PEM files") from None

        ca = read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials([(read(self.key_file), read(self.cert_file))],
                                           root_certificates=ca,
                                           require_client_auth=ca is not None)


@dataclass(frozen=True)
class ServerConfig:
    """Options of the whole server; ``create_server`` takes the address separately."""

    tokens: tuple[str, ...] = ()          # bearer tokens; empty: no authentication
    tls: TLSConfig | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_workers: int = 64                 # concurrent RPCs; more get RESOURCE_EXHAUSTED
    metrics_port: int | None = None       # Prometheus /metrics over HTTP; 0 picks a free port
    metrics_host: str = "127.0.0.1"
    grace_s: float = 30.0                 # in-flight requests get this long on shutdown
    http_port: int | None = None          # OpenAI + KServe REST on the gRPC host; 0: free port
    model_defaults: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if not 1024 <= self.max_message_bytes <= 2**31 - 1:
            raise InvalidInputError(
                f"max_message_bytes must be from 1024 to {2**31 - 1}, not {self.max_message_bytes}",
                fix="e.g. --max-message-bytes 67108864 (64 MiB)")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise InvalidInputError(f"http_port must be 0 to 65535, not {self.http_port}",
                                    fix="e.g. --http-port 8000 (0: a free port)")
        if self.max_workers < 1:
            raise InvalidInputError("max_workers must be >= 1", fix="e.g. 64")
        if any(not t or any(c.isspace() for c in t) for t in self.tokens):
            raise InvalidInputError("bearer tokens must be non-empty and contain no whitespace",
                                    fix="one token per line in the token file")

    def with_tokens(self, tokens: tuple[str, ...]) -> ServerConfig:
        return replace(self, tokens=tokens)


def read_tokens(*, file: str | os.PathLike[str] | None = None,
                env: str | None = None) -> tuple[str, ...]:
    """Bearer tokens from a file (one per line, ``#`` comments) or an environment variable
    (comma-separated). Naming a source that holds no token is an error, never "no auth"."""
    tokens: list[str] = []
    if file is not None:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise InvalidInputError(f"cannot read token file {file}: {exc.strerror}",
                                    fix="pass a readable file with one token per line") from None
        tokens += [ln.strip() for ln in text.splitlines()
                   if ln.strip() and not ln.lstrip().startswith("#")]
        if not tokens:
            raise InvalidInputError(f"token file {file} holds no token",
                                    fix="write one token per line")
    if env is not None:
        value = os.environ.get(env, "")
        found = [t.strip() for t in value.split(",") if t.strip()]
        if not found:
            raise InvalidInputError(f"environment variable {env} is unset or empty",
                                    fix=f"export {env}=<token>[,<token>...]")
        tokens += found
    return tuple(dict.fromkeys(tokens))


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]
