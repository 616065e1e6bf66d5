"""``llmopt doctor``: one command that proves a machine runs llmopt's whole path, offline.

It builds tiny random models locally (a Llama-shaped decoder with a 4,096-token context and a
BERT-shaped encoder; no network, no tokenizer), then exports, optimizes (``--target cuda``:
float16 GroupQueryAttention), quantizes int4, loads each package with ``strict=True`` on the
providers under test, and checks what the GPU paths promise:

- where ONNX Runtime placed the nodes (no compute node on CPU under a GPU provider);
- greedy tokens equal CPU's and logits within tolerance (exact for float32, loose for float16);
- the in-place KV cache lives on the session's device after a step;
- TensorRT's profile covers ``logits_to_keep`` and the package's context, and its engine cache
  lands in a not-yet-existing nested folder (with ``--gpu``: built, then reloaded from it);
- generation runs past 2,100 tokens (beyond the old 2,048 profile maxima);
- ``llmopt serve`` answers an ``llmopt.Client`` stream and a ``tritonclient`` infer;
- decode tokens/s, on the providers under test and on CPU.

Without ``--gpu`` (``--dry-run``) the providers under test are CPU's, so everything but the GPU
runs, in CI too. Every check is recorded; the report fails if any one did.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import LlmoptError

LONG_TOKENS = 2100  # past the 2,048-token profile maxima TensorRT engines used to get
TINY_CONTEXT = 4096
PROMPT = [5, 17, 42, 9, 77, 3, 120, 64]
# the packages each provider is meant to run: "fused" is float32 GroupQueryAttention, which
# ONNX Runtime's CUDA provider has no kernel for (see _cpu_placement_is_seen)
MEANT_FOR = {"cpu": ("fp32", "fused", "fp16", "int4"), "gpu": ("fp32", "fp16", "int4")}


def best_package(provider: str) -> str:
    return "fused" if provider == "cpu" else "fp16"


@dataclass(frozen=True)
class DoctorOptions:
    """``gpu``: test cuda (and tensorrt where installed) against CPU; otherwise CPU only."""

    gpu: bool = False
    device_id: int = 0
    work_dir: str | None = None  # kept for inspection when given; a temporary folder otherwise
    long_tokens: int = LONG_TOKENS
    serve: bool = True


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


class _Run:
    """Runs named checks, recording each (a failure is recorded, not raised)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.report = DoctorReport()
        self.say = say

    @contextmanager
    def check(self, name: str) -> Iterator[list[str]]:
        notes: list[str] = []
        started = time.perf_counter()
        ok, detail = True, ""
        try:
            yield notes
        except Exception as exc:  # noqa: BLE001  (a self-test reports every failure, then goes on)
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        detail = detail or "; ".join(notes)
        self.report.checks.append(Check(name, ok, detail, seconds))
        suffix = f": {detail}" if detail else ""
        self.say(f"[{'ok' if ok else 'FAIL'}] {name} ({seconds:.1f} s){suffix}")


def run_doctor(options: DoctorOptions | None = None,
               say: Callable[[str], None] = print) -> DoctorReport:
    """Run every check; ``say`` gets one line per check as it finishes."""
    options = options or DoctorOptions()
    run = _Run(say)
    if options.work_dir:
        root = Path(options.work_dir)
        root.mkdir(parents=True, exist_ok=True)
        _checks(run, options, root)
    else:
        with tempfile.TemporaryDirectory(prefix="llmopt-doctor-") as tmp:
            _checks(run, options, Path(tmp))
    return run.report


def _checks(run: _Run, options: DoctorOptions, root: Path) -> None:
    from llmopt.runtime import kernels
    from llmopt.runtime import providers as P

    with run.check("versions and providers") as notes:
        providers = _providers_under_test(options, P.available())
        env = P.BuildEnvironment.current(options.device_id)
        notes.append(f"onnxruntime {env.onnxruntime} (CUDA {env.cuda}), TensorRT "
                     f"{env.tensorrt}, GPU {env.gpu}; installed: {', '.join(P.available())}; "
                     f"testing: {', '.join(providers)}; llmopt CPU kernels: "
                     f"{kernels.status()}")
    if not run.report.ok:
        return
    packages: dict[str, Path] = {}
    with run.check("build tiny models, export, optimize --target cuda, quantize int4") as notes:
        packages = _build_packages(root)
        notes.append(", ".join(sorted(packages)))
    if not packages:
        return
    for provider in providers:
        _provider_checks(run, options, provider, packages)
    _tensorrt_checks(run, options, providers, packages, root)
    with run.check(f"generate {options.long_tokens} tokens on {providers[0]}") as notes:
        rate = _long_generation(packages[best_package(providers[0])], providers[0], options)
        notes.append(f"{options.long_tokens} tokens, decode {rate:.0f} tokens/s")
    if providers[0] != "cpu":
        with run.check("decode speed on cpu (reference)") as notes:
            rate = _long_generation(packages["fused"], "cpu", options, tokens=256)
            notes.append(f"decode {rate:.0f} tokens/s (float32 fused, CPU's best package)")
    if options.serve:
        with run.check(f"serve on {providers[0]}: llmopt.Client stream, tritonclient infer") \
                as notes:
            notes.append(_serve(packages, root, providers[0], options))


def _providers_under_test(options: DoctorOptions, installed: list[str]) -> list[str]:
    if not options.gpu:
        return ["cpu"]
    if "cuda" not in installed:
        raise RuntimeError("--gpu needs onnxruntime-gpu: this onnxruntime has no CUDA provider "
                           "(pip install 'onnxruntime-gpu[cuda,cudnn]')")
    return ["cuda", "tensorrt"] if "tensorrt" in installed else ["cuda"]


def _build_packages(root: Path) -> dict[str, Path]:
    import torch
    import transformers as T

    from llmopt.exporter import export
    from llmopt.optimizer import OptimizeOptions, optimize
    from llmopt.quantizer import QuantizeOptions, quantize

    torch.manual_seed(0)
    decoder = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=TINY_CONTEXT, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    T.LlamaForCausalLM(decoder).save_pretrained(root / "source-decoder")
    encoder = T.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128)
    T.BertModel(encoder).save_pretrained(root / "source-encoder")
    fp32 = export(root / "source-decoder", root / "decoder-fp32")
    return {
        "fp32": fp32.path,
        "fused": optimize(fp32, root / "decoder-fused", OptimizeOptions.O2()).path,
        "fp16": optimize(fp32, root / "decoder-fp16-cuda", OptimizeOptions.for_cuda()).path,
        # no tokenizer for the fidelity text: the doctor compares with CPU itself
        "int4": quantize(fp32, root / "decoder-int4",
                         QuantizeOptions.int4().with_(evaluate=False)).path,
        "encoder": export(root / "source-encoder", root / "encoder-fp32").path,
    }


def _provider_options(provider: str, options: DoctorOptions) -> dict[str, Any]:
    return {provider: {"device_id": options.device_id}} if provider != "cpu" else {}


def _provider_checks(run: _Run, options: DoctorOptions, provider: str,
                     packages: dict[str, Path]) -> None:
    import llmopt
    from llmopt.runtime.generator import Generator
    from llmopt.runtime.kv_cache import InPlaceCache

    reference = llmopt.load(packages["fp32"], ["cpu"])
    assert isinstance(reference, Generator)
    for name in MEANT_FOR["cpu" if provider == "cpu" else "gpu"]:
        with run.check(f"{name} on {provider} (strict): placement, greedy, logits") as notes:
            runner = llmopt.load(packages[name], [provider], strict=True,
                                 provider_options=_provider_options(provider, options))
            assert isinstance(runner, Generator)
            placement = runner.session_info.placement
            assert placement.ops, "onnxruntime recorded no node placement"
            on_cpu = placement.compute_ops_on("cpu") if provider != "cpu" else {}
            assert not on_cpu, f"compute nodes on CPU: {on_cpu}"
            notes.append(f"{sum(placement.nodes_on(p) for p in placement.ops)} nodes on "
                         f"{', '.join(placement.ops)}")
            notes.append(_compare(runner, reference, name))
    if provider == "cuda":
        with run.check("placement report on cuda (float32 GroupQueryAttention)") as notes:
            notes.append(_cpu_placement_is_seen(packages["fused"], options))
    with run.check(f"KV cache in place on {provider}'s device") as notes:
        runner = llmopt.load(packages["fp16"], [provider], strict=True,
                             provider_options=_provider_options(provider, options))
        assert isinstance(runner, Generator) and runner.shared_kv
        cache = runner.model.cache(1, 32, runner.placement)
        assert isinstance(cache, InPlaceCache)
        ids = np.array([PROMPT], np.int64)
        runner.model.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], cache)
        where = {b.device_name().lower() for b in cache.buffers}
        assert where == {runner.device}, f"KV buffers on {where}, session on {runner.device}"
        notes.append(f"{len(cache.buffers)} buffers on {runner.device}:{runner.device_id}")


def _cpu_placement_is_seen(path: Path, options: DoctorOptions) -> str:
    """The float32 fused package on cuda: strict loading must either refuse it naming the ops
    left on CPU, or (a later onnxruntime with a float32 kernel) hold every compute node."""
    import llmopt

    try:
        llmopt.load(path, ["cuda"], strict=True, provider_options=_provider_options("cuda",
                                                                                    options))
    except LlmoptError as exc:
        assert "GroupQueryAttention" in str(exc), f"refused without naming the op: {exc}"
        return "refused under strict, naming GroupQueryAttention on CPU (as documented)"
    return "every compute node on cuda (this onnxruntime has a float32 GroupQueryAttention)"


def _compare(runner: Any, reference: Any, name: str) -> str:
    """Greedy tokens and prefill logits against the float32 package on CPU."""
    from llmopt.runtime.kv import greedy

    got = greedy(runner.model, [PROMPT], 16)[0]
    want = greedy(reference.model, [PROMPT], 16)[0]
    ids = np.array([PROMPT], np.int64)
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1])[None]
    logits, _ = runner.model.forward(ids, mask, positions, runner.model.empty_past(1))
    expected, _ = reference.model.forward(ids, mask, positions, reference.model.empty_past(1))
    diff = float(np.abs(logits.astype(np.float32) - expected).max())
    scale = float(np.abs(expected).max())
    tolerance = {"fp32": 1e-3, "fused": 1e-3}.get(name, 0.1) * max(scale, 1.0)
    assert diff <= tolerance, f"logits differ by {diff:.4g} (tolerance {tolerance:.3g})"
    if name in ("fp32", "fused"):  # float16 and int4 may flip a near-tie: reported, not failed
        assert got == want, f"greedy tokens {got} != CPU's {want}"
    same = sum(a == b for a, b in zip(got, want, strict=True))
    return f"logits max diff {diff:.3g}, {same}/{len(want)} greedy tokens equal CPU's"


def _tensorrt_checks(run: _Run, options: DoctorOptions, providers: list[str],
                     packages: dict[str, Path], root: Path) -> None:
    import llmopt
    from llmopt.package import Package
    from llmopt.runtime import providers as P
    from llmopt.runtime.session import provider_dict

    package = Package.open(packages["fp16"])
    context = package.manifest.context_length
    cache = root / "trt-cache" / "nested" / "not-yet"
    with run.check("TensorRT profile and nested cache folder") as notes:
        trt = P.TensorRTOptions(fp16=True, cache_dir=str(cache), device_id=options.device_id)
        given = provider_dict(trt, package.manifest.signature, "doctor", context)
        assert "logits_to_keep:0" in given["trt_profile_min_shapes"], given
        assert f"attention_mask:8x{context}" in given["trt_profile_max_shapes"], given
        assert Path(given["trt_engine_cache_path"]).is_dir(), "cache folder not created"
        notes.append(f"profile maxima {context} tokens; cache {given['trt_engine_cache_path']}")
    if "tensorrt" not in providers:
        return
    with run.check("TensorRT engine built into the cache, then reloaded from it") as notes:
        built_cache = root / "trt-engines" / "a" / "b"
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            runner = llmopt.load(package, ["tensorrt"], strict=True, provider_options={
                "tensorrt": {"cache_dir": str(built_cache), "precision": "fp16",
                             "device_id": options.device_id}})
            runner.generate(PROMPT, max_new_tokens=4)  # type: ignore[union-attr]
            seconds.append(time.perf_counter() - started)
        assert any(built_cache.rglob("*.engine")), "no engine file in the cache"
        assert seconds[1] < seconds[0], f"reload {seconds[1]:.1f} s not faster than build"
        notes.append(f"build {seconds[0]:.1f} s, reload {seconds[1]:.1f} s")


def _long_generation(path: Path, provider: str, options: DoctorOptions,
                     tokens: int | None = None) -> float:
    import llmopt
    from llmopt.runtime.generator import Generator

    count = tokens or options.long_tokens
    runner = llmopt.load(path, [provider], strict=True,
                         provider_options=_provider_options(provider, options))
    assert isinstance(runner, Generator)
    result = runner.generate(PROMPT, max_new_tokens=count, ignore_eos=True)
    assert result.stats.generated_tokens == count, (
        f"{result.stats.generated_tokens} tokens of {count} ({result.finish_reason})")
    return float(result.stats.decode_tokens_per_s)


def _serve(packages: dict[str, Path], root: Path, provider: str,
           options: DoctorOptions) -> str:
    from llmopt.client import Client
    from llmopt.server import ModelConfig, ServerConfig, create_server

    repository = root / "repository"
    repository.mkdir(exist_ok=True)
    for name, source in (("decoder", packages[best_package(provider)]),
                         ("encoder", packages["encoder"])):
        link = repository / name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
    defaults = ModelConfig(providers=(provider,), strict_providers=True,
                           provider_options=_provider_options(provider, options))
    server, port = create_server(repository, "127.0.0.1:0",
                                 ServerConfig(grace_s=2.0, model_defaults=defaults))
    try:
        server.start()
        with Client(f"127.0.0.1:{port}") as client:
            stream = client.stream("decoder", PROMPT, max_new_tokens=8, ignore_eos=True)
            deltas = list(stream)
            streamed = stream.result.stats.generated_tokens
        del deltas
        assert streamed == 8, f"the stream gave {streamed} tokens, not 8"
        try:
            import tritonclient.grpc as triton
        except ImportError:
            return ("stream 8 tokens; tritonclient infer skipped: not installed "
                    "(pip install 'tritonclient[grpc]')")
        ids = np.array([PROMPT], np.int64)
        tensors = []
        for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
            tensor = triton.InferInput(name, list(value.shape), "INT64")
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        result = triton.InferenceServerClient(f"127.0.0.1:{port}").infer("encoder", tensors)
        output = result.as_numpy(result.get_response().outputs[0].name)
        assert output is not None and np.isfinite(output).all(), "tritonclient got no output"
    finally:
        server.stop(2.0)
    return f"stream 8 tokens; tritonclient infer {list(output.shape)}"
