"""Real-model fixtures of the runtime tests (the SmolLM2 package itself is in tests/conftest.py,
shared with the server tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf: Path) -> Any:
    """The same model in PyTorch (transformers dequantizes the GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    return model.eval()
