"""Execution providers: names, typed options, and what ONNX Runtime is given for them.

Provider names match case-insensitively with aliases (``tensorrt``/``trt``, ``cuda``/``gpu``,
``cpu``). Option classes turn into ONNX Runtime provider-option dicts; they are written from
the ONNX Runtime documentation and unit-tested for the dicts they produce.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmopt.errors import InvalidInputError, ProviderError, UnsupportedError

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
    # ONNX Runtime 1.31's TensorRT provider links libnvinfer.so.10 and is built for CUDA 13;
    # a bare ``pip install tensorrt`` resolves to TensorRT 11, which it cannot load
    "tensorrt": "pip install 'onnxruntime-gpu[cuda,cudnn]' 'tensorrt-cu13>=10.13,<11' and put "
    "the tensorrt_libs folder on LD_LIBRARY_PATH, on a machine with an NVIDIA GPU",
    "cuda": "pip install 'onnxruntime-gpu[cuda,cudnn]' (the CUDA 13 and cuDNN 9 libraries its "
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
    # threads stop spinning when a run ends, so another session (a second model, the prompt
    # session) or Python's own work between steps gets the cores (bench/results/spin_stop.md)
    stop_spinning: bool = True
    # int4 packages: prompts run on a second session whose 4-bit MatMuls compute in float32
    # (exact to the weights; llmopt.runtime.prompt_graph). None: where that kernel measures
    # faster on this machine (prompt_graph.float_kernel_pays); True/False: always/never
    float_prompts: bool | None = None
    # llmopt's own CPU kernel (MatMulQ, llmopt.runtime.kernels) for int8-compute MatMulNBits:
    # None: where it builds and this CPU runs it; True: required (an error where it cannot);
    # False: never (ONNX Runtime's kernels only)
    kernels: bool | None = None
    # the kernels' weights on 2 MiB pages where Linux grants them (kernels.HugePageStore)
    huge_pages: bool = True

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
        if self.stop_spinning:
            session_options.add_session_config_entry("session.force_spinning_stop", "1")
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
        _refuse_cuda_graph(self.cuda_graph)
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
    subdirectory keyed by model, GPU, ONNX Runtime / CUDA / TensorRT versions, workspace and
    shape profile (see :func:`tensorrt_cache_key`); the subdirectory is created on load.

    ``shape_ranges`` overrides the profile of a symbolic dimension; by default the maxima follow
    the package's context length (see :func:`tensorrt_profile`)."""

    device_id: int = 0
    fp16: bool = False
    int8: bool = False
    cache_dir: str | None = None
    builder_optimization_level: int = 3
    max_workspace_size: int | None = None
    cuda_graph: bool = False
    shape_ranges: dict[str, ShapeRange] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise InvalidInputError("device_id must be >= 0", fix="pass e.g. device_id=0")
        if self.fp16 and self.int8:
            raise InvalidInputError("choose one TensorRT precision, fp16 or int8",
                                    fix="pass fp16=True or int8=True, not both")
        if self.max_workspace_size is not None and self.max_workspace_size <= 0:
            raise InvalidInputError("max_workspace_size must be a positive number of bytes",
                                    fix="pass e.g. max_workspace_size=4 * 2**30")
        _refuse_cuda_graph(self.cuda_graph)
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
            directory = self.cache_path(cache_key)
            options.update({
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(directory),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(directory),
            })
        if profile:
            options.update(profile)
        return options

    def cache_path(self, cache_key: str | None) -> Path:
        """The engine and timing cache folder: ``cache_dir/<key>``."""
        if not self.cache_dir:
            raise InvalidInputError("TensorRT has no cache_dir", fix="pass cache_dir=...")
        return Path(self.cache_dir).expanduser() / (cache_key or "default")

    def apply(self, session_options: Any) -> None:
        del session_options

    @classmethod
    def with_precision(cls, precision: str, **fields: Any) -> TensorRTOptions:
        """``"fp32"``, ``"fp16"`` or ``"int8"`` (int8 takes a QDQ, i.e. static int8, package:
        TensorRT then reads the scales from the graph instead of a calibration table)."""
        if precision not in TRT_PRECISIONS:
            raise InvalidInputError(f"unknown TensorRT precision {precision!r}",
                                    fix=f"use one of {', '.join(TRT_PRECISIONS)}")
        return cls(fp16=precision == "fp16", int8=precision == "int8", **fields)


TRT_PRECISIONS = ("fp32", "fp16", "int8")


def _refuse_cuda_graph(enabled: bool) -> None:
    if enabled:
        raise UnsupportedError(
            "CUDA graphs cannot capture llmopt's decode step: its inputs (token ids, attention "
            "mask, positions) are fed from the host and change shape every step, and a captured "
            "graph replays fixed shapes and addresses",
            fix="leave cuda_graph off (the default)")


ProviderOptions = CPUOptions | CUDAOptions | TensorRTOptions
OPTION_CLASSES: dict[str, type] = {"cpu": CPUOptions, "cuda": CUDAOptions,
                                   "tensorrt": TensorRTOptions}


DEFAULT_MAX_TOKENS = 2048  # profile maxima when the package does not say its context


def tensorrt_profile(signature: Mapping[str, Any], ranges: dict[str, ShapeRange],
                     context_length: int | None = None) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for every dynamic input of ``signature``.

    Each symbolic dimension takes the user's range; undeclared ones default to batch 1..8 and
    sequence, past and total lengths up to ``context_length`` (2048 if unknown), so a decode
    never outgrows the engine. TensorRT sizes its kernels' workspace and tactics for the
    maxima: a 32k context builds slower and reserves more memory than 2k, which is why they
    stay overridable.

    A scalar integer input (``logits_to_keep``) feeds a Slice, so TensorRT takes it as a
    shape tensor and needs its *values* in the profile: 0 (every position) to 1 (the last),
    opt 1, or the user's ``ranges[name]``.
    """
    most = int(context_length or DEFAULT_MAX_TOKENS)
    defaults = {
        "batch": ShapeRange(1, 1, 8),
        "sequence": ShapeRange(1, min(128, most), most),
        "past_sequence": ShapeRange(0, min(128, most), most),
    }
    merged = {**defaults, **ranges}
    if "total_sequence" not in merged:
        seq, past = merged["sequence"], merged["past_sequence"]
        top = seq.max + past.max  # a context caps the sum: past + new never exceeds it
        top = max(seq.max, min(top, most)) if context_length else top
        merged["total_sequence"] = ShapeRange(
            seq.min + past.min, min(seq.opt + past.opt, top), top)
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for value in signature.get("inputs", []):
        dims = value["shape"]
        if not dims and str(value.get("dtype", "int64")).startswith("int"):
            values = merged.get(value["name"], ShapeRange(0, 1, 1))
            for which, found in shapes.items():
                found.append(f"{value['name']}:{getattr(values, which)}")
            continue
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


@dataclass(frozen=True)
class BuildEnvironment:
    """What a TensorRT engine was built for, besides the model: reusing an engine across any
    of these is undefined, so each is part of the cache key."""

    gpu: str
    onnxruntime: str
    cuda: str
    tensorrt: str

    @classmethod
    def current(cls, device_id: int = 0) -> BuildEnvironment:
        return cls(gpu=gpu_name(device_id), onnxruntime=onnxruntime_version(),
                   cuda=cuda_version(), tensorrt=tensorrt_version())


def tensorrt_cache_key(model_fingerprint: str, profile: dict[str, str],
                       options: TensorRTOptions,
                       environment: BuildEnvironment | None = None) -> str:
    """A directory name that changes whenever the model, the GPU at ``options.device_id``, the
    ONNX Runtime, CUDA or TensorRT version, the shape profile, the precision or the workspace
    changes, so a stale engine is never reused."""
    env = environment or BuildEnvironment.current(options.device_id)
    payload = {
        "model": model_fingerprint,
        **asdict(env),
        "profile": profile,
        "fp16": options.fp16,
        "int8": options.int8,
        "level": options.builder_optimization_level,
        "workspace": options.max_workspace_size,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:20]


def gpu_name(device_id: int = 0) -> str:
    """The name and driver of NVIDIA GPU ``device_id``, or "none" (reads nvidia-smi; never
    raises). ``device_id`` counts as CUDA does when ``CUDA_VISIBLE_DEVICES`` is unset."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "none"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    index = visible[device_id].strip() if device_id < len(visible) and visible[0] else \
        str(device_id)
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "none"


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def cuda_version() -> str:
    """The CUDA version this onnxruntime build targets ("none" for CPU-only builds)."""
    try:
        from onnxruntime.capi import build_and_package_info as build
    except ImportError:
        return "none"
    return str(getattr(build, "cuda_version", "none") or "none")


def tensorrt_version() -> str:
    try:
        from importlib import metadata

        return metadata.version("tensorrt")
    except Exception:  # noqa: BLE001  (any failure means "unknown")
        return os.environ.get("TENSORRT_VERSION", "unknown")


def _flag(value: bool) -> str:
    return "True" if value else "False"
