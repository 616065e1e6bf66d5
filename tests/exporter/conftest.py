"""Fixtures for the export tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MINILM_ENV = "LLMOPT_MINILM_DIR"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face model directory: fetched by ``llmopt.models``, else
    taken from ``$LLMOPT_MINILM_DIR``, else the test is skipped."""
    reason = "llmopt.models is not available"
    try:
        from llmopt.models import fetch
    except ImportError:
        pass
    else:
        from llmopt.errors import LlmoptError

        try:
            return Path(fetch("all-minilm-l6-v2"))
        except LlmoptError as exc:
            reason = f"fetch('all-minilm-l6-v2') failed: {exc}"
    directory = os.environ.get(MINILM_ENV)
    if directory and (Path(directory) / "config.json").is_file():
        return Path(directory)
    pytest.skip(f"real model all-MiniLM-L6-v2 is not available: {reason}, and ${MINILM_ENV} "
                "does not name a model directory (`make models` fetches it)")
