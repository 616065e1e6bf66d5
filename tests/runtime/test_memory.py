"""Memory a long prompt took comes back: decoder sessions run without the CPU arena, and the
engine trims the heap when it empties after long prompts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import llmopt
from llmopt.runtime import engine as engine_module
from llmopt.runtime import memory
from llmopt.runtime.engine import Engine, EngineConfig
from llmopt.runtime.generator import Generator
from llmopt.runtime.prompt_graph import prompt_model
from llmopt.runtime.providers import CPUOptions
from llmopt.runtime.sampling import SamplingParams

SHORT = SamplingParams(max_new_tokens=4, ignore_eos=True)
MARGIN_MB = 100  # idle RSS after a long prompt, above the warm level at most


def test_decoder_sessions_run_without_the_cpu_arena_unless_asked(generator: Generator) -> None:
    assert not generator.session.get_session_options().enable_cpu_mem_arena
    asked = llmopt.load(generator.package, ["cpu"],
                        provider_options={"cpu": CPUOptions(arena=True)})
    assert asked.session.get_session_options().enable_cpu_mem_arena


def test_engine_trims_the_heap_once_empty_after_long_prompts(
        generator: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[float] = []
    monkeypatch.setattr(engine_module, "trim_heap", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(engine_module, "TRIM_AFTER_TOKENS", 100)
    engine = Engine(generator, EngineConfig(prefill_chunk=16)).start()
    try:
        engine.submit("hello world", SHORT).result(timeout=60)
        assert trims == []  # a short prompt is not worth a trim
        engine.submit("the quick brown fox jumps over the lazy dog . " * 12, SHORT).result(60)
        deadline = time.monotonic() + 10
        while not trims and time.monotonic() < deadline:  # the engine thread trims after
            time.sleep(0.01)
        assert len(trims) == 1
    finally:
        engine.close()


def test_trim_heap_reports_a_bool() -> None:
    assert isinstance(memory.trim_heap(), bool)
    assert memory.resident_mb() > 0


@pytest.mark.slow
@pytest.mark.real_model
def test_rss_after_a_long_prompt_and_idle_is_back_near_warm(smollm2_demo: dict[str, Any]
                                                             ) -> None:
    """Anonymous memory (heap: what a prompt can pin) returns within the margin, beside what
    the prefix cache chose to keep (bounded by its budget). The int4 package maps its weights
    file, so rows of the embedding the prompt read stay as file pages: total RSS may grow by at
    most the mapped tables more (reclaimable, bounded by their size)."""
    path = Path(smollm2_demo["out"]) / "packages" / "int4"
    runner = llmopt.load(path)
    assert isinstance(runner, Generator)
    engine = Engine(runner).start()
    try:
        for _ in range(3):
            engine.submit("Hello, how are you?", SHORT).result(120)
        warm = {f: memory.resident_mb(f) for f in ("VmRSS", "RssAnon")}
        readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
        prompt = runner.encode(readme * 20)[:3000]
        engine.submit(prompt, SHORT).result(900)
        time.sleep(1.0)
        idle = {f: memory.resident_mb(f) for f in ("VmRSS", "RssAnon")}
        kept = (engine.prefixes.bytes if engine.prefixes is not None else 0) / 2**20
    finally:
        engine.close()
    graph = prompt_model(path / "model.onnx")
    assert graph is not None
    mapped = sum(table.nbytes for table in graph.shared.values())
    assert kept <= EngineConfig().prefix_cache_bytes / 2**20
    assert idle["RssAnon"] <= warm["RssAnon"] + MARGIN_MB + kept, (warm, idle, kept)
    assert idle["VmRSS"] <= warm["VmRSS"] + MARGIN_MB + kept + mapped / 2**20, (
        warm, idle, kept, mapped)
