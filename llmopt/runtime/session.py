"""The one place that turns provider names and options into an ONNX Runtime session.

ONNX Runtime silently runs on CPU when a GPU provider fails to load, and silently places the
nodes a provider has no kernel for on the next one. llmopt checks which provider actually holds
the session and where each node landed (:mod:`llmopt.runtime.placement`), logs the reason for
any fallback, and with ``strict=True`` refuses to run on one.
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
from llmopt.runtime.placement import RECORD_PLACEMENT, Placement, node_placement
from llmopt.runtime.prompt_graph import EXTERNAL_FOLDER

log = logging.getLogger("llmopt.runtime")

ProviderSpec = str | tuple[str, Any]
GPU_PROVIDERS = ("tensorrt", "cuda")


@dataclass
class SessionInfo:
    """What was asked for and what ONNX Runtime actually gave."""

    requested: list[str]
    active: list[str]
    fallback: bool
    reason: str | None = None
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    placement: Placement = field(default_factory=Placement)
    device_id: int = 0  # the GPU the primary provider runs on (0 on CPU)
    kernels: int = 0  # nodes on llmopt's own CPU kernels (llmopt.runtime.kernels)

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "active": self.active, "fallback": self.fallback,
                "reason": self.reason, "provider_options": self.provider_options,
                "placement": self.placement.as_dict(), "device_id": self.device_id,
                "kernels": self.kernels}


def resolve_providers(specs: Sequence[ProviderSpec] | None,
                      options: Mapping[str, Any] | None = None
                      ) -> list[tuple[str, P.ProviderOptions]]:
    """``["cuda", ("cpu", CPUOptions(...))]`` -> canonical names with typed options.

    Options may come inline, from ``options`` keyed by provider name, as option objects or as
    plain dicts of their fields. CUDA follows TensorRT when this build has it (as ONNX Runtime's
    TensorRT documentation registers them), so the nodes TensorRT rejects stay on the same GPU;
    CPU is appended as the last resort unless already present.
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
    names = [s for s, _ in resolved]
    if "tensorrt" in names and "cuda" not in names and "cuda" in installed:
        trt = resolved[names.index("tensorrt")][1]
        device = getattr(trt, "device_id", 0)
        cuda = _options("cuda", (options or {}).get("cuda") or {"device_id": device})
        resolved.insert(names.index("tensorrt") + 1, ("cuda", cuda))
    if "cpu" not in [s for s, _ in resolved]:
        resolved.append(("cpu", _options("cpu", (options or {}).get("cpu"))))
    return resolved


def create_session(model_path: str | Path, providers: Sequence[ProviderSpec] | None = None,
                   options: Mapping[str, Any] | None = None, strict: bool = False,
                   signature: Mapping[str, Any] | None = None,
                   model_fingerprint: str = "",
                   context_length: int | None = None,
                   model_bytes: bytes | None = None,
                   initializers: Mapping[str, Any] | None = None,
                   custom_ops: str | Path | None = None) -> tuple[Any, SessionInfo]:
    """An ``InferenceSession`` on the first provider that loads, and what happened.

    ``signature`` and ``context_length`` (the package's) size TensorRT's shape profile.
    ``model_bytes``: a serialized variant of the graph at ``model_path`` to open instead (its
    external initializers, if any, are read from ``model_path``'s folder). ``initializers``:
    OrtValues that replace the graph's initializers of those names, unowned by ONNX Runtime
    (two sessions over one graph share them this way): the session object holds them, so they
    live as long as it does. ``custom_ops``: a
    custom-op library the graph needs (llmopt's CPU kernels, :mod:`llmopt.runtime.kernels`).
    """
    import onnxruntime as ort

    resolved = resolve_providers(providers, options)
    requested = [short for short, _ in resolved]
    if requested[0] in GPU_PROVIDERS:
        preload_gpu_libraries()
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.log_severity_level = 3
    session_options.add_session_config_entry(RECORD_PLACEMENT, "1")
    if model_bytes is not None:
        session_options.add_session_config_entry(EXTERNAL_FOLDER, str(Path(model_path).parent))
    if custom_ops is not None:
        session_options.register_custom_ops_library(str(custom_ops))
    for name, value in (initializers or {}).items():
        session_options.add_initializer(name, value)
    ort_providers: list[tuple[str, dict[str, str]]] = []
    for short, opts in resolved:
        opts.apply(session_options)
        ort_providers.append((P.ORT_NAMES[short], provider_dict(
            opts, signature, model_fingerprint, context_length)))
    try:
        with _captured_stderr() as captured:
            session = ort.InferenceSession(
                str(model_path) if model_bytes is None else model_bytes, session_options,
                providers=ort_providers)
    except Exception as exc:  # noqa: BLE001  (onnxruntime's exception types are not public)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProviderError(
            f"onnxruntime could not create a session on {requested}: {first}",
            fix="re-export the package if the model file is at fault; otherwise check the "
            "provider's libraries (CUDA, cuDNN, TensorRT) or use providers=['cpu']",
        ) from None
    # ONNX Runtime reads these weights where they lie: whoever holds the session holds them
    session._llmopt_initializers = dict(initializers or {})
    if model_bytes is not None and hasattr(session, "_model_bytes"):
        # onnxruntime's Python session keeps the bytes to rebuild itself on a provider
        # fallback (GPU only); on CPU that is a second copy of the graph and its weights
        session._model_bytes = None
    reverse = {v: k for k, v in P.ORT_NAMES.items()}
    active = [reverse.get(p, p) for p in session.get_providers()]
    primary = requested[0]
    info = SessionInfo(requested=requested, active=active, fallback=primary not in active,
                       provider_options=dict(ort_providers), placement=node_placement(session),
                       device_id=getattr(resolved[0][1], "device_id", 0))
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
    elif primary in GPU_PROVIDERS:
        check_placement(info, strict)
    return session, info


def preload_gpu_libraries() -> None:
    """Load the CUDA and cuDNN libraries pip installed (``onnxruntime-gpu[cuda,cudnn]``) before
    the first GPU session: without it ONNX Runtime does not find them and falls back to CPU.
    A no-op on builds without ``preload_dlls`` and where the libraries are missing (the
    session's own fallback report then names what is missing)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        with redirect_stdout(io.StringIO()):  # it prints each library it could not find
            preload()
    except Exception as exc:  # noqa: BLE001  (best effort; the session reports the outcome)
        log.debug("onnxruntime.preload_dlls failed: %s", exc)


def check_placement(info: SessionInfo, strict: bool) -> None:
    """Report the compute nodes ONNX Runtime placed on CPU under a GPU provider."""
    on_cpu = info.placement.compute_ops_on("cpu")
    if not on_cpu:
        return
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(on_cpu.items()))
    info.reason = (f"{info.active[0]} holds the session, but these compute nodes run on CPU "
                   f"(no {info.active[0]} kernel for them here): {ops}")
    fix = ("optimize for the GPU (llmopt optimize --target cuda: float16 with "
           "GroupQueryAttention), quantize weight-only (int4) instead of int8 dynamic, or drop "
           "strict providers (--strict-providers) to accept the CPU nodes")
    if strict:
        raise ProviderError(info.reason, fix=fix)
    log.warning("partial CPU placement: %s; to avoid it: %s", info.reason, fix)


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
        accepted = set(cls.__dataclass_fields__) | ({"precision"} if short == "tensorrt" else set())
        unknown = set(value) - accepted
        if unknown:
            raise ProviderError(
                f"unknown {short} option(s): {', '.join(sorted(unknown))}",
                fix=f"valid options: {', '.join(cls.__dataclass_fields__)}",
            )
        fields = dict(value)
        if short == "tensorrt" and "shape_ranges" in fields:
            fields["shape_ranges"] = {k: v if isinstance(v, P.ShapeRange) else P.ShapeRange(*v)
                                      for k, v in fields["shape_ranges"].items()}
        if short == "tensorrt" and "precision" in fields:  # "fp16" for fp16=True, ...
            return P.TensorRTOptions.with_precision(fields.pop("precision"), **fields)
        return cls(**fields)
    raise ProviderError(f"options for {short} must be {cls.__name__} or a dict, "
                        f"not {type(value).__name__}", fix=f"pass {cls.__name__}(...)")


def provider_dict(opts: Any, signature: Mapping[str, Any] | None, fingerprint: str,
                  context_length: int | None) -> dict[str, str]:
    """What ONNX Runtime is given for one provider; for TensorRT with a cache, the keyed cache
    folder is created first."""
    if isinstance(opts, P.TensorRTOptions):
        profile = P.tensorrt_profile(signature or {}, opts.shape_ranges, context_length)
        if not opts.cache_dir:
            return opts.provider_options(profile)
        key = P.tensorrt_cache_key(fingerprint, profile, opts)
        # ONNX Runtime creates only the last folder of a cache path; the keyed one is nested
        opts.cache_path(key).mkdir(parents=True, exist_ok=True)
        return opts.provider_options(profile, key)
    return dict(opts.provider_options())


def cpu_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU session with full graph optimization, used by export validation."""
    session, _ = create_session(path, ["cpu"], {"cpu": P.CPUOptions(intra_op_threads=threads)})
    return session
