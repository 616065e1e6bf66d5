"""An int4 package on CPU runs its prompts on a second session whose 4-bit MatMuls compute in
float32 (llmopt.runtime.prompt_graph), on the same cache as the decode session."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import llmopt
from llmopt.exporter import export
from llmopt.optimizer import optimize
from llmopt.package import INT8_COMPUTE
from llmopt.quantizer import QuantizeOptions, quantize
from llmopt.runtime import CPUOptions, float_prompt_graph, prompt_session_options
from llmopt.runtime.engine import Engine, EngineConfig
from llmopt.runtime.generator import Generator
from llmopt.runtime.kv import left_pad, position_ids
from llmopt.runtime.prompt_graph import FLOAT_COMPUTE, prompt_model
from llmopt.runtime.sampling import SamplingParams
from tests import tiny_decoders

PROMPT = [5, 9, 13, 2, 44, 7, 31, 8]


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompt_session")
    fused = optimize(export(tiny_decoders.build("llama", root / "source", hidden_size=64,
                                                intermediate_size=128),
                            root / "package"), root / "fused")
    int4 = quantize(fused, root / "int4", QuantizeOptions.int4().with_(evaluate=False))
    return {"fused": fused.path, "int4": int4.path}


def load(path: Path, **cpu: Any) -> Generator:
    """The package on CPU; the prompt session forced on (its default is measured: see
    test_the_default_follows_the_faster_kernel) unless ``cpu`` says."""
    cpu = {"float_prompts": True, **cpu}
    runner = llmopt.load(path, provider_options={"cpu": CPUOptions(arena=False, **cpu)})
    assert isinstance(runner, Generator)
    return runner


def test_the_prompt_graph_changes_only_the_4bit_kernels_compute(packages: dict[str, Path]
                                                                 ) -> None:
    path = packages["int4"] / "model.onnx"
    graph = prompt_model(path)
    assert graph is not None
    shipped = onnx.load(str(path))
    variant = onnx.load_from_string(graph.model)
    assert [n.op_type for n in variant.graph.node] == [n.op_type for n in shipped.graph.node]
    levels = []
    for before, after in zip(shipped.graph.node, variant.graph.node, strict=True):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in before.attribute}
        changed = {a.name: onnx.helper.get_attribute_value(a) for a in after.attribute}
        if before.op_type == "MatMulNBits" and attrs["bits"] == 4:
            levels.append((attrs.pop("accuracy_level"), changed.pop("accuracy_level")))
        assert attrs == changed and list(before.input) == list(after.input)
    assert levels and set(levels) == {(INT8_COMPUTE, FLOAT_COMPUTE)}
    # the embedding table is held once for both sessions: a map of the weights file
    embedding = next(n.input[0] for n in shipped.graph.node if n.op_type == "Gather"
                     and n.input[0].endswith("embed.weight"))
    assert set(graph.shared) == {embedding}
    assert isinstance(graph.shared[embedding], np.memmap)
    stored = next(t for t in shipped.graph.initializer if t.name == embedding)
    np.testing.assert_array_equal(graph.shared[embedding], onnx.numpy_helper.to_array(stored))
    assert prompt_model(packages["fused"] / "model.onnx") is None


def test_int4_packages_keep_their_weights_beside_the_graph(packages: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """So the prompt session opens the graph without its weights; a package whose weights sit
    inside model.onnx (quantized by an earlier llmopt) runs on one session, as it did."""
    package = llmopt.Package.open(packages["int4"])
    assert package.manifest.onnx["external_data"] == "model.onnx.data"
    assert (packages["int4"] / "model.onnx.data").is_file()
    inside = tmp_path / "inside"
    shutil.copytree(packages["int4"], inside)
    onnx.save_model(onnx.load(str(inside / "model.onnx")), str(inside / "model.onnx"))
    assert prompt_model(inside / "model.onnx") is None


def test_only_int4_on_cpu_gets_a_prompt_session(packages: dict[str, Path]) -> None:
    assert load(packages["int4"]).model.prompt_session is not None
    assert load(packages["int4"], float_prompts=False).model.prompt_session is None
    assert load(packages["fused"]).model.prompt_session is None


class Recording:
    """A session that notes which of the two ran each step."""

    def __init__(self, session: Any, name: str, log: list[str]) -> None:
        self.session, self.name, self.log = session, name, log

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.session, attribute)

    def run_with_iobinding(self, binding: Any) -> None:
        self.log.append(self.name)
        self.session.run_with_iobinding(binding)


def recorded(runner: Generator) -> list[str]:
    log: list[str] = []
    model = runner.model
    model.session = Recording(model.session, "decode", log)
    model.prompt_session = Recording(model.prompt_session, "prompt", log)
    return log


def test_prompts_run_on_the_prompt_session_and_tokens_on_the_decode_session(
        packages: dict[str, Path]) -> None:
    runner = load(packages["int4"])
    log = recorded(runner)
    runner.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
    assert log == ["prompt", "decode", "decode", "decode"]
    # the engine prefills in chunks; a one-token last chunk is still part of the prompt
    log.clear()
    engine = Engine(runner, EngineConfig(prefill_chunk=7)).start()
    try:
        engine.submit(PROMPT, SamplingParams(max_new_tokens=3, ignore_eos=True)).result(60)
    finally:
        engine.close()
    assert log[:2] == ["prompt", "prompt"] and set(log[2:]) == {"decode"}
    # scoring (perplexity, llmopt eval) measures the kernels decoding runs
    log.clear()
    ids, mask = left_pad([PROMPT])
    runner.model.forward(ids, mask, position_ids(mask), runner.model.empty_past(1))
    assert log == ["decode"]


def test_float_prompts_compute_what_the_int8_kernel_approximates(packages: dict[str, Path]
                                                                  ) -> None:
    """Same weights, other activation rounding: the prompt's logits agree with the int8-compute
    session's to within its rounding, and decoding continues on the cache the prompt wrote."""
    fast, plain = load(packages["int4"]), load(packages["int4"], float_prompts=False)
    ids, mask = left_pad([PROMPT])
    got = []
    for runner in (fast, plain):
        cache = runner.model.cache(1, len(PROMPT) + 2)
        # a copy: without a prompt session, the next step writes into the same logits array
        first = runner.model.step(ids, mask, position_ids(mask), cache, prompt=True).copy()
        mask2 = np.ones((1, len(PROMPT) + 1), np.int64)
        second = runner.model.step(np.array([[3]]), mask2, np.array([[len(PROMPT)]]), cache)
        got.append((first, second))
    scale = float(np.abs(got[1][0]).max())
    for a, b in zip(got[0], got[1], strict=True):
        assert a.shape == b.shape and np.isfinite(a).all()
        assert float(np.abs(a - b).max()) < 0.05 * scale
    assert not np.array_equal(got[0][0], got[1][0])  # the prompt did run other kernels


def test_no_prompt_graph_is_read_for_a_gpu_session(packages: dict[str, Path]) -> None:
    """GPU sessions run prompts on their own kernels: the graph is not even read (a GPU need
    not exist for this: the decision comes from the providers asked for)."""
    package = llmopt.Package.open(packages["int4"])

    def graph(providers: list[Any]) -> Any:
        return float_prompt_graph(package, prompt_session_options(providers, None))

    assert graph([("cpu", CPUOptions(float_prompts=True))]) is not None
    assert prompt_session_options(["cpu"], None) == CPUOptions(spin=False)
    assert graph(["cuda", "cpu"]) is None
    assert graph([("cpu", CPUOptions(float_prompts=False))]) is None


@pytest.mark.parametrize(("float_s", "int8_s", "second_session"), [
    (1.0, 1.5, True),    # the float32 kernel clearly faster (Sapphire Rapids measured so)
    (1.0, 1.05, False),  # within the margin: not worth a second session's memory
    (1.4, 1.0, False),   # the int8-compute kernel faster (Zen 4 measured so)
])
def test_the_default_follows_the_faster_kernel(packages: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch, float_s: float,
                                               int8_s: float, second_session: bool) -> None:
    from llmopt.runtime import prompt_graph

    asked: list[int | None] = []

    def timings(threads: int | None) -> dict[int, float]:
        asked.append(threads)
        return {FLOAT_COMPUTE: float_s, INT8_COMPUTE: int8_s}

    monkeypatch.setattr(prompt_graph, "kernel_timings", timings)
    # on ONNX Runtime's kernels only: with llmopt's (test_kernels_take_the_prompts) no probe
    runner = load(packages["int4"], float_prompts=None, intra_op_threads=1, kernels=False)
    assert (runner.model.prompt_session is not None) == second_session
    assert asked == [1]  # timed on the session's own thread count
    asked.clear()
    load(packages["fused"], float_prompts=None, kernels=False)  # nothing to choose: not timed
    load(packages["int4"], float_prompts=False)
    load(packages["int4"], float_prompts=True)
    assert asked == []


def test_kernels_take_the_prompts(packages: dict[str, Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """llmopt's MatMulQ runs prompts faster than either of ONNX Runtime's 4-bit kernels: by
    default no second session and no probe; float_prompts=True still asks for one."""
    from llmopt.runtime import kernels, prompt_graph

    if kernels.library() is None:
        pytest.skip(f"llmopt's CPU kernels: {kernels.unavailable()}")
    monkeypatch.setattr(prompt_graph, "kernel_timings", lambda threads: pytest.fail("probed"))
    runner = load(packages["int4"], float_prompts=None)
    assert runner.session_info.kernels > 0 and runner.model.prompt_session is None
    assert load(packages["int4"], float_prompts=True).model.prompt_session is not None


def test_the_kernel_probe_times_both_compute_types_once_per_process() -> None:
    from llmopt.runtime.prompt_graph import kernel_timings

    first = kernel_timings(1)
    assert set(first) == {FLOAT_COMPUTE, INT8_COMPUTE}
    assert all(0 < seconds < 1 for seconds in first.values()), first
    assert kernel_timings(1) is first  # cached: a second load costs nothing
