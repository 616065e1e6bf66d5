"""Memory a long prompt took comes back once it is done.

ONNX Runtime's CPU arena keeps every block it ever grew, and glibc keeps freed heap pages, so
one long prompt used to pin its peak for the life of the process (SmolLM2 int4: ~400 MB warm,
~1.1 GB idle after one 4,000-token prompt; bench/results/long_prompt.md). Decoder sessions
therefore allocate without the CPU arena (straight from malloc: no measurable cost next to the
matmuls), and the engine calls :func:`trim_heap` when it empties after long prompts, which hands
the freed pages back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmopt.runtime.providers import CPUOptions

TRIM_AFTER_TOKENS = 1024  # prompt tokens prefilled since the last trim that make one worth it


def decoder_provider_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` with CPU options for a decoder session: the caller's if given, else the
    CPU arena off."""
    merged = dict(options or {})
    merged.setdefault("cpu", CPUOptions(arena=False))
    return merged


def trim_heap() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``): whether any were returned
    (always False without glibc)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident set size in MiB (Linux ``/proc``; NaN elsewhere). ``field``:
    ``VmRSS`` (all of it), ``RssAnon`` (heap and other anonymous memory: what a long prompt can
    pin) or ``RssFile`` (mapped files: int4 packages map their weights file, whose pages come in
    as rows of the embedding are read, bounded by its size, and can be reclaimed)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    kib = next((line.split()[1] for line in status.splitlines()
                if line.startswith(field + ":")), None)
    return int(kib) / 1024 if kib is not None else float("nan")


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
