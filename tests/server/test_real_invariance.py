"""SmolLM2-135M-Instruct served in the quantized precisions llmopt ships: eight identical greedy
prompts sent at once through the server get exactly the single request's tokens.

Before batch-invariant decoding, requests that joined a running batch one step later were
left-padded by one cache column, and the int8 package's answers diverged from token 30 (3 of 8),
the int4 package's from token 4 (issue #15). Dynamic int8 couples rows even unpadded (one
activation scale for the whole batch), so its rows run alone.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import llmopt

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
PROMPT = "Write a short story about a girl who learns to paint."
STREAMS = 8


@pytest.fixture(scope="module")
def quantized(smollm2_demo: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """The demo's int8 and int4 packages, and dynamic int8 made from its fused package."""
    from llmopt.quantizer import QuantizeOptions, quantize

    packages = Path(smollm2_demo["out"]) / "packages"
    dynamic = tmp_path_factory.mktemp("int8-dynamic") / "int8_dynamic"
    quantize(packages / "fused", dynamic, replace(QuantizeOptions.int8_dynamic(), evaluate=False))
    return {"int8": packages / "int8", "int4": packages / "int4", "int8_dynamic": dynamic}


@pytest.mark.parametrize("precision", ["int4", "int8", "int8_dynamic"])
def test_concurrent_identical_greedy_prompts_equal_the_single_request(
        quantized: dict[str, Path], tmp_path: Path, precision: str) -> None:
    from llmopt.server import create_server

    (tmp_path / "smollm2").symlink_to(quantized[precision], target_is_directory=True)
    server, _ = create_server(tmp_path, "127.0.0.1:0")
    server.start()
    try:
        with llmopt.Client(server.address, timeout=600) as client:
            single = client.chat("smollm2", PROMPT, max_new_tokens=48).token_ids
        got: dict[int, list[int]] = {}
        start = threading.Barrier(STREAMS)

        def ask(i: int) -> None:
            with llmopt.Client(server.address, timeout=600) as client:
                start.wait()
                got[i] = client.chat("smollm2", PROMPT, max_new_tokens=48).token_ids

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    finally:
        server.stop(0)
    assert len(single) == 48
    assert [got.get(i) for i in range(STREAMS)] == [single] * STREAMS


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_prompts_of_different_lengths_joining_mid_stream_equal_their_single_answers(
        quantized: dict[str, Path], precision: str) -> None:
    """These packages are ragged (GroupQueryAttention reads each row's own length): the engine
    runs rows of all lengths in one pass, so each answer must still be the request's alone,
    while others join its batch at other lengths and leave it."""
    from llmopt.runtime.engine import Engine, EngineConfig
    from llmopt.runtime.generator import Generator
    from llmopt.runtime.sampling import SamplingParams

    generator = llmopt.load(quantized[precision], ["cpu"])
    assert isinstance(generator, Generator) and generator.model.ragged
    prompts = [PROMPT, "What is the capital of France?", "List three fruits.",
               "Explain in two sentences why the sky is blue."]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (40, 12, 24, 16)]
    singles = [generator.chat(p, q).token_ids for p, q in zip(prompts, params, strict=True)]
    engine = Engine(generator, EngineConfig()).start()
    try:
        requests = []
        for prompt, p in zip(prompts, params, strict=True):
            requests.append(engine.submit(prompt, p, chat=True))
            while len(requests[0].state.generated) < 2 * len(requests):
                requests[0].finished.wait(0.005)  # each joins a batch already decoding
        got = [r.result(timeout=600).token_ids for r in requests]
    finally:
        engine.close()
    assert got == singles
    assert engine.forward_passes - len(prompts) == engine.steps  # one decode pass per step
