"""The one decode step (DecoderModel.step) on every KVCache implementation, the engine's slot
store, and export validation decoding through the very step the Generator runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import llmopt
from llmopt.exporter import export
from llmopt.optimizer import optimize
from llmopt.runtime import kv
from llmopt.runtime.engine import Engine, EngineConfig
from llmopt.runtime.generator import Generator
from llmopt.runtime.kv import DecoderModel
from llmopt.runtime.kv_cache import CopyingCache, InPlaceCache, KVCache, KVPlacement
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.session import SessionInfo
from llmopt.runtime.slots import PastRows, SlotCache, SlotCopier
from tests import tiny_decoders
from tests.runtime.test_engine import PROMPTS as PROMPTS_TEXT

PROMPTS = ([5, 9, 13, 2, 7], [3, 4, 8, 11, 6, 10, 12])
STEPS = 6
CAPACITY = 32


def _slot_cache(gen: Generator, prompt: list[int]) -> tuple[KVCache, np.ndarray]:
    """A slot store that the prompt joined after a copying prefill (the engine's path), and
    the prefill's logits."""
    prefill = gen.model.copying_cache(1)
    ids = np.array([prompt])
    logits = gen.model.step(ids, np.ones_like(ids), kv.position_ids(np.ones_like(ids)), prefill)
    slots = SlotCache(gen.session, gen.model.layout, 2, CAPACITY, gen.placement,
                      SlotCopier(gen.model.layout, gen.placement))
    slots.join(prefill.past, 0)
    return slots, logits


def _past_rows(gen: Generator, prompt: list[int]) -> tuple[KVCache, np.ndarray]:
    prefill = gen.model.copying_cache(1)
    ids = np.array([prompt])
    logits = gen.model.step(ids, np.ones_like(ids), kv.position_ids(np.ones_like(ids)), prefill)
    rows = PastRows(gen.session, gen.model.layout, gen.placement)
    rows.join(prefill.past, 0, len(prompt))
    return rows, logits


CACHES: dict[str, Callable[[Generator], KVCache]] = {
    "copying": lambda gen: gen.model.copying_cache(1, gen.placement),
    "in_place": lambda gen: InPlaceCache(gen.session, gen.model.layout, 1, CAPACITY,
                                         gen.placement),
}
JOINED: dict[str, Callable[[Generator, list[int]], tuple[KVCache, np.ndarray]]] = {
    "slots": _slot_cache, "past_rows": _past_rows}


def _decode(gen: Generator, cache: KVCache, prompt: list[int],
            prefilled: np.ndarray | None = None) -> list[np.ndarray]:
    """Greedy logits of the prompt's first STEPS steps through DecoderModel.step (copies: an
    in-place cache's next step writes over the array a step returns)."""
    n = len(prompt)
    logits = prefilled
    if logits is None:
        ids = np.array([prompt])
        logits = gen.model.step(ids, np.ones_like(ids), np.arange(n)[None], cache)
    out = [logits[0, -1].copy()]
    for _ in range(STEPS):
        token = np.array([[int(out[-1].argmax())]])
        logits = gen.model.step(token, np.ones((1, n + 1), np.int64), np.array([[n]]), cache)
        out.append(logits[0, -1].copy())
        n += 1
    return out


@pytest.mark.parametrize("kind", [*CACHES, *JOINED])
def test_every_cache_decodes_the_same_tokens(generator: Generator, kind: str) -> None:
    if kind in ("in_place", "slots") and not generator.shared_kv:
        # no shared buffer: the Generator and the engine take the copying caches instead
        assert isinstance(generator.model.cache(1, CAPACITY), CopyingCache)
        assert not generator.model.ragged
        return
    prompt = PROMPTS[1]
    reference = _decode(generator, generator.model.copying_cache(1), prompt)
    if kind in CACHES:
        got = _decode(generator, CACHES[kind](generator), prompt)
    else:
        cache, prefilled = JOINED[kind](generator, prompt)
        got = _decode(generator, cache, prompt, prefilled)
    assert [int(a.argmax()) for a in got] == [int(b.argmax()) for b in reference]
    np.testing.assert_allclose(np.array(got), np.array(reference), rtol=0, atol=1e-4)


def test_validation_and_the_generator_run_the_same_step(
        generator: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """kv.greedy is what export validation decodes with: it must go through DecoderModel.step
    on the cache the Generator picks, and decode the Generator's tokens."""
    calls: list[tuple[str, type]] = []
    step = DecoderModel.step

    def spied(self: DecoderModel, *args: Any, **kwargs: Any) -> np.ndarray:
        calls.append((caller, type(args[3])))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(DecoderModel, "step", spied)
    caller = "generator"
    want = generator.generate(PROMPTS[0], max_new_tokens=STEPS, ignore_eos=True).token_ids
    caller = "validation"
    got = kv.greedy(generator.model, [PROMPTS[0]], STEPS)[0]
    assert got == want
    by_caller = {who: {kind for w, kind in calls if w == who} for who in ("generator",
                                                                          "validation")}
    expected = InPlaceCache if generator.shared_kv else CopyingCache
    assert by_caller == {"generator": {expected}, "validation": {expected}}
    assert sum(w == "validation" for w, _ in calls) == STEPS


def test_a_step_the_graph_cannot_take_is_a_graph_error(generator: Generator) -> None:
    """run_with_iobinding raises a bare RuntimeError where run raises ONNX Runtime's typed
    errors; the step names it, so export validation records a failed case (a ValidationError)
    rather than crashing on a graph that runs on the example's shapes only."""
    from llmopt.exporter.validate import graph_errors

    ids = np.array([PROMPTS[0]])
    cache = generator.model.copying_cache(1)
    wrong_positions = np.zeros((2, ids.shape[1] + 3), np.int64)  # batch and length both off
    with pytest.raises(kv.GraphRunError) as info:
        generator.model.step(ids, np.ones_like(ids), wrong_positions, cache)
    assert isinstance(info.value, graph_errors())


def test_a_binding_keeps_the_memory_its_logits_are_written_to(generator: Generator) -> None:
    """An in-place cache's binding outlives each step's logits array: the binding holds the
    last one, so running it again (as a caller holding the cache may) writes to live memory."""
    import gc

    model = generator.model
    cache = model.cache(1, CAPACITY)
    if not cache.in_place:
        pytest.skip("a copying cache binds afresh each step (the unfused graph)")
    ids = np.array([PROMPTS[0]])
    model.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], cache)
    length = ids.shape[1]
    logits = model.step(np.array([[4]]), np.ones((1, length + 1), np.int64),
                        np.array([[length]]), cache, prompt=False).copy()
    gc.collect()
    binding = cache.binding(False, model.session)
    model.session.run_with_iobinding(binding)  # the same inputs, written over the same output
    assert np.array_equal(binding._llmopt_inputs.bound, logits)


def test_steps_of_one_shape_write_into_what_the_binding_holds(generator: Generator) -> None:
    """An in-place cache keeps its binding: a decode step writes its token and position into
    the arrays already bound and its logits into the same array (kv.StepInputs); a step of
    another shape (a draft's) binds its own, and the next one-token step still reads its own
    token."""
    model = generator.model
    cache = model.cache(1, CAPACITY)
    if not cache.in_place:
        pytest.skip("a copying cache binds afresh each step (the unfused graph)")
    ids = np.array([PROMPTS[0]])
    n = ids.shape[1]
    model.step(ids, np.ones_like(ids), np.arange(n)[None], cache)
    inputs = cache.binding(False, model.session)._llmopt_inputs

    def step(tokens: list[int], length: int) -> np.ndarray:
        run = len(tokens)
        return model.step(np.array([tokens]), np.ones((1, length + run), np.int64),
                          np.arange(length, length + run)[None], cache,
                          all_logits=run > 1, prompt=False)

    first = step([4], n)
    bound = dict(inputs.arrays)
    second = step([5], n + 1)
    assert second is first and all(inputs.arrays[k] is v for k, v in bound.items())
    assert int(inputs.arrays["input_ids"][0, 0]) == 5
    expected = second.copy()
    drafted = step([6, 7], n + 2)
    assert drafted.shape[1] == 2 and inputs.arrays["input_ids"].shape == (1, 2)
    again = step([5], n + 1)  # position n + 1 rewritten: the second step's logits again
    np.testing.assert_array_equal(again, expected)


def test_inputs_for_a_gpu_session_are_bound_again_each_step() -> None:
    """ONNX Runtime copies a host array bound for a GPU's nodes when it is bound, so writing
    into the bound array would not reach the next run: off the host, each step binds afresh."""
    class Recording:
        def __init__(self) -> None:
            self.bound: list[np.ndarray] = []

        def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
            self.bound.append(array)

    for on_host, binds in ((True, 1), (False, 2)):
        binding, inputs = Recording(), kv.StepInputs(on_host)
        inputs.feed(binding, "input_ids", np.array([[3]]))
        inputs.feed(binding, "input_ids", np.array([[4]]))
        assert len(binding.bound) == binds and int(binding.bound[-1][0, 0]) == 4


def test_slot_joins_and_leaves_write_their_own_slots(generator: Generator,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if not generator.shared_kv:  # the engine keeps past-sized rows instead (PastRows)
        assert not generator.model.ragged
        return
    layout = generator.model.layout
    copier = SlotCopier(layout, generator.placement)
    store = SlotCache(generator.session, layout, 4, CAPACITY, generator.placement, copier)
    written: list[tuple[int, int]] = []  # (first slot, rows) of every copy's destination
    copy = copier.copy

    def recording(sources: Any, start: int, stop: int, destinations: Any, before: int) -> None:
        pointer, shape = destinations[0]
        slot_bytes = int(np.prod(layout.shape(1, CAPACITY))) * layout.dtype.itemsize
        written.append(((pointer - store.buffers[0].data_ptr()) // slot_bytes, shape[0]))
        copy(sources, start, stop, destinations, before)

    monkeypatch.setattr(copier, "copy", recording)
    caches = []
    for prompt in (*PROMPTS, PROMPTS[0][:3]):
        prefill = generator.model.copying_cache(1)
        ids = np.array([prompt])
        generator.model.step(ids, np.ones_like(ids), np.arange(len(prompt))[None], prefill)
        caches.append(prefill.arrays())
        store.join(prefill.past, 0)
    assert written == [(0, 1), (1, 1), (2, 1)] and store.rows == 3
    pointers = [b.data_ptr() for b in store.buffers]
    store.leave(0)  # the last row (slot 2) moves into slot 0
    assert written[-1] == (0, 1) and store.rows == 2
    store.leave(1)  # the last row leaves: nothing moves
    assert len(written) == 4 and store.rows == 1
    assert [b.data_ptr() for b in store.buffers] == pointers  # nothing reallocated
    length = len(PROMPTS[0][:3])
    for got, want in zip(store.arrays(length), caches[2], strict=True):
        np.testing.assert_array_equal(got, want)
    grown = store.moved(8, 2 * CAPACITY, 0, length, 0)  # a regrowth keeps every row
    assert (grown.slots, grown.capacity, grown.rows) == (8, 2 * CAPACITY, 1)
    for got, want in zip(grown.arrays(length), caches[2], strict=True):
        np.testing.assert_array_equal(got, want)
    too_many = ort.OrtValue.ortvalue_from_numpy(np.zeros(layout.shape(8, 1), layout.dtype))
    with pytest.raises(ValueError, match="do not fit"):
        grown.join([too_many] * len(layout.past_names), 0)


@pytest.mark.parametrize(("active", "device_id", "expected"), [
    (["cuda", "cpu"], 3, KVPlacement("cuda", 3)),
    (["tensorrt", "cuda", "cpu"], 1, KVPlacement("cuda", 1)),
    (["cpu"], 2, KVPlacement("cpu", 0)),
    ([], 0, KVPlacement("cpu", 0)),
])
def test_the_cache_lives_on_the_sessions_device(active: list[str], device_id: int,
                                                expected: KVPlacement) -> None:
    placement = KVPlacement.of(SessionInfo(active, active, False, device_id=device_id))
    assert placement == expected
    assert placement.on_host == (expected.device == "cpu")


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    """A fused mistral (sliding_window=8): a shared buffer, but not ragged."""
    root = tmp_path_factory.mktemp("mistral")
    source = tiny_decoders.build("mistral", root / "source")
    runner = llmopt.load(optimize(export(source, root / "package"), root / "optimized").path)
    assert isinstance(runner, Generator)
    return runner


def test_a_sliding_window_graph_is_not_ragged(windowed: Generator) -> None:
    """Its bias places the window from the batch's width, not each row's length: the engine
    must keep such rows in batches of equal length."""
    assert windowed.shared_kv and not windowed.model.ragged


@pytest.mark.parametrize("invariant", [True, False])
def test_left_padded_slots_join_shift_and_trim(windowed: Generator, invariant: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The slot store of a graph that is not ragged: batches of equal lengths, or (shared mode)
    one batch whose rows are left-padded, shifted when a longer row joins and trimmed when
    the longest leaves. Every answer equals the request's alone."""
    moves: list[tuple[int, int]] = []  # (start, before) of every whole-batch move
    moved = SlotCache.moved

    def recording(self: SlotCache, slots: int, capacity: int, start: int, stop: int,
                  before: int) -> SlotCache:
        moves.append((start, before))
        return moved(self, slots, capacity, start, stop, before)

    monkeypatch.setattr(SlotCache, "moved", recording)
    # a one-token prompt decodes alone; then the longest prompt joins (wider than the batch:
    # the rows there shift right in shared mode) and leaves first (its columns are trimmed)
    short, long = PROMPTS_TEXT[3], PROMPTS_TEXT[5]
    plan = [(short, SamplingParams(max_new_tokens=20, ignore_eos=True)),
            (long, SamplingParams(max_new_tokens=3, ignore_eos=True)),
            (PROMPTS_TEXT[0], SamplingParams(max_new_tokens=8, ignore_eos=True))]
    singles = [windowed.generate(p, q).token_ids for p, q in plan]
    config = EngineConfig(max_batch_size=4, max_prefill_batch=2, batch_invariant=invariant)
    engine = Engine(windowed, config)
    engine.on_step = lambda record: time.sleep(0.005)  # the short row still decodes when the
    engine.start()                                     # long one joins, however fast this CPU
    try:
        requests = []
        for prompt, p in plan:
            requests.append(engine.submit(prompt, p))
            deadline = time.monotonic() + 30
            while not requests[0].state.generated and time.monotonic() < deadline:
                time.sleep(0.001)  # the next joins once the first is decoding
        got = [r.result(timeout=60).token_ids for r in requests]
    finally:
        engine.close()
    assert got == singles
    if invariant:
        assert all(before == 0 and start == 0 for start, before in moves)  # regrowth only
    else:
        assert any(before > 0 for _, before in moves)  # the longer prompt joined
        assert any(start > 0 for start, _ in moves)  # and left: its padding columns went
