"""The tiny decoders that the engine tests share (tests/runtime/test_real_smollm2.py has its
own ``generator``: the real model)."""

from __future__ import annotations

import pytest

import llmopt
from llmopt.exporter import export
from llmopt.optimizer import optimize
from llmopt.runtime.generator import Generator
from tests import tiny_decoders


@pytest.fixture(scope="module", params=["exported", "optimized"])
def generator(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Generator:
    """``optimized``: GroupQueryAttention, whose cache the engine feeds as past-sized tensors
    (joining, padding and dropping rows), while a lone Generator updates one buffer in place."""
    root = tmp_path_factory.mktemp("engine")
    package = export(tiny_decoders.build("llama", root / "source"), root / "package")
    if request.param == "optimized":
        package = optimize(package, root / "optimized")
    runner = llmopt.load(package.path)
    assert isinstance(runner, Generator)
    return runner
