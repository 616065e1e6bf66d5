"""A tiny decoder package, exported once for the bench tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmopt.exporter import ExportOptions, export
    from tests.tiny_decoders import build

    root = tmp_path_factory.mktemp("bench-tiny")
    source = build("llama", root / "source")
    export(source, root / "package", ExportOptions(generation_tokens=4))
    return root / "package"
