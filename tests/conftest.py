"""Suite-wide setup: offline Hugging Face, marker auto-skips, and the real-model fixtures."""

from __future__ import annotations

import os

# Before anything imports transformers or huggingface_hub: tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import ctypes.util
import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest


@functools.cache
def _gpu_missing() -> str | None:
    """Why CUDA tests cannot run here, or None when they can."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "no CUDA provider in onnxruntime (install onnxruntime-gpu)"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA GPU: nvidia-smi not found"
    try:
        listed = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no usable NVIDIA GPU: nvidia-smi failed ({exc})"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return "no usable NVIDIA GPU: nvidia-smi -L lists none"
    return None


@functools.cache
def _tensorrt_missing() -> str | None:
    """Why TensorRT tests cannot run here, or None when they can."""
    reason = _gpu_missing()
    if reason is not None:
        return reason
    import onnxruntime

    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        return "no TensorRT provider in onnxruntime"
    if importlib.util.find_spec("tensorrt") is None and ctypes.util.find_library("nvinfer") is None:
        return "TensorRT is not installed (no tensorrt module, no libnvinfer)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, missing in (("gpu", _gpu_missing), ("tensorrt", _tensorrt_missing)):
            if marker in item.keywords:
                reason = missing()
                if reason is not None:
                    item.add_marker(pytest.mark.skip(reason=f"{marker}: {reason}"))


def _fetch_or_skip(name: str) -> Path:
    from llmopt.errors import SourceError
    from llmopt.models import fetch

    try:
        return fetch(name)
    except SourceError as exc:
        pytest.skip(f"real model {name!r} is not available: {exc} (`make models` fetches it)")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a .gguf file (Llama architecture, Q4_1)."""
    return _fetch_or_skip("smollm2-135m-instruct")


DEMO_ARGS = ("--max-new-tokens", "24", "--bench-new-tokens", "8", "--bench-repetitions", "1",
             "--json")


def run_demo_cli(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``llmopt demo --out OUT`` as a user runs it, in a subprocess."""
    import sys

    return subprocess.run([sys.executable, "-m", "llmopt.cli.main", "demo", "--out", str(out),
                           *DEMO_ARGS, *extra], capture_output=True, text=True, timeout=1800,
                          check=False)


@pytest.fixture(scope="session")
def smollm2_demo(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``llmopt demo`` run once, end to end: its packages (fp32, fused, int8, int4) are the
    SmolLM2 packages the other real-model tests check."""
    import json
    import time

    out = tmp_path_factory.mktemp("demo") / "llmopt-demo"
    started = time.perf_counter()
    result = run_demo_cli(out)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, f"llmopt demo failed:\n{result.stderr[-6000:]}"
    summary = json.loads(result.stdout[result.stdout.rindex("\n{") + 1:])
    return {"out": out, "stdout": result.stdout, "stderr": result.stderr, "summary": summary,
            "seconds": seconds}


@pytest.fixture(scope="session")
def smollm2_package(smollm2_demo: dict[str, Any]) -> Path:
    """SmolLM2-135M-Instruct exported from its GGUF file by the demo (validated against
    PyTorch: six input shapes and greedy generation)."""
    return Path(smollm2_demo["out"]) / "packages" / "fp32"


@pytest.fixture(scope="session")
def smollm2_fused(smollm2_demo: dict[str, Any]) -> Path:
    """The demo's fused (optimize level 2) SmolLM2 package."""
    return Path(smollm2_demo["out"]) / "packages" / "fused"


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf: Path) -> Any:
    """The same model in PyTorch (transformers dequantizes the GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face model directory (BERT)."""
    return _fetch_or_skip("all-minilm-l6-v2")


# tiny GGUF files (tests/tiny_gguf.py) by name: (architecture, type of every matrix, overrides)
TINY_GGUF = {
    "Q4_0": ("llama", "Q4_0", None),
    "Q4_K": ("llama", "Q4_K", None),
    "Q8_0": ("llama", "Q8_0", None),
    "Q5_K": ("llama", "Q5_K", None),
    "F16": ("llama", "F16", None),
    # like llama.cpp's Q4_K_M: attn_v and ffn_down in Q6_K, the rest Q4_K
    "Q4_K_M": ("llama", "Q4_K", {"attn_v": "Q6_K", "ffn_down": "Q6_K"}),
}


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``tiny_gguf(name) -> (gguf file, fp32 package exported from it)``, each written and
    exported once per session (see TINY_GGUF)."""
    import llmopt
    from tests import tiny_gguf as builder

    made: dict[str, tuple[Path, Path]] = {}

    def make(name: str) -> tuple[Path, Path]:
        if name not in made:
            arch, qtype, overrides = TINY_GGUF[name]
            directory = tmp_path_factory.mktemp(f"gguf-{name}")
            path = builder.build(arch, directory / f"tiny-{arch}.{name}.gguf", qtype,
                                 overrides=overrides)
            made[name] = (path, llmopt.export(path, directory / "fp32").path)
        return made[name]

    return make


@pytest.fixture(scope="session")
def byte_level_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama exported with a byte-level BPE tokenizer (every byte is a token), the
    tokenizer kind grammar-constrained decoding reads (tests/tiny_tokenizers.py). Its context
    is 1024 tokens: tool specs rendered into a prompt take a token per byte."""
    from llmopt.exporter import export
    from tests import tiny_decoders, tiny_tokenizers

    root = tmp_path_factory.mktemp("byte-level-decoder")
    source = tiny_decoders.build("llama", root / "source",
                                 make_tokenizer=tiny_tokenizers.byte_level_tokenizer,
                                 max_position_embeddings=1024)
    return export(source, root / "package").path
