"""The machine and software a result was measured on, so two results can be told apart.

Every probe is best-effort: a missing tool (nvidia-smi, TensorRT) leaves its field null and
never fails the bench.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def fingerprint() -> dict[str, Any]:
    from llmopt.package import tool_versions
    from llmopt.runtime import kernels

    versions = tool_versions()
    return {
        "cpu": cpu_info(),
        "memory_bytes": _meminfo("MemTotal"),
        "load_average": load_average(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": gpu_info(),
        "versions": versions,
        "onnxruntime_providers": _ort_providers(),
        # which build of llmopt's CPU kernels ran: two runs on one machine can differ by it
        "cpu_kernels": kernels.status(),
    }


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    flags: set[str] = set()
    physical: set[tuple[str | None, str]] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            core = value.strip()
        elif key == "core id":
            physical.add((core, value.strip()))
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "usable_cores": affinity,
        "isa": {flag: flag in flags for flag in ISA_FLAGS} if flags else {},
        "machine": platform.machine(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (others' work included)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gpu_info() -> list[dict[str, Any]] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = "name,driver_version,memory.total,compute_cap"
    try:
        listed = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=False)
        header = subprocess.run([smi], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if listed.returncode != 0:
        return None
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header.stdout)
    gpus = []
    for line in listed.stdout.strip().splitlines():
        name, driver, memory, capability = ([p.strip() for p in line.split(",")] + [""] * 4)[:4]
        gpus.append({"name": name, "driver": driver, "memory": memory,
                     "compute_capability": capability or None,
                     "cuda_driver_version": cuda.group(1) if cuda else None,
                     **_cuda_libraries()})
    return gpus or None


def _cuda_libraries() -> dict[str, Any]:
    """CUDA runtime, cuDNN and TensorRT versions as the Python packages see them."""
    found: dict[str, Any] = {"cuda_runtime": None, "cudnn": None, "tensorrt": None}
    try:
        import torch

        found["cuda_runtime"] = torch.version.cuda
        if torch.backends.cudnn.is_available():
            found["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:  # noqa: BLE001  (a broken CUDA install must not fail the bench)
        pass
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-libs", "tensorrt-cu13"):
        try:
            found["tensorrt"] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    if found["cudnn"] is None:
        for dist in ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13"):
            try:
                found["cudnn"] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return []
