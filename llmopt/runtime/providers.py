"""Execution providers: names, typed options, and what ONNX Runtime is given for them.

Provider names match case-insensitively with aliases (``tensorrt``/``trt``, ``cuda``/``gpu``,
``cpu``). Option classes turn into ONNX Runtime provider-option dicts; they are written from
the ONNX Runtime documentation and unit-tested for the dicts they produce.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.errors import InvalidInputError, ProviderError

ORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}
ALIASES = {"trt": "tensorrt", "gpu": "cuda", "directml": "dml"}
INSTALL_HINTS = {
    "tensorrt": "pip install onnxruntime-gpu and TensorRT (pip install tensorrt), on a "
    "machine with an NVIDIA GPU",
    "cuda": "pip install 'onnxruntime-gpu[cuda,cudnn]' (the CUDA and cuDNN libraries its "
    "release is built for) on a machine with an NVIDIA GPU",
    "openvino": "pip install onnxruntime-openvino",
    "dml": "pip install onnxruntime-directml (Windows)",
    "coreml": "use the onnxruntime wheel for macOS",
    "rocm": "install onnxruntime built with ROCm",
    "migraphx": "install onnxruntime built with MIGraphX",
}


def canonical(name: str) -> str:
    """``"TRT"`` -> ``"tensorrt"``; ``"CUDAExecutionProvider"`` -> ``"cuda"``."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in ORT_NAMES:
        return key
    for short, ort_name in ORT_NAMES.items():
        if key == ort_name.lower():
            return short
    installed = ", ".join(available()) or "none"
    raise ProviderError(
        f"unknown execution provider {name!r}; known: {', '.join(ORT_NAMES)}; "
        f"installed here: {installed}",
        fix="pass one of the installed providers, e.g. providers=['cpu']",
    )


def available() -> list[str]:
    """Short names of the providers this onnxruntime build has."""
    import onnxruntime as ort

    reverse = {v: k for k, v in ORT_NAMES.items()}
    return [reverse.get(p, p) for p in ort.get_available_providers()]


@dataclass(frozen=True)
class CPUOptions:
    """CPU provider and session threading. ``None`` leaves ONNX Runtime's default."""

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    arena: bool = True
    spin: bool | None = None  # busy-wait between ops: lower latency, burns idle CPU

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1024:
                raise InvalidInputError(f"{name} must be between 0 and 1024, not {value}",
                                        fix="pass a thread count such as 2 (0 means default)")

    def provider_options(self) -> dict[str, str]:
        return {"arena_extend_strategy": "kNextPowerOfTwo"} if self.arena else {}

    def apply(self, session_options: Any) -> None:
        if self.intra_op_threads is not None:
            session_options.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads is not None:
            session_options.inter_op_num_threads = self.inter_op_threads
        session_options.enable_cpu_mem_arena = self.arena
        if self.spin is not None:
            flag = "1" if self.spin else "0"
            session_options.add_session_config_entry("session.intra_op.allow_spinning", flag)
            session_options.add_session_config_entry("session.inter_op.allow_spinning", flag)


@dataclass(frozen=True)
class CUDAOptions:
    """CUDA provider options (see ONNX Runtime's CUDA execution provider documentation)."""

    device_id: int = 0
    memory_limit: int | None = None  # bytes
    arena_strategy: str = "kNextPowerOfTwo"  # or "kSameAsRequested"
    cuda_graph: bool = False
    tf32: bool = True
    cudnn_conv_algo_search: str = "EXHAUSTIVE"

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise InvalidInputError("device_id must be >= 0", fix="pass e.g. device_id=0")
        if self.arena_strategy not in ("kNextPowerOfTwo", "kSameAsRequested"):
            raise InvalidInputError(
                f"unknown arena_strategy {self.arena_strategy!r}",
                fix="use kNextPowerOfTwo or kSameAsRequested",
            )
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise InvalidInputError("memory_limit must be a positive number of bytes",
                                    fix="pass e.g. memory_limit=8 * 2**30")

    def provider_options(self) -> dict[str, str]:
        options = {
            "device_id": str(self.device_id),
            "arena_extend_strategy": self.arena_strategy,
            "enable_cuda_graph": _flag(self.cuda_graph),
            "use_tf32": _flag(self.tf32),
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
        }
        if self.memory_limit is not None:
            options["gpu_mem_limit"] = str(self.memory_limit)
        return options

    def apply(self, session_options: Any) -> None:
        del session_options


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max of one symbolic dimension (``batch``, ``sequence``, ``past_sequence`` ...)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise InvalidInputError(
                f"shape range needs 0 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}",
                fix="e.g. ShapeRange(1, 1, 8) for batch",
            )


@dataclass(frozen=True)
class TensorRTOptions:
    """TensorRT provider options. Engine and timing caches live under ``cache_dir``, in a
    subdirectory keyed by model, GPU, TensorRT version and shape profile (see ``cache_key``)."""

    device_id: int = 0
    fp16: bool = False
    int8: bool = False
    cache_dir: str | None = None
    builder_optimization_level: int = 3
    max_workspace_size: int | None = None
    cuda_graph: bool = False
    shape_ranges: dict[str, ShapeRange] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.builder_optimization_level <= 5:
            raise InvalidInputError(
                f"builder_optimization_level must be 0..5, not {self.builder_optimization_level}",
                fix="use 3 (TensorRT's default) or 5 for the slowest build and fastest engine",
            )

    def provider_options(self, profile: dict[str, str] | None = None,
                         cache_key: str | None = None) -> dict[str, str]:
        options = {
            "device_id": str(self.device_id),
            "trt_fp16_enable": _flag(self.fp16),
            "trt_int8_enable": _flag(self.int8),
            "trt_builder_optimization_level": str(self.builder_optimization_level),
            "trt_cuda_graph_enable": _flag(self.cuda_graph),
        }
        if self.max_workspace_size is not None:
            options["trt_max_workspace_size"] = str(self.max_workspace_size)
        if self.cache_dir:
            directory = Path(self.cache_dir) / (cache_key or "default")
            options.update({
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(directory),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(directory),
            })
        if profile:
            options.update(profile)
        return options

    def apply(self, session_options: Any) -> None:
        del session_options


ProviderOptions = CPUOptions | CUDAOptions | TensorRTOptions
OPTION_CLASSES: dict[str, type] = {"cpu": CPUOptions, "cuda": CUDAOptions,
                                   "tensorrt": TensorRTOptions}


def tensorrt_profile(signature: dict[str, Any],
                     ranges: dict[str, ShapeRange]) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for every input with a symbolic dimension.

    Each symbolic dimension takes the user's range; undeclared ones default to batch 1..8,
    sequence 1..2048 (opt 128), past 0..2048 (opt 128).
    """
    defaults = {
        "batch": ShapeRange(1, 1, 8),
        "sequence": ShapeRange(1, 128, 2048),
        "past_sequence": ShapeRange(0, 128, 2048),
    }
    merged = {**defaults, **ranges}
    if "total_sequence" not in merged:
        seq, past = merged["sequence"], merged["past_sequence"]
        merged["total_sequence"] = ShapeRange(
            seq.min + past.min, seq.opt + past.opt, seq.max + past.max)
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for value in signature.get("inputs", []):
        dims = value["shape"]
        if all(isinstance(d, int) for d in dims):
            continue
        for which, found in shapes.items():
            parts = []
            for dim in dims:
                if isinstance(dim, int):
                    parts.append(str(dim))
                else:
                    rng = merged.get(dim) or merged["sequence"]
                    parts.append(str(getattr(rng, which)))
            found.append(f"{value['name']}:{'x'.join(parts)}")
    if not shapes["min"]:
        return {}
    return {f"trt_profile_{which}_shapes": ",".join(v) for which, v in shapes.items()}


def tensorrt_cache_key(model_fingerprint: str, profile: dict[str, str],
                       options: TensorRTOptions, gpu: str | None = None,
                       trt_version: str | None = None) -> str:
    """A directory name that changes whenever the model, GPU, TensorRT version, shape profile
    or precision changes, so a stale engine is never reused."""
    payload = {
        "model": model_fingerprint,
        "gpu": gpu if gpu is not None else gpu_name(),
        "tensorrt": trt_version if trt_version is not None else tensorrt_version(),
        "profile": profile,
        "fp16": options.fp16,
        "int8": options.int8,
        "level": options.builder_optimization_level,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:20]


def gpu_name() -> str:
    """The NVIDIA GPU's name, or "none" (reads nvidia-smi; never raises)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "none"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "none"


def tensorrt_version() -> str:
    try:
        from importlib import metadata

        return metadata.version("tensorrt")
    except Exception:  # noqa: BLE001  (any failure means "unknown")
        return os.environ.get("TENSORRT_VERSION", "unknown")


def _flag(value: bool) -> str:
    return "True" if value else "False"
