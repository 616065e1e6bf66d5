"""Batch-invariant decoding: a row's numbers do not depend on what else runs in the engine.

Every decode step of every running batch is watched: in batch-invariant mode no row's cache is
ever left-padded, and each request's logits are bitwise the logits it gets alone in the engine,
whatever joins and leaves around it. The shared mode pads as documented.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import llmopt
from llmopt.manifest import Manifest
from llmopt.runtime import batch as batch_module
from llmopt.runtime import sequence
from llmopt.runtime.batch import place, prefill_groups, rows_couple
from llmopt.runtime.engine import Engine, EngineConfig, Request
from llmopt.runtime.generator import Generator
from llmopt.runtime.sampling import SamplingParams
from llmopt.server import ModelConfig
from tests.runtime.test_engine import PROMPTS

# the watched request first, then others of other and equal lengths, staggered
WATCHED = PROMPTS[1]
OTHERS = [PROMPTS[0], WATCHED, PROMPTS[2], PROMPTS[5], PROMPTS[3], WATCHED, PROMPTS[4]]


class Watch:
    """Records every request's logits per step and whether each decode pass was padded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.logits: dict[int, list[np.ndarray]] = {}
        self.padded_passes = 0
        self.passes = 0
        step, forward = sequence.DecodeState.step, batch_module.RunningBatch.forward

        def recording_step(state: sequence.DecodeState, logits: np.ndarray) -> int:
            self.logits.setdefault(id(state), []).append(logits.copy())
            return step(state, logits)

        def watched_forward(running: batch_module.RunningBatch, draft: Any = ()) -> np.ndarray:
            self.passes += 1
            self.padded_passes += running.padded
            return forward(running, draft)

        monkeypatch.setattr(sequence.DecodeState, "step", recording_step)
        monkeypatch.setattr(batch_module.RunningBatch, "forward", watched_forward)

    def of(self, request: Request) -> list[np.ndarray]:
        return self.logits[id(request.state)]


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Watch]:
    yield Watch(monkeypatch)


def _run(generator: Generator, config: EngineConfig, prompts: list[str],
         stagger: float = 0.0) -> tuple[Engine, list[Request]]:
    engine = Engine(generator, config).start()
    try:
        requests = []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_new_tokens=10 + 2 * i, ignore_eos=True)
            requests.append(engine.submit(prompt, params))
            time.sleep(stagger)
        for r in requests:
            r.result(timeout=60)
    finally:
        engine.close()
    return engine, requests


def test_a_rows_logits_are_bitwise_its_logits_alone(generator: Generator, watch: Watch) -> None:
    _, [alone] = _run(generator, EngineConfig(), [WATCHED])
    expected = watch.of(alone)
    config = EngineConfig(max_batch_size=4, max_prefill_batch=2)
    for stagger in (0.0, 0.005):  # all at once, then joining and leaving mid-run
        _, requests = _run(generator, config, [WATCHED, *OTHERS], stagger)
        for request in (requests[0], requests[2], requests[6]):  # the watched prompt's rows
            got = watch.of(request)[:len(expected)]
            assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert watch.passes > 0 and watch.padded_passes == 0


def test_equal_lengths_share_one_pass(generator: Generator, watch: Watch) -> None:
    engine = Engine(generator, EngineConfig(max_batch_size=4, max_prefill_batch=4))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    requests = [engine.submit(WATCHED, params) for _ in range(4)]  # queued before the start
    engine.start()
    results = [r.result(timeout=60) for r in requests]
    engine.close()
    assert len({tuple(r.token_ids) for r in results}) == 1
    assert engine.forward_passes == 1 + 5  # one prefill, then one pass per step for all four


def test_other_lengths_run_beside_each_other_unpadded(generator: Generator,
                                                      watch: Watch) -> None:
    engine = Engine(generator, EngineConfig(max_batch_size=4, max_prefill_batch=4))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    requests = [engine.submit(p, params) for p in PROMPTS[:3]]  # three prompt lengths
    engine.start()
    for r in requests:
        r.result(timeout=60)
    engine.close()
    # GroupQueryAttention reading each row's own length: one unpadded pass for all three;
    # otherwise one pass per length
    assert generator.model.ragged == generator.shared_kv
    per_step = 1 if generator.model.ragged else 3
    assert engine.steps == 5 and watch.passes == per_step * 5 and watch.padded_passes == 0


def test_shared_mode_keeps_one_batch_padded_unless_ragged(generator: Generator,
                                                          watch: Watch) -> None:
    config = EngineConfig(max_batch_size=4, max_prefill_batch=4, batch_invariant=False)
    engine = Engine(generator, config)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    requests = [engine.submit(p, params) for p in PROMPTS[:3]]
    engine.start()
    singles = [generator.generate(p, params).token_ids for p in PROMPTS[:3]]
    results = [r.result(timeout=60).token_ids for r in requests]
    engine.close()
    assert watch.passes == engine.steps == 5
    assert watch.padded_passes == (0 if generator.model.ragged else 5)
    assert results == singles  # tiny fp32: padding moves no token here (SmolLM2 int8 it does)


def _requests(*lengths: int) -> list[Any]:
    return [SimpleNamespace(state=SimpleNamespace(prompt=[1] * n)) for n in lengths]


def test_prefill_groups_and_placement() -> None:
    reqs = _requests(3, 5, 3, 4)
    assert prefill_groups(reqs, invariant=False, rows_couple=False) == [reqs]
    assert prefill_groups(reqs, invariant=True, rows_couple=False) == [
        [reqs[0], reqs[2]], [reqs[1]], [reqs[3]]]
    assert prefill_groups(reqs, invariant=True, rows_couple=True) == [[r] for r in reqs]
    live: list[Any] = [_Running(7), _Running(9)]
    assert place(live, 9, invariant=True, rows_couple=False) is live[1]
    assert place(live, 8, invariant=True, rows_couple=False) is None
    assert place(live, 9, invariant=True, rows_couple=True) is None
    assert place(live, 8, invariant=False, rows_couple=False) is live[0]
    # ragged packages: any running batch, never a padded prefill (shared mode too)
    assert place(live, 8, invariant=True, rows_couple=False, ragged=True) is live[0]
    assert place(live, 8, invariant=True, rows_couple=True, ragged=True) is None
    assert prefill_groups(reqs, invariant=False, rows_couple=False, ragged=True) == \
        prefill_groups(reqs, invariant=True, rows_couple=False)


class _Running:
    """A running batch of one row, as far as placement looks."""

    def __init__(self, width: int) -> None:
        self.width = width

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize(("method", "couples"), [("int8_dynamic", True), ("int8", False),
                                                 ("int4", False), (None, False)])
def test_only_dynamic_int8_couples_rows(method: str | None, couples: bool) -> None:
    steps = [{"stage": "export"}] + ([{"stage": "quantize", "method": method}] if method else [])
    fake = SimpleNamespace(package=SimpleNamespace(manifest=Manifest({"steps": steps})))
    assert rows_couple(fake) is couples  # type: ignore[arg-type]


def test_the_switch_is_validated() -> None:
    assert ModelConfig().batch_invariant is True and EngineConfig().batch_invariant is True
    assert ModelConfig.from_dict({"batch_invariant": False}).batch_invariant is False
    with pytest.raises(llmopt.InvalidInputError, match="batch_invariant must be true or false"):
        ModelConfig.from_dict({"batch_invariant": "no"})
