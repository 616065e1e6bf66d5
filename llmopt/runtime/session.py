"""The one place that turns provider names and options into an ONNX Runtime session.

ONNX Runtime silently runs on CPU when a GPU provider fails to load. llmopt checks which
provider actually holds the session, logs the reason for any fallback, and with
``strict=True`` refuses to run on a fallback.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.errors import ProviderError
from llmopt.runtime import providers as P

log = logging.getLogger("llmopt.runtime")

ProviderSpec = str | tuple[str, Any]


@dataclass
class SessionInfo:
    """What was asked for and what ONNX Runtime actually gave."""

    requested: list[str]
    active: list[str]
    fallback: bool
    reason: str | None = None
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "active": self.active, "fallback": self.fallback,
                "reason": self.reason, "provider_options": self.provider_options}


def resolve_providers(specs: Sequence[ProviderSpec] | None,
                      options: Mapping[str, Any] | None = None
                      ) -> list[tuple[str, P.ProviderOptions]]:
    """``["cuda", ("cpu", CPUOptions(...))]`` -> canonical names with typed options.

    Options may come inline, from ``options`` keyed by provider name, as option objects or as
    plain dicts of their fields. CPU is appended as the last resort unless already present.
    """
    specs = list(specs or ["cpu"])
    if not specs:
        raise ProviderError("no execution provider given", fix="pass providers=['cpu']")
    resolved: list[tuple[str, P.ProviderOptions]] = []
    for spec in specs:
        name, inline = (spec, None) if isinstance(spec, str) else spec
        short = P.canonical(name)
        value = inline if inline is not None else (options or {}).get(short)
        resolved.append((short, _options(short, value)))
    installed = P.available()
    for short, _ in resolved:
        if short not in installed:
            raise ProviderError(
                f"execution provider {short!r} is not installed in this onnxruntime build "
                f"(installed: {', '.join(installed)})",
                fix=P.INSTALL_HINTS.get(short, "install an onnxruntime build with it"),
            )
    if "cpu" not in [s for s, _ in resolved]:
        resolved.append(("cpu", _options("cpu", (options or {}).get("cpu"))))
    return resolved


def create_session(model_path: str | Path, providers: Sequence[ProviderSpec] | None = None,
                   options: Mapping[str, Any] | None = None, strict: bool = False,
                   signature: dict[str, Any] | None = None,
                   model_fingerprint: str = "") -> tuple[Any, SessionInfo]:
    """An ``InferenceSession`` on the first provider that loads, and what happened."""
    import onnxruntime as ort

    resolved = resolve_providers(providers, options)
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.log_severity_level = 3
    ort_providers: list[tuple[str, dict[str, str]]] = []
    for short, opts in resolved:
        opts.apply(session_options)
        ort_providers.append((P.ORT_NAMES[short], _provider_dict(short, opts, signature,
                                                                 model_fingerprint)))
    requested = [short for short, _ in resolved]
    try:
        with _captured_stderr() as captured:
            session = ort.InferenceSession(str(model_path), session_options,
                                           providers=ort_providers)
    except Exception as exc:  # noqa: BLE001  (onnxruntime's exception types are not public)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProviderError(
            f"onnxruntime could not create a session on {requested}: {first}",
            fix="re-export the package if the model file is at fault; otherwise check the "
            "provider's libraries (CUDA, cuDNN, TensorRT) or use providers=['cpu']",
        ) from None
    reverse = {v: k for k, v in P.ORT_NAMES.items()}
    active = [reverse.get(p, p) for p in session.get_providers()]
    primary = requested[0]
    info = SessionInfo(requested=requested, active=active, fallback=primary not in active,
                       provider_options=dict(ort_providers))
    if info.fallback:
        info.reason = (
            f"{primary} was requested but onnxruntime could not load it "
            f"({_load_failure(captured.text) or 'no GPU, driver or provider libraries'}); "
            f"the session runs on {active[0]}"
        )
        if strict:
            raise ProviderError(info.reason, fix="fix the provider's installation, or drop "
                                "strict providers (--strict-providers) to allow the fallback")
        log.warning("provider fallback: %s", info.reason)
    return session, info


class _Captured:
    text = ""


@contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """Capture what onnxruntime's C++ logger writes to fd 2 while a session is created, so a
    provider's load failure can be named; it is re-logged at debug level."""
    captured = _Captured()
    try:
        saved = os.dup(2)
    except OSError:
        yield captured
        return
    printed = io.StringIO()  # onnxruntime's Python layer prints its "EP Error" notices
    with tempfile.TemporaryFile(mode="w+b") as sink, redirect_stdout(printed):
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace") + printed.getvalue()
    if captured.text.strip():
        log.debug("onnxruntime: %s", captured.text.strip())


def _load_failure(text: str) -> str | None:
    """The most telling line of onnxruntime's provider-load errors."""
    missing = re.findall(r"with error: ([^\n\x1b]+)", text)
    requirement = re.findall(r"(Require [^.]+\.[^.]*\.\*)", text)
    parts = [m.strip() for m in missing[:1]] + requirement[:1]
    if "Please install TensorRT libraries" in text:
        parts.append("TensorRT libraries not found")
    return "; ".join(dict.fromkeys(parts)) or None


def _options(short: str, value: Any) -> P.ProviderOptions:
    cls: Any = P.OPTION_CLASSES.get(short)
    if cls is None:
        return P.CPUOptions() if value is None else value
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ProviderError(
                f"unknown {short} option(s): {', '.join(sorted(unknown))}",
                fix=f"valid options: {', '.join(cls.__dataclass_fields__)}",
            )
        fields = dict(value)
        if short == "tensorrt" and "shape_ranges" in fields:
            fields["shape_ranges"] = {k: v if isinstance(v, P.ShapeRange) else P.ShapeRange(*v)
                                      for k, v in fields["shape_ranges"].items()}
        return cls(**fields)
    raise ProviderError(f"options for {short} must be {cls.__name__} or a dict, "
                        f"not {type(value).__name__}", fix=f"pass {cls.__name__}(...)")


def _provider_dict(short: str, opts: Any, signature: dict[str, Any] | None,
                   fingerprint: str) -> dict[str, str]:
    if isinstance(opts, P.TensorRTOptions):
        profile = P.tensorrt_profile(signature or {}, opts.shape_ranges)
        key = P.tensorrt_cache_key(fingerprint, profile, opts) if opts.cache_dir else None
        return opts.provider_options(profile, key)
    del short
    return dict(opts.provider_options())


def cpu_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU session with full graph optimization, used by export validation."""
    session, _ = create_session(path, ["cpu"], {"cpu": P.CPUOptions(intra_op_threads=threads)})
    return session
