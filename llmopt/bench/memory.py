"""Resident memory of a process (Linux /proc; getrusage elsewhere) and GPU memory (nvidia-smi).

The peak ("high-water mark", VmHWM) can be reset on Linux by writing 5 to
``/proc/PID/clear_refs``, so a point's peak is the peak during that point, not since start.
Where the reset is refused, the peak is the process's since start, and is labelled so.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes(pid: int | None = None) -> int | None:
    """Current resident set size."""
    kib = _status_kib(pid or os.getpid(), "VmRSS")
    return None if kib is None else kib * 1024


def reset_peak(pid: int | None = None) -> bool:
    """Reset the peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid or os.getpid()}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes(pid: int | None = None) -> int | None:
    """Peak resident set size since start or the last :func:`reset_peak`."""
    kib = _status_kib(pid or os.getpid(), "VmHWM")
    if kib is not None:
        return kib * 1024
    if pid not in (None, os.getpid()):
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def gpu_memory_bytes(pid: int | None = None) -> int | None:
    """GPU memory used by ``pid`` (all GPUs) as nvidia-smi reports it; None without a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    target = pid or os.getpid()
    used = 0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) == target:
            try:
                used += int(float(parts[1])) * 1024 * 1024
            except ValueError:
                continue
    return used or None
