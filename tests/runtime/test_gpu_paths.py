"""The GPU paths of issue #12, checked on CPU: what ONNX Runtime is given for cuda/tensorrt,
where nodes land, which device every KV binding names, and the float16 CUDA graph.

None of these ran on a GPU here; the ``gpu``/``tensorrt`` tests at the end (and
``llmopt doctor --gpu``) are the ones that do, where the hardware exists.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import llmopt
from llmopt.cli import cmd_generate, cmd_serve
from llmopt.cli._providers import provider_options
from llmopt.exporter import export
from llmopt.exporter.decoder_graph import mask_min
from llmopt.manifest import Manifest
from llmopt.optimizer import OptimizeOptions, optimize
from llmopt.package import Package
from llmopt.runtime import providers as P
from llmopt.runtime import warn_cpu_bound_quantization
from llmopt.runtime.generator import Generator
from llmopt.runtime.placement import Placement
from llmopt.runtime.session import (
    SessionInfo,
    check_placement,
    create_session,
    provider_dict,
    resolve_providers,
)
from llmopt.server.config import ModelConfig
from tests import tiny_decoders

SIGNATURE = {"inputs": [
    {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
    {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
    {"name": "past_key_values.0.key", "dtype": "float16",
     "shape": ["batch", 2, "past_sequence", 16]},
    {"name": "logits_to_keep", "dtype": "int64", "shape": []},
]}
needs_cuda_build = pytest.mark.skipif("cuda" not in P.available(),
                                      reason="this onnxruntime has no CUDA provider")


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-paths")
    fp32 = export(tiny_decoders.build("llama", root / "source"), root / "fp32")
    cuda = optimize(fp32, root / "cuda", OptimizeOptions.for_cuda())
    return {"fp32": fp32.path, "cuda": cuda.path}


# -- 1, 4: TensorRT shape profile ---------------------------------------------------------------

def test_profile_gives_logits_to_keep_values_and_follows_the_context() -> None:
    profile = P.tensorrt_profile(SIGNATURE, {}, context_length=4096)
    assert profile["trt_profile_min_shapes"].endswith(",logits_to_keep:0")
    assert profile["trt_profile_opt_shapes"].endswith(",logits_to_keep:1")
    assert profile["trt_profile_max_shapes"] == (
        "input_ids:8x4096,attention_mask:8x4096,past_key_values.0.key:8x2x4096x16,"
        "logits_to_keep:1")


def test_profile_overrides_win_over_the_context() -> None:
    profile = P.tensorrt_profile(SIGNATURE, {"past_sequence": P.ShapeRange(0, 64, 512),
                                             "sequence": P.ShapeRange(1, 16, 512),
                                             "logits_to_keep": P.ShapeRange(1, 1, 1)},
                                 context_length=32768)
    assert profile["trt_profile_max_shapes"] == (
        "input_ids:8x512,attention_mask:8x1024,past_key_values.0.key:8x2x512x16,"
        "logits_to_keep:1")
    assert profile["trt_profile_min_shapes"].endswith("logits_to_keep:1")


def test_load_sizes_the_profile_from_the_package(packages: dict[str, Path]) -> None:
    package = Package.open(packages["cuda"])
    context = package.manifest["generation"]["context_length"]
    given = provider_dict(P.TensorRTOptions(), package.manifest["signature"], "m", context)
    assert f"input_ids:8x{context}" in given["trt_profile_max_shapes"]
    assert "logits_to_keep:0" in given["trt_profile_min_shapes"]


# -- 2: provider order and node placement ---------------------------------------------------------

@needs_cuda_build
def test_cuda_is_registered_after_tensorrt_on_the_same_device() -> None:
    resolved = resolve_providers(["tensorrt"], {"tensorrt": {"device_id": 1}})
    assert [name for name, _ in resolved] == ["tensorrt", "cuda", "cpu"]
    assert resolved[1][1] == P.CUDAOptions(device_id=1)
    explicit = resolve_providers(["tensorrt", "cpu", "cuda"])
    assert [name for name, _ in explicit] == ["tensorrt", "cpu", "cuda"]


def _relu_matmul(path: Path) -> Path:
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"], name="relu"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="matmul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_placement_is_read_from_the_real_cpu_session(tmp_path: Path) -> None:
    _, info = create_session(_relu_matmul(tmp_path / "m.onnx"), ["cpu"])
    assert info.placement.ops == {"cpu": {"Relu": 1, "MatMul": 1}}
    assert info.placement.compute_ops_on("cpu") == {"MatMul": 1}
    assert info.as_dict()["placement"] == {"cpu": {"Relu": 1, "MatMul": 1}}


def _assignment(placed: dict[str, list[str]]) -> list[Any]:
    """Subgraphs shaped like ``get_provider_graph_assignment_info()``'s."""
    return [SimpleNamespace(ep_name=ep, get_nodes=lambda ops=ops: [
        SimpleNamespace(op_type=op, name=f"n{i}", domain="") for i, op in enumerate(ops)])
        for ep, ops in placed.items()]


def test_compute_nodes_on_cpu_under_cuda_are_reported_with_their_ops(
        caplog: pytest.LogCaptureFixture) -> None:
    placement = Placement.from_assignment(_assignment({
        "CUDAExecutionProvider": ["MatMul", "GroupQueryAttention"],
        "CPUExecutionProvider": ["Shape", "Gather", "DynamicQuantizeLinear", "MatMulInteger",
                                 "MatMulInteger"],
    }))
    assert placement.compute_ops_on("cpu") == {"DynamicQuantizeLinear": 1, "MatMulInteger": 2}
    info = SessionInfo(["cuda", "cpu"], ["cuda", "cpu"], False, placement=placement)
    with caplog.at_level(logging.WARNING, "llmopt.runtime"):
        check_placement(info, strict=False)
    assert "DynamicQuantizeLinear x1, MatMulInteger x2" in (info.reason or "")
    assert "Shape" not in (info.reason or "") and "partial CPU placement" in caplog.text
    with pytest.raises(llmopt.ProviderError, match="MatMulInteger x2") as raised:
        check_placement(info, strict=True)
    assert "--target cuda" in str(raised.value)


def test_shape_arithmetic_on_cpu_is_not_a_fallback() -> None:
    placement = Placement.from_assignment(_assignment({
        "CUDAExecutionProvider": ["MatMul"], "CPUExecutionProvider": ["Shape", "Squeeze"]}))
    info = SessionInfo(["cuda", "cpu"], ["cuda", "cpu"], False, placement=placement)
    check_placement(info, strict=True)
    assert info.reason is None


# -- 3: TensorRT cache folder and key -------------------------------------------------------------

def test_nested_cache_folder_is_created(tmp_path: Path) -> None:
    cache = tmp_path / "not" / "yet" / "there"
    given = provider_dict(P.TensorRTOptions(cache_dir=str(cache)), SIGNATURE, "m", 256)
    folder = Path(given["trt_engine_cache_path"])
    assert folder.is_dir() and folder.parent == cache
    assert given["trt_timing_cache_path"] == str(folder)


def test_cache_key_reads_the_selected_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {0: "NVIDIA A10", 1: "NVIDIA H100"}
    asked: list[int] = []

    def gpu_name(device_id: int = 0) -> str:
        asked.append(device_id)
        return names[device_id]

    monkeypatch.setattr(P, "gpu_name", gpu_name)
    profile = P.tensorrt_profile(SIGNATURE, {})
    keys = {d: P.tensorrt_cache_key("m", profile, P.TensorRTOptions(device_id=d)) for d in names}
    assert asked == [0, 1] and keys[0] != keys[1]
    env = P.BuildEnvironment.current(1)
    assert env.gpu == "NVIDIA H100" and env.onnxruntime == P.onnxruntime_version()


def test_gpu_name_asks_nvidia_smi_for_the_visible_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import subprocess

    calls: list[list[str]] = []
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or SimpleNamespace(
        stdout="NVIDIA H100, 580.1\n"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert P.gpu_name(1) == "NVIDIA H100, 580.1"
    assert "--id=5" in calls[0]


# -- 5: device_id in every binding ----------------------------------------------------------------

class _RecordingBinding:
    """An IOBinding that records the device each output is bound to, then binds it on CPU."""

    def __init__(self, binding: Any, devices: list[tuple[str, int]]) -> None:
        self._binding = binding
        self._devices = devices

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0,
                    *buffer: Any) -> None:  # buffer: element type, shape, pointer (host logits)
        if name != "logits":
            self._devices.append((device_type, device_id))
        self._binding.bind_output(name, "cpu", 0, *buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._binding, name)


@pytest.mark.parametrize("kind", ["fp32", "cuda"])  # copying cache, in-place cache
def test_device_id_reaches_every_kv_binding_and_allocation(
        packages: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    cpu = llmopt.load(packages[kind], ["cpu"])
    assert isinstance(cpu, Generator)
    want = cpu.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids
    devices: list[tuple[str, int]] = []
    session = SimpleNamespace(io_binding=lambda: _RecordingBinding(cpu.session.io_binding(),
                                                                   devices),
                              run_with_iobinding=cpu.session.run_with_iobinding,
                              get_inputs=cpu.session.get_inputs,
                              get_outputs=cpu.session.get_outputs,
                              get_modelmeta=cpu.session.get_modelmeta)
    from_numpy, from_shape = ort.OrtValue.ortvalue_from_numpy, \
        ort.OrtValue.ortvalue_from_shape_and_type

    def numpy_on(array: Any, device: str = "cpu", device_id: int = 0) -> Any:
        devices.append((device, device_id))
        return from_numpy(array, "cpu", 0)

    def shape_on(shape: Any, dtype: Any, device: str = "cpu", device_id: int = 0) -> Any:
        devices.append((device, device_id))
        return from_shape(shape, dtype, "cpu", 0)

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(numpy_on))
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", staticmethod(shape_on))
    info = SessionInfo(["cuda", "cpu"], ["cuda", "cpu"], False, device_id=3)
    on_gpu3 = Generator(cpu.package, session, info, None)
    result = on_gpu3.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True)
    assert result.token_ids == want
    assert devices and set(devices) == {("cuda", 3)}


# -- 6, 8: the CUDA graph -------------------------------------------------------------------------

def test_target_cuda_is_float16_group_query_attention_with_the_in_place_cache(
        packages: dict[str, Path]) -> None:
    package = Package.open(packages["cuda"])
    ops = {n.op_type for n in onnx.load(str(package.model_path)).graph.node}
    assert "GroupQueryAttention" in ops and "Attention" not in ops
    assert package.manifest["onnx"]["dtype"] == "float16"
    assert package.manifest["kv_cache"]["shared_buffer"] is True
    assert package.manifest["validation"]["passed"]


def test_float16_masks_use_the_float16_lowest_not_minus_infinity(
        packages: dict[str, Path]) -> None:
    assert mask_min(np.float16) == -65504.0
    model = onnx.load(str(Package.open(packages["cuda"]).model_path))
    constants = [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
                 for a in n.attribute if a.name == "value"]
    constants += [numpy_helper.to_array(t) for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT16 and len(t.dims) == 0]
    halves = [c for c in constants if c.dtype == np.float16]
    assert any(c.size == 1 and float(c) == -65504.0 for c in halves)
    assert not any(np.isinf(c).any() for c in halves)


@pytest.mark.parametrize("options", [
    {"target": "gpu"}, {"target": "cuda", "level": 1}, {"target": "cuda", "fp16": False},
    {"target": "cuda", "fusions": ("norm",)},
])
def test_bad_cuda_targets_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(llmopt.InvalidInputError):
        OptimizeOptions(**options)


# -- 9: CUDA graphs -------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: P.CUDAOptions(cuda_graph=True),
                                  lambda: P.TensorRTOptions(cuda_graph=True)])
def test_cuda_graphs_are_refused_with_the_reason(make: Any) -> None:
    with pytest.raises(llmopt.UnsupportedError, match="change shape every step"):
        make()


# -- 10: libraries --------------------------------------------------------------------------------

@needs_cuda_build
def test_gpu_sessions_preload_the_pip_cuda_libraries(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    calls: list[int] = []
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append(1), raising=False)
    model = _relu_matmul(tmp_path / "m.onnx")
    create_session(model, ["cpu"])
    assert calls == []
    create_session(model, ["cuda"])
    assert calls == [1]


def test_tensorrt_hint_pins_the_major_onnxruntime_links() -> None:
    assert "tensorrt-cu13>=10.13,<11" in P.INSTALL_HINTS["tensorrt"]


# -- 11: int8 dynamic on a GPU --------------------------------------------------------------------

def test_int8_dynamic_on_a_gpu_names_the_better_preset(caplog: pytest.LogCaptureFixture) -> None:
    def package(method: str) -> Any:
        return SimpleNamespace(path="pkg", manifest=Manifest({"steps": [
            {"stage": "export"}, {"stage": "quantize", "method": method}]}))

    with caplog.at_level(logging.WARNING, "llmopt.runtime"):
        warn_cpu_bound_quantization(package("int4"), "cuda")
        assert caplog.text == ""
        warn_cpu_bound_quantization(package("int8_dynamic"), "cuda")
    assert "run on CPU" in caplog.text and "--method int4" in caplog.text


# -- 12: CLI flags and the serve config -----------------------------------------------------------

def _parse(module: Any, argv: list[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_generate_flags_become_provider_options(tmp_path: Path) -> None:
    args = _parse(cmd_generate, ["generate", "pkg", "hi", "--provider", "tensorrt",
                                 "--device-id", "1", "--trt-cache-dir", str(tmp_path),
                                 "--trt-precision", "fp16"])
    options = provider_options(args)
    assert options == {"cuda": {"device_id": 1}, "tensorrt": {
        "device_id": 1, "cache_dir": str(tmp_path), "precision": "fp16"}}
    if "tensorrt" in P.available():
        trt = dict(resolve_providers(args.providers, options))["tensorrt"]
        assert trt == P.TensorRTOptions(device_id=1, fp16=True, cache_dir=str(tmp_path))
    assert provider_options(_parse(cmd_generate, ["generate", "pkg", "hi"])) == {}


def test_serve_flags_set_every_models_defaults() -> None:
    args = _parse(cmd_serve, ["serve", "--model-repository", "r", "--provider", "cuda",
                              "--device-id", "2", "--strict-providers"])
    assert args.providers == ["cuda"] and provider_options(args)["cuda"] == {"device_id": 2}


def test_serve_config_takes_a_tensorrt_precision() -> None:
    config = ModelConfig.from_dict({"providers": ["tensorrt"], "provider_options": {
        "tensorrt": {"precision": "int8", "cache_dir": "/tmp/x"}}})
    if "tensorrt" in P.available():
        trt = dict(resolve_providers(config.providers, config.provider_options))["tensorrt"]
        assert isinstance(trt, P.TensorRTOptions) and trt.int8 and not trt.fp16
    with pytest.raises(llmopt.InvalidInputError, match="fp32, fp16, int8"):
        P.TensorRTOptions.with_precision("fp8")


# -- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_package_runs_entirely_on_the_gpu(packages: dict[str, Path]) -> None:
    runner = llmopt.load(packages["cuda"], ["cuda"], strict=True)
    assert isinstance(runner, Generator) and runner.device == "cuda"
    assert not runner.session_info.placement.compute_ops_on("cpu")
    reference = llmopt.load(packages["fp32"], ["cpu"])
    got = runner.generate([5, 6, 7], max_new_tokens=8, ignore_eos=True).token_ids
    want = reference.generate([5, 6, 7], max_new_tokens=8, ignore_eos=True)  # type: ignore[union-attr]
    assert len(got) == len(want.token_ids) == 8


@pytest.mark.gpu
def test_the_engine_reuses_a_cached_prefix_on_the_gpu(packages: dict[str, Path]) -> None:
    """The prefix cache's copies run through the device: a slot of the GPU store read out, a
    host prefix bound under a GPU prefill. (Float16 on a GPU: the same numbers up to rounding,
    so only the reuse is asserted, not token equality.)"""
    from llmopt.runtime.engine import Engine
    from llmopt.runtime.sampling import SamplingParams

    runner = llmopt.load(packages["cuda"], ["cuda"], strict=True)
    assert isinstance(runner, Generator) and runner.prefix_cache_bytes == 0  # host caches only
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = Engine(runner).start()
    try:
        prompt = list(range(5, 45))
        first = engine.submit(prompt, params).result(120)
        second = engine.submit(prompt + first.token_ids + [9, 10], params).result(120)
    finally:
        engine.close()
    assert second.stats.cached_prompt_tokens == len(prompt) + len(first.token_ids) - 1
    assert len(second.token_ids) == 6


@pytest.mark.tensorrt
def test_tensorrt_loads_a_decoder_with_its_shape_tensor(packages: dict[str, Path],
                                                        tmp_path: Path) -> None:
    runner = llmopt.load(packages["cuda"], ["tensorrt"], strict=True, provider_options={
        "tensorrt": {"cache_dir": str(tmp_path / "a" / "b"), "precision": "fp16"}})
    assert runner.session_info.active[0] == "tensorrt"
    assert any((tmp_path / "a" / "b").rglob("*.engine"))
