"""Real-model packages, exported once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2_package(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct exported from its GGUF file, with 32-token greedy validation."""
    from llmopt.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("smollm2") / "package"
    export(smollm2_gguf, out, ExportOptions(generation_tokens=32))
    return out


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf: Path) -> Any:
    """The same model in PyTorch (transformers dequantizes the GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    return model.eval()
