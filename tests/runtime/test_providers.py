"""Provider names, options and fallback: the configuration ONNX Runtime is given."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import llmopt
from llmopt.runtime import providers as P
from llmopt.runtime.session import create_session, resolve_providers

SIGNATURE = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
        {"name": "past_key_values.0.key", "dtype": "float32",
         "shape": ["batch", 2, "past_sequence", 16]},
        {"name": "fixed", "dtype": "float32", "shape": [1, 4]},
    ]
}


@pytest.mark.parametrize("name, short", [
    ("cpu", "cpu"), ("CPU", "cpu"), ("CPUExecutionProvider", "cpu"), ("cuda", "cuda"),
    ("GPU", "cuda"), ("TensorRT", "tensorrt"), ("trt", "tensorrt"),
    ("TensorrtExecutionProvider", "tensorrt"),
])
def test_names_match_case_insensitively_with_aliases(name: str, short: str) -> None:
    assert P.canonical(name) == short


def test_unknown_provider_lists_known_and_installed() -> None:
    with pytest.raises(llmopt.ProviderError) as info:
        P.canonical("warp-drive")
    message = str(info.value)
    assert "warp-drive" in message and "tensorrt, cuda, cpu" in message
    assert "installed here: " in message and "cpu" in message.split("installed here: ")[1]


def test_provider_not_in_this_build_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "available", lambda: ["cpu"])
    with pytest.raises(llmopt.ProviderError, match="not installed") as info:
        resolve_providers(["cuda"])
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]'" in str(info.value)


def test_cpu_is_appended_as_the_last_resort() -> None:
    resolved = resolve_providers(["cuda"], {"cuda": {"device_id": 1}})
    assert [name for name, _ in resolved] == ["cuda", "cpu"]
    assert resolved[0][1] == P.CUDAOptions(device_id=1)


def test_cuda_options_dict() -> None:
    options = P.CUDAOptions(device_id=2, memory_limit=2**30, arena_strategy="kSameAsRequested",
                            tf32=False).provider_options()
    assert options == {
        "device_id": "2", "gpu_mem_limit": str(2**30), "arena_extend_strategy":
        "kSameAsRequested", "enable_cuda_graph": "False", "use_tf32": "False",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
    }


def test_tensorrt_options_profile_and_caches(tmp_path: Path) -> None:
    trt = P.TensorRTOptions(fp16=True, cache_dir=str(tmp_path), builder_optimization_level=5,
                            shape_ranges={"batch": P.ShapeRange(1, 2, 4)})
    profile = P.tensorrt_profile(SIGNATURE, trt.shape_ranges)
    assert profile["trt_profile_min_shapes"] == (
        "input_ids:1x1,attention_mask:1x1,past_key_values.0.key:1x2x0x16")
    assert profile["trt_profile_opt_shapes"] == (
        "input_ids:2x128,attention_mask:2x256,past_key_values.0.key:2x2x128x16")
    assert profile["trt_profile_max_shapes"] == (
        "input_ids:4x2048,attention_mask:4x4096,past_key_values.0.key:4x2x2048x16")
    options = trt.provider_options(profile, cache_key="k1")
    assert options["trt_fp16_enable"] == "True"
    assert options["trt_builder_optimization_level"] == "5"
    assert options["trt_engine_cache_path"] == str(tmp_path / "k1")
    assert options["trt_timing_cache_path"] == str(tmp_path / "k1")
    assert options["trt_engine_cache_enable"] == "True"


def test_tensorrt_cache_key_changes_with_everything_that_makes_an_engine_stale() -> None:
    trt = P.TensorRTOptions()
    profile = P.tensorrt_profile(SIGNATURE, {})
    env = P.BuildEnvironment(gpu="H100", onnxruntime="1.31.1", cuda="13.0", tensorrt="10.13")

    def key(model: str = "model-a", profile: dict[str, str] = profile,
            options: P.TensorRTOptions = trt, **changes: str) -> str:
        return P.tensorrt_cache_key(model, profile, options, replace(env, **changes))

    base = key()
    assert base == key()
    changed = [
        key("model-b"), key(gpu="A100"), key(tensorrt="10.14"), key(onnxruntime="1.32.0"),
        key(cuda="12.8"),
        key(profile=P.tensorrt_profile(SIGNATURE, {"batch": P.ShapeRange(1, 1, 16)})),
        key(options=P.TensorRTOptions(fp16=True)),
        key(options=P.TensorRTOptions(max_workspace_size=2**30)),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


@pytest.mark.parametrize("make", [
    lambda: P.CPUOptions(intra_op_threads=-1),
    lambda: P.CUDAOptions(device_id=-1),
    lambda: P.CUDAOptions(arena_strategy="greedy"),
    lambda: P.TensorRTOptions(builder_optimization_level=9),
    lambda: P.ShapeRange(4, 2, 8),
])
def test_bad_options_are_rejected(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(llmopt.InvalidInputError):
        make()


def test_unknown_option_name_lists_the_valid_ones() -> None:
    with pytest.raises(llmopt.ProviderError, match="valid options: device_id"):
        resolve_providers(["cuda"], {"cuda": {"device": 0}})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    path = tmp_path_factory.mktemp("m") / "relu.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    del np
    return path


def test_cpu_session_reports_cpu(tiny_model: Path) -> None:
    session, info = create_session(tiny_model, ["cpu"], {"cpu": {"intra_op_threads": 1}})
    assert info.active == ["cpu"] and not info.fallback and info.reason is None
    assert session.get_providers() == ["CPUExecutionProvider"]


def _gpu_usable() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is present: CUDA loads, so nothing falls back")
@pytest.mark.skipif("cuda" not in P.available(), reason="this onnxruntime has no CUDA provider")
def test_gpu_fallback_is_reported_and_strict_refuses_it(tiny_model: Path) -> None:
    _, info = create_session(tiny_model, ["cuda"])
    assert info.fallback and info.active[0] == "cpu"
    assert "cuda was requested" in (info.reason or "")
    with pytest.raises(llmopt.ProviderError, match="strict"):
        create_session(tiny_model, ["cuda"], strict=True)


@pytest.mark.gpu
def test_cuda_holds_the_session_on_a_gpu_machine(tiny_model: Path) -> None:
    _, info = create_session(tiny_model, ["cuda"], strict=True)
    assert info.active[0] == "cuda" and not info.fallback


@pytest.mark.tensorrt
def test_tensorrt_builds_an_engine_into_the_keyed_cache(tiny_model: Path, tmp_path: Path) -> None:
    import numpy as np

    session, info = create_session(tiny_model, [("tensorrt", {"cache_dir": str(tmp_path)})],
                                   strict=True, signature={"inputs": [
                                       {"name": "x", "dtype": "float32", "shape": ["n"]}]})
    session.run(None, {"x": np.ones(4, np.float32)})
    assert info.active[0] == "tensorrt"
    assert any(tmp_path.rglob("*.engine"))


class _Recorded:
    """Session options that note the config entries set on them."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}
        self.intra_op_num_threads = self.inter_op_num_threads = 0
        self.enable_cpu_mem_arena = True

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value


def test_cpu_threads_stop_spinning_when_a_run_ends_unless_asked() -> None:
    """A spinning session's threads kept the cores after its run: an embedding right after
    another model's decode took 48.5 ms instead of 17.5 (bench/results/spin_stop.md)."""
    default, kept = _Recorded(), _Recorded()
    P.CPUOptions().apply(default)
    P.CPUOptions(stop_spinning=False, spin=True).apply(kept)
    assert default.entries == {"session.force_spinning_stop": "1"}
    assert kept.entries == {"session.intra_op.allow_spinning": "1",
                            "session.inter_op.allow_spinning": "1"}


def test_onnx_runtime_takes_the_stop_spinning_entry(tiny_model: Path) -> None:
    """The key is one this ONNX Runtime reads: a session with it opens and runs."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    P.CPUOptions(intra_op_threads=2).apply(options)
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    session = ort.InferenceSession(str(tiny_model), options, providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]
