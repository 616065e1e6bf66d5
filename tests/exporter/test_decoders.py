"""Decoder export on tiny models of every registered architecture, and its failure modes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

import llmopt
from llmopt.exporter import ExportOptions, export, registry
from llmopt.exporter.decoder import read_dims, stack_experts, weights_from_onnx
from llmopt.exporter.decoder_graph import FUSIONS, build_decoder, op_histogram
from llmopt.exporter.graph import SKIP_LAYER_NORM_CPU
from llmopt.package import Package
from llmopt.quantizer import QuantizeOptions
from llmopt.runtime.kv import left_pad, position_ids
from tests import tiny_decoders

DECODERS = sorted(a.name for a in registry.supported() if a.kind == "decoder")


def test_every_registered_decoder_has_a_tiny_model() -> None:
    assert set(DECODERS) <= set(tiny_decoders.CONFIGS)
    assert {"gpt2", "llama", "mistral", "qwen2", "phi3"} <= set(DECODERS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each tiny decoder exported once: arch -> (source dir, package dir)."""
    out = {}
    for arch in DECODERS:
        root = tmp_path_factory.mktemp(arch)
        source = tiny_decoders.build(arch, root / "source")
        export(source, root / "package")
        out[arch] = (source, root / "package")
    return out


@pytest.mark.parametrize("arch", DECODERS)
def test_export_validates_against_pytorch(exported: dict, arch: str) -> None:
    _, package_dir = exported[arch]
    manifest = json.loads((package_dir / "llmopt.json").read_text())
    validation = manifest["validation"]
    assert validation["passed"], validation
    cases = {c["case"] for c in validation["cases"]}
    assert "batch 2, left padding, past > 0" in cases
    assert "batch 1, one-token prompt, past 0" in cases
    assert all(g["match"] and g["tokens"] > 0 for g in validation["generation"])
    assert manifest["architecture"] == arch
    assert manifest["task"] == "text-generation"
    assert manifest["kv_cache"]["num_layers"] == 2
    names = [i["name"] for i in manifest["signature"]["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names
    for name in ("tokenizer.json", "config.json", "generation_config.json", "model.onnx"):
        assert (package_dir / name).is_file()


@pytest.mark.parametrize("arch", DECODERS)
def test_onnx_matches_pytorch_on_a_padded_batch_of_three(exported: dict, arch: str) -> None:
    """An independent check of the graph: batch 3, left padding, prefill then two decodes."""
    source, package_dir = exported[arch]
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    session = ort.InferenceSession(str(package_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    kv = json.loads((package_dir / "llmopt.json").read_text())["kv_cache"]
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(10, 100, size=n)) for n in (11, 4, 7)]
    ids, mask = left_pad(prompts)
    full_ids = np.concatenate([ids, rng.integers(10, 100, size=(3, 2))], axis=1)
    full_mask = np.concatenate([mask, np.ones((3, 2), np.int64)], axis=1)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(full_ids),
                     attention_mask=torch.from_numpy(full_mask),
                     position_ids=torch.from_numpy(position_ids(full_mask))).logits.numpy()
    got_logits = _prefill_then_decode(session, kv, full_ids, full_mask, ids.shape[1])
    valid = full_mask.astype(bool)
    np.testing.assert_allclose(got_logits[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_olmo_clip_qkv_is_one_clip_a_layer_and_matters(exported: dict) -> None:
    source, package_dir = exported["olmo"]
    graph = onnx.load(str(package_dir / "model.onnx"), load_external_data=False).graph
    assert [n.name for n in graph.node if n.op_type == "Clip"] == [
        "/model/layers.0/attn/clip_qkv", "/model/layers.1/attn/clip_qkv"]
    # the tiny config's clip_qkv is inside the projections' range, so the clamp changes logits
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    with torch.no_grad():
        clipped = model(ids).logits
        model.config.clip_qkv = None
        unclipped = model(ids).logits
    assert float((clipped - unclipped).abs().max()) > 0.05


def test_logits_to_keep_computes_the_last_positions_only(exported: dict) -> None:
    """Generation asks for the last position's logits (the LM head skips the rest of a
    prompt); 0 means every position, as in transformers."""
    _, package_dir = exported["llama"]
    session = ort.InferenceSession(str(package_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    kv = json.loads((package_dir / "llmopt.json").read_text())["kv_cache"]
    ids, mask = left_pad([[5, 9, 11, 20, 7], [8, 3]])
    empty = np.zeros((2, kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
            **{f"past_key_values.{i}.{k}": empty for i in range(2) for k in ("key", "value")}}
    logits = {keep: session.run(["logits"], {**feed, "logits_to_keep": np.array(keep)})[0]
              for keep in (0, 1, 2)}
    assert logits[0].shape[:2] == (2, 5) and logits[1].shape[:2] == (2, 1)
    np.testing.assert_allclose(logits[1], logits[0][:, -1:], atol=1e-6)
    np.testing.assert_allclose(logits[2], logits[0][:, -2:], atol=1e-6)


def test_validation_failure_raises_and_marks_the_package(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that computes the wrong thing is caught, with numbers, and marked failed."""
    from dataclasses import replace

    from llmopt.exporter import decoder

    real_read_dims = decoder.read_dims

    def wrong_scale(*args, **kwargs):  # type: ignore[no-untyped-def]
        dims = real_read_dims(*args, **kwargs)
        return replace(dims, attention_scale=dims.attention_scale * 3)

    monkeypatch.setattr(decoder, "read_dims", wrong_scale)
    source = tiny_decoders.build("llama", tmp_path / "source")
    with pytest.raises(llmopt.ValidationError, match="max abs diff") as info:
        export(source, tmp_path / "package")
    assert not info.value.report["passed"]
    manifest = json.loads((tmp_path / "package" / "llmopt.json").read_text())
    assert manifest["validation"]["passed"] is False


def test_float16_export_validates_with_its_tolerance(tmp_path: Path) -> None:
    source = tiny_decoders.build("llama", tmp_path / "source")
    package = export(source, tmp_path / "package", ExportOptions(dtype="float16"))
    validation = package.manifest["validation"]
    assert validation["passed"]
    assert validation["tolerance"] > 1e-3
    assert package.manifest["kv_cache"]["dtype"] == "float16"
    session = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])
    kinds = {i.name: i.type for i in session.get_inputs()}
    assert kinds["past_key_values.0.key"] == "tensor(float16)"
    assert {o.name: o.type for o in session.get_outputs()}["logits"] == "tensor(float)"


def test_external_data_is_written_beside_the_graph(tmp_path: Path) -> None:
    source = tiny_decoders.build("gpt2", tmp_path / "source")
    package = export(source, tmp_path / "package", ExportOptions(external_data=True))
    assert package.manifest["onnx"]["external_data"] == "model.onnx.data"
    data = tmp_path / "package" / "model.onnx.data"
    assert data.stat().st_size > (tmp_path / "package" / "model.onnx").stat().st_size
    assert package.manifest["validation"]["passed"]


def test_pickled_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    source = tiny_decoders.build("llama", tmp_path / "source", safe_serialization=False)
    assert not list(source.glob("*.safetensors"))
    with pytest.raises(llmopt.SourceError, match="pickled") as info:
        export(source, tmp_path / "refused")
    assert "allow-pickle" in str(info.value)
    assert not (tmp_path / "refused").exists()
    package = export(source, tmp_path / "allowed", ExportOptions(allow_pickle=True))
    assert package.manifest["validation"]["passed"]


def test_repository_code_never_runs_without_trust(tmp_path: Path) -> None:
    source = tmp_path / "custom"
    source.mkdir()
    marker = tmp_path / "code-ran"
    (source / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom'\n"
    )
    (source / "config.json").write_text(json.dumps({
        "model_type": "custom",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
    }))
    with pytest.raises(llmopt.SourceError, match="trust-remote-code"):
        export(source, tmp_path / "package")
    assert not marker.exists()


def _unreadable_weights(directory: Path, config: dict) -> Path:
    """A model directory whose config names an architecture and whose weights file is garbage:
    only a refusal made from the config alone gives the architecture error."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    return directory


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "t5", "vocab_size": 64, "d_model": 32, "num_layers": 1, "num_heads": 2,
      "is_encoder_decoder": True}, "encoder-decoder"),
    ({"model_type": "mamba", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1},
     "recurrent state"),
    ({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
      "num_attention_heads": 2, "max_position_embeddings": 256,
      "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "dynamic"),
    ({"model_type": "opt", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
      "num_attention_heads": 2, "ffn_dim": 64, "do_layer_norm_before": False,
      "word_embed_proj_dim": 16}, "opt-350m"),
    ({"model_type": "gpt_bigcode", "vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 2,
      "multi_query": False}, "multi_query=false"),
])
def test_unsupported_models_are_refused_before_any_weight_is_read(
        tmp_path: Path, config: dict, expected: str) -> None:
    source = _unreadable_weights(tmp_path / "model", config)
    with pytest.raises(llmopt.UnsupportedError, match=expected) as info:
        export(source, tmp_path / "package")
    assert info.value.fix
    assert not (tmp_path / "package").exists()


def test_longrope_is_refused_by_the_traced_builder_with_the_native_fix(tmp_path: Path) -> None:
    """The trace would fix one of LongRoPE's two tables; the native builder emits both."""
    source = _unreadable_weights(tmp_path / "model", {
        "model_type": "phi3", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "original_max_position_embeddings": 64,
        "max_position_embeddings": 256, "rope_scaling": {"type": "longrope",
                                                         "short_factor": [1.0] * 8,
                                                         "long_factor": [2.0] * 8}})
    with pytest.raises(llmopt.UnsupportedError, match="longrope") as info:
        export(source, tmp_path / "package", ExportOptions(builder="traced"))
    assert "--builder native" in str(info.value.fix)
    assert not (tmp_path / "package").exists()


def test_builder_native_names_the_traced_fix(tmp_path: Path) -> None:
    source = _unreadable_weights(tmp_path / "bloom", {
        "model_type": "bloom", "vocab_size": 64, "hidden_size": 32, "n_layer": 1, "n_head": 2})
    with pytest.raises(llmopt.UnsupportedError, match="no native builder") as info:
        export(source, tmp_path / "package", ExportOptions(builder="native"))
    assert "--builder traced" in str(info.value)
    for arch in ("llama", "gpt2", "phi3", "qwen2", "mistral", "bert"):
        assert arch in str(info.value)


# --- options of the parallel-residual families that their tiny models in CONFIGS leave off ----

VARIANTS = {  # name -> (arch, config attributes, parallel residual, norm shared by attn and MLP)
    "phi qk_layernorm": ("phi", {"qk_layernorm": True}, True, True),
    "gpt_neox sequential": ("gpt_neox", {"use_parallel_residual": False}, False, False),
    "stablelm parallel": ("stablelm", {"use_parallel_residual": True}, True, True),
    "stablelm parallel qk_layernorm": (
        "stablelm", {"use_parallel_residual": True, "qk_layernorm": True}, True, True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parallel_family_variants_export_validate_and_fuse(variant: str, tmp_path: Path) -> None:
    """Each option changes the graph (parallel residual, shared norm, q/k LayerNorms) and
    survives optimize's round trip through the package's initializers and saved config."""
    import onnx
    import transformers

    arch, options, parallel, shared = VARIANTS[variant]
    old_transformers = int(transformers.__version__.split(".")[0]) < 5
    if arch == "stablelm" and options.get("qk_layernorm") and old_transformers:
        pytest.skip("transformers 4.57 cannot build StableLM with qk_layernorm (its _init_weights "
                    "zeroes the bias of a bias-free LayerNorm)")
    source = tiny_decoders.build(arch, tmp_path / "source", **options)
    package = export(source, tmp_path / "package", ExportOptions(generation_tokens=8))
    assert package.manifest["validation"]["passed"], package.manifest["validation"]
    graph = onnx.load(str(package.model_path)).graph
    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    adds = [n.name for n in graph.node if n.name.endswith("/parallel_residual")]
    assert len(adds) == (2 if parallel else 0)
    assert ("model.layers.0.mlp_norm.weight" in weights) == (not shared)
    if options.get("qk_layernorm"):
        per_head = (4, 16) if arch == "stablelm" else (16,)  # StableLM: own weights per head
        assert weights["model.layers.1.attn.q_norm.weight"] == per_head
        assert weights["model.layers.1.attn.k_norm.weight"] == (
            (2, 16) if arch == "stablelm" else (16,))
        if arch == "phi":
            assert weights["model.layers.1.attn.q_norm.bias"] == (16,)

    optimized = llmopt.optimize(package, tmp_path / "optimized",
                                llmopt.OptimizeOptions(generation_tokens=8))
    assert optimized.manifest["validation"]["passed"], optimized.manifest["validation"]
    fusions = optimized.manifest["steps"][-1]["fusions"]
    assert fusions["attention"]["ops"] == {"RotaryEmbedding": 4, "GroupQueryAttention": 2}
    # LayerNorm models keep Add + LayerNormalization in float32 (faster on the CPU)
    assert fusions["skip_norm"] == {"fired": False, "reason": SKIP_LAYER_NORM_CPU}


def test_gpt_neox_packed_qkv_is_reordered_to_q_k_v() -> None:
    """GPT-NeoX's query_key_value output is [heads, 3, head_dim]; after the reorder at load,
    splitting it [q | k | v] gives exactly what transformers' view + chunk gives."""
    from llmopt.exporter.decoder import _per_head_to_split
    from llmopt.exporter.ops import Linear

    heads, dim, hidden = 4, 8, 32
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3 * heads * dim, hidden)).astype(np.float32)  # torch [out, in]
    bias = rng.normal(size=3 * heads * dim).astype(np.float32)
    x = rng.normal(size=(5, hidden)).astype(np.float32)
    packed = (x @ weight.T + bias).reshape(5, heads, 3 * dim)
    want = [packed[..., i * dim:(i + 1) * dim].reshape(5, heads * dim) for i in range(3)]
    lin = _per_head_to_split(Linear(weight.T, bias), heads)
    got = np.split(x @ lin.weight + lin.bias, 3, axis=-1)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_native_and_traced_builders_agree_on_the_same_model(tmp_path: Path) -> None:
    """--builder lets a user compare both on one model: same contract, same tokens."""
    source = tiny_decoders.build("llama", tmp_path / "source")
    native = export(source, tmp_path / "native", ExportOptions(builder="native"))
    traced = export(source, tmp_path / "traced", ExportOptions(builder="traced"))
    assert (native.manifest["builder"], traced.manifest["builder"]) == ("native", "traced")
    assert [i["name"] for i in native.manifest["signature"]["inputs"]] == \
        [i["name"] for i in traced.manifest["signature"]["inputs"]]
    prompt = [5, 9, 11, 20, 7, 33]
    tokens = [llmopt.load(p.path).generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
              for p in (native, traced)]
    assert tokens[0] == tokens[1]
    # lean: one fused attention node per layer, no eager softmax, and in each layer one Shape
    # (the cache length) left of the shape arithmetic for heads, head_dim, batch and sequence
    ops = _op_counts(traced.model_path)
    layers = int(traced.kv_cache["num_layers"])
    assert ops["MultiHeadAttention"] == layers, ops
    assert ops["Softmax"] == 0, ops
    assert _op_counts(traced.model_path, scope="/layers.")["Shape"] <= layers


def _op_counts(path: Path, scope: str = "") -> dict[str, int]:
    import collections

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return collections.Counter(node.op_type for node in proto.graph.node if scope in node.name)


def test_traced_attention_the_fused_node_cannot_express_stays_eager(tmp_path: Path) -> None:
    """Gemma 2 soft-caps its attention logits: MultiHeadAttention has no such option, so its
    layers keep the model's own eager attention, and the export still validates."""
    source = tiny_decoders.build("gemma2", tmp_path / "source")
    package = export(source, tmp_path / "package",
                     ExportOptions(builder="traced", generation_tokens=4))
    assert package.manifest["validation"]["passed"]
    ops = _op_counts(package.model_path)
    assert ops["MultiHeadAttention"] == 0 and ops["Softmax"] > 0, ops


def test_task_the_architecture_lacks_is_refused(tmp_path: Path) -> None:
    source = tiny_decoders.build("gpt2", tmp_path / "source")
    with pytest.raises(llmopt.UnsupportedError, match="text-generation"):
        export(source, tmp_path / "package", ExportOptions(task="feature-extraction"))


def test_hub_id_offline_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(llmopt.SourceError) as info:
        export("no-such-org/no-such-model", tmp_path / "package")
    assert "HF_HUB_OFFLINE" in str(info.value)


def test_refuses_to_overwrite_a_directory_that_is_not_a_package(tmp_path: Path) -> None:
    source = tiny_decoders.build("gpt2", tmp_path / "source")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(llmopt.PackageError, match="refusing to overwrite"):
        export(source, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


# --- the CLI, through its real entry point ------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmopt.cli.main", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_export_and_inspect(tmp_path: Path) -> None:
    source = tiny_decoders.build("qwen2", tmp_path / "source")
    result = _cli("export", str(source), "-o", str(tmp_path / "package"))
    assert result.returncode == 0, result.stderr
    assert "Validation  PASSED" in result.stdout
    result = _cli("inspect", str(tmp_path / "package"))
    assert result.returncode == 0, result.stderr
    assert "past_key_values.{i}.key" in result.stdout
    assert "MatMul" in result.stdout
    info = json.loads(_cli("inspect", "--json", str(tmp_path / "package")).stdout)
    assert info["validation"]["passed"] and info["ops"]["MatMul"] > 0


@pytest.mark.parametrize("make_args, expected", [
    (lambda t: ["export", str(t / "missing"), "-o", str(t / "o")], "does not exist"),
    (lambda t: ["export", str(t), "-o", str(t / "o")], "no config.json"),
    (lambda t: ["export", str(t / "corrupt.gguf"), "-o", str(t / "o")], "not a GGUF file"),
    (lambda t: ["export", str(t / "truncated.gguf"), "-o", str(t / "o")], "could not read GGUF"),
    (lambda t: ["export", str(t / "m"), "-o", str(t / "o"), "--task", "summarize"],
     "unknown task"),
    (lambda t: ["export", str(t / "m"), "-o", str(t / "o"), "--dtype", "int3"], "unknown dtype"),
    (lambda t: ["inspect", str(t / "missing")], "does not exist"),
])
def test_cli_bad_input_is_one_line_with_a_fix(tmp_path: Path, make_args, expected: str) -> None:
    (tmp_path / "corrupt.gguf").write_bytes(b"\x00" * 64)
    (tmp_path / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 7)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    result = _cli(*make_args(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llmopt")]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and "fix:" in lines[0]


def test_cli_unknown_architecture_exits_nonzero(tmp_path: Path) -> None:
    source = _unreadable_weights(tmp_path / "t5", {"model_type": "t5", "vocab_size": 64,
                                                   "is_encoder_decoder": True})
    result = _cli("export", str(source), "-o", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "encoder-decoder" in result.stderr and "Traceback" not in result.stderr


def test_cli_builder_flag_and_inspect_show_the_builder(tmp_path: Path) -> None:
    source = tiny_decoders.build("mistral", tmp_path / "source")
    result = _cli("export", str(source), "-o", str(tmp_path / "package"), "--builder", "traced")
    assert result.returncode == 0, result.stderr
    assert "traced builder" in result.stdout
    info = json.loads(_cli("inspect", "--json", str(tmp_path / "package")).stdout)
    assert info["builder"] == "traced" and info["validation"]["passed"]


def _gemma_prefill(arch: str, tmp_path: Path, dtype: type = np.float32,
                   fusions: frozenset[str] = frozenset(), dims_change: dict | None = None,
                   drop_local_rope: bool = False) -> tuple[np.ndarray, np.ndarray, object]:
    """(graph logits, PyTorch logits, graph) for one 20-token prompt, five times the window."""
    from dataclasses import replace

    from llmopt.exporter.decoder import read_dims, rotary_parameters, weights_from_state
    from llmopt.exporter.decoder_graph import build_decoder

    source = tiny_decoders.build(arch, tmp_path / arch)
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    desc = registry.find(arch, "text-generation")
    inv_freq, scaling = rotary_parameters(model)
    local, local_scaling = rotary_parameters(model, "sliding_attention")
    dims = read_dims(desc, model.config, inv_freq, scaling, local_scaling)
    assert dims.sliding_window is not None and dims.sliding_window < 20
    weights = weights_from_state(desc, dims, model.state_dict(), inv_freq, local)
    dims = replace(dims, **(dims_change or {}))
    if drop_local_rope:
        weights.inv_freq_local = None
    proto = build_decoder(dims, weights, desc.norm, dtype, fusions)
    ids = np.arange(3, 23, dtype=np.int64)[None]
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
             "logits_to_keep": np.array(0, dtype=np.int64)}
    for i in range(dims.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros(
                (1, dims.num_kv_heads, 0, dims.head_dim), dtype)
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.float().numpy()
    return session.run(["logits"], feeds)[0], want, proto


@pytest.mark.parametrize("arch, change", [
    ("gemma2", {"attn_softcap": 0.0}),
    ("gemma2", {"final_softcap": 0.0}),
    ("gemma2", {"sliding_layers": ()}),  # the window on every layer
    ("gemma2", {"sliding_window": None}),  # on none
    ("gemma3_text", {"sliding_layers": ()}),
    ("gemma3_text", "local rope"),  # the global layers' RoPE table on the sliding ones too
])
def test_each_gemma_feature_is_exercised_by_its_tiny_model(tmp_path: Path, arch: str,
                                                           change: dict | str) -> None:
    """The tiny configs make every Gemma feature matter: the graph matches PyTorch on a prompt
    five times the window, and leaving any one feature out breaks the match."""
    got, want, _ = _gemma_prefill(arch, tmp_path)
    assert np.abs(got - want).max() < 1e-4
    if change == "local rope":
        got, want, _ = _gemma_prefill(arch, tmp_path, drop_local_rope=True)
    else:
        assert isinstance(change, dict)
        got, want, _ = _gemma_prefill(arch, tmp_path, dims_change=change)
    assert np.abs(got - want).max() > 1e-2


def test_gemma3_with_every_layer_sliding_exports(tmp_path: Path) -> None:
    """A Gemma 3 shorter than its pattern of layer types (every layer sliding: a tiny model, or
    a GGUF file, which keeps the default pattern of six): transformers 5 builds the sliding
    RoPE table only, and the graph uses it on every layer (it failed to load before)."""
    source = tiny_decoders.build("gemma3_text", tmp_path / "source",
                                 layer_types=["sliding_attention"] * 2)
    package = export(source, tmp_path / "package", ExportOptions(generation_tokens=8))
    assert package.manifest["validation"]["passed"], package.manifest["validation"]


def test_gemma2_float16_fused_graph_builds_and_runs_on_cpu(tmp_path: Path) -> None:
    """optimize level 3's form (float16, every fusion): soft-capping moves into opset-23
    Attention's ``softcap``, and the graph still computes Gemma 2 on CPU."""
    from llmopt.exporter.decoder_graph import FUSIONS

    got, want, proto = _gemma_prefill("gemma2", tmp_path, np.float16, frozenset(FUSIONS))
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]  # type: ignore[attr-defined]
    assert len(attention) == 2
    assert all(a.name == "softcap" and a.f == 5.0 for n in attention for a in n.attribute
               if a.name == "softcap")
    assert sum(a.name == "softcap" for n in attention for a in n.attribute) == 2
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def _torch_longrope_greedy(source: Path, ids: list[int], n: int) -> list[int]:
    """transformers' tokens: generate() under transformers 5; under 4.57, whose generate()
    re-runs the step that crosses the switch with a one-token cache_position (so earlier rows
    attend ahead), whole-sequence forwards without a cache, which 5's generate() equals."""
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        uncached, sequence = [], list(ids)
        for _ in range(n):
            uncached.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
            sequence.append(uncached[-1])
        if int(transformers.__version__.split(".", 1)[0]) >= 5:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            assert [int(t) for t in out[0, len(ids):]] == uncached
    return uncached


def test_phi3_longrope_chooses_its_table_per_call_like_transformers(tmp_path: Path) -> None:
    """Phi-3.5/Phi-4-mini 128k's LongRoPE: short factors up to the switch point, long ones past
    it, in the exported and the fused graph; generation crossing the switch (where transformers
    recomputes its cache) and starting past it gives transformers' tokens."""
    switch = tiny_decoders.LONGROPE_SWITCH
    source = tiny_decoders.build("phi3-longrope", tmp_path / "source")
    package = export(source, tmp_path / "package", ExportOptions(generation_tokens=8))
    assert package.manifest["validation"]["passed"], package.manifest["validation"]
    assert package.manifest["kv_cache"]["rope_long_after"] == switch
    graph = onnx.load(str(package.path / "model.onnx")).graph
    tables = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    short, long = tables["model.rotary.inv_freq"], tables["model.rotary.long_inv_freq"]
    assert short.shape == long.shape == (6,) and not np.allclose(short, long)
    assert "/model/rotary/longrope/Where" in {n.name for n in graph.node}

    below = [5 + (7 * i) % 200 for i in range(6)]  # decodes across the switch
    above = [9 + (11 * i) % 200 for i in range(switch + 4)]  # long from the prompt on
    expected = {len(p): _torch_longrope_greedy(source, p, 20) for p in (below, above)}
    optimized = llmopt.optimize(package, tmp_path / "optimized",
                                llmopt.OptimizeOptions(generation_tokens=8))
    assert optimized.manifest["validation"]["passed"]
    assert optimized.manifest["kv_cache"]["rope_long_after"] == switch
    fused = {n.op_type for n in onnx.load(str(optimized.path / "model.onnx")).graph.node}
    assert {"RotaryEmbedding", "GroupQueryAttention", "Where"} <= fused
    for pkg in (package, optimized):
        generator = llmopt.load(pkg.path)
        for prompt in (below, above):
            result = generator.generate(prompt, max_new_tokens=20, ignore_eos=True)
            assert result.token_ids == expected[len(prompt)], (pkg.path.name, len(prompt))

    quantized = llmopt.quantize(optimized, tmp_path / "int4",
                                llmopt.QuantizeOptions.int4().with_(evaluate=False))
    assert quantized.manifest["steps"][-1]["quantized_matmuls"] > 0
    assert len(llmopt.load(quantized.path).generate(below, max_new_tokens=20,
                                                    ignore_eos=True).token_ids) == 20


def _run_padded(proto: Any, kv: dict, steps: int = 2) -> np.ndarray:
    """Logits of a left-padded batch of three: a prefill, then ``steps`` one-token decodes."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    ids, mask = left_pad([list(rng.integers(10, 100, size=n)) for n in (9, 3, 6)])
    full_ids = np.concatenate([ids, rng.integers(10, 100, size=(3, steps))], axis=1)
    full_mask = np.concatenate([mask, np.ones((3, steps), np.int64)], axis=1)
    got = _prefill_then_decode(session, kv, full_ids, full_mask, ids.shape[1])
    return got[full_mask.astype(bool)]


def _prefill_then_decode(session: Any, kv: dict, full_ids: np.ndarray, full_mask: np.ndarray,
                         prompt: int) -> np.ndarray:
    """Logits [B, T, V] of a 2-layer package run as generation runs it: the first ``prompt``
    columns in one call, then one token a call on the cache it returned."""
    batch = full_ids.shape[0]
    empty = np.zeros((batch, kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
    past = {f"past_key_values.{i}.{k}": empty for i in range(2) for k in ("key", "value")}
    outputs = [o.name for o in session.get_outputs()]
    got = []
    for start, stop in pairwise([0, *range(prompt, full_ids.shape[1] + 1)]):
        result = dict(zip(outputs, session.run(None, {
            "input_ids": full_ids[:, start:stop], "attention_mask": full_mask[:, :stop],
            "position_ids": position_ids(full_mask)[:, start:stop],
            "logits_to_keep": np.array(0, np.int64), **past}), strict=True))
        got.append(result["logits"])
        past = {f"past_key_values.{i}.{k}": result[f"present.{i}.{k}"]
                for i in range(2) for k in ("key", "value")}
    return np.concatenate(got, axis=1)


def _mixtral_forms(exported: dict) -> tuple[Any, Any, Any, Any]:
    """The exported Mixtral's dims, its weights read back, and a graph builder for them."""
    from transformers import AutoConfig

    source, package_dir = exported["mixtral"]
    proto = onnx.load(str(package_dir / "model.onnx"))
    tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weights = weights_from_onnx(tensors, 2)
    dims = read_dims(registry.find("mixtral", "text-generation"),  # type: ignore[arg-type]
                     AutoConfig.from_pretrained(source), weights.inv_freq)
    kv = json.loads((package_dir / "llmopt.json").read_text())["kv_cache"]

    def build(fusions: frozenset[str], dims_: Any = dims, weights_: Any = weights) -> Any:
        return build_decoder(dims_, weights_, "rms", np.float32, fusions)
    return dims, weights, kv, build


def test_mixtral_moe_op_equals_the_primitive_experts_on_a_padded_batch(exported: dict) -> None:
    """optimize's fused form (ONNX Runtime's MoE, gate/up interleaved) computes what the
    exported per-expert graph computes, and its weights read back unchanged."""
    dims, weights, kv, build = _mixtral_forms(exported)
    assert (dims.num_experts, dims.experts_per_token, dims.normalize_top_k) == (4, 2, True)
    primitive, fused = build(frozenset()), build(frozenset(FUSIONS))
    ops = op_histogram(primitive), op_histogram(fused)
    assert ops[0]["NonZero"] == 2 * 4 and "MoE" not in ops[0]  # one block per expert
    assert ops[1]["MoE"] == 2 and "NonZero" not in ops[1]
    np.testing.assert_allclose(_run_padded(fused, kv), _run_padded(primitive, kv),
                               atol=1e-4, rtol=1e-4)
    again = weights_from_onnx({t.name: numpy_helper.to_array(t)
                               for t in fused.graph.initializer}, 2)
    for old, new in zip(weights.layers, again.layers, strict=True):
        assert old.moe is not None and new.moe is not None and new.mlp_in is None
        np.testing.assert_array_equal(new.moe.gate_up, old.moe.gate_up)
        np.testing.assert_array_equal(new.moe.down, old.moe.down)
        np.testing.assert_array_equal(new.moe.router.weight, old.moe.router.weight)


def test_unnormalized_top_k_keeps_the_primitive_experts(exported: dict) -> None:
    """Qwen-MoE's ``norm_topk_prob=False`` keeps the softmax weights as they are, which changes
    the logits; ONNX Runtime's MoE disagrees on it, so the fused graph keeps the primitive
    experts (and still agrees with the export form)."""
    dims, _, kv, build = _mixtral_forms(exported)
    raw = replace(dims, normalize_top_k=False)
    fused_graph = build(frozenset(FUSIONS), raw)
    assert "MoE" not in op_histogram(fused_graph)
    primitive = _run_padded(build(frozenset(), raw), kv, 1)
    np.testing.assert_allclose(_run_padded(fused_graph, kv, 1), primitive, atol=1e-4, rtol=1e-4)
    assert np.abs(primitive - _run_padded(build(frozenset()), kv, 1)).max() > 1e-2


def test_transformers_4_experts_are_stacked_gate_first() -> None:
    rng = np.random.default_rng(0)
    state = {"m.0.block_sparse_moe.gate.weight": rng.normal(size=(2, 4)),
             "m.0.norm.weight": np.ones(4)}
    for e in range(2):
        for part, shape in (("w1", (3, 4)), ("w3", (3, 4)), ("w2", (4, 3))):
            state[f"m.0.block_sparse_moe.experts.{e}.{part}.weight"] = rng.normal(size=shape)
    out = stack_experts(state, "block_sparse_moe", "mlp", gate="w1", up="w3", down="w2")
    assert set(out) == {"m.0.mlp.gate.weight", "m.0.norm.weight",
                        "m.0.mlp.experts.gate_up_proj", "m.0.mlp.experts.down_proj"}
    assert out["m.0.mlp.experts.gate_up_proj"].shape == (2, 6, 4)
    np.testing.assert_allclose(out["m.0.mlp.experts.gate_up_proj"][1, :3],
                               state["m.0.block_sparse_moe.experts.1.w1.weight"])
    np.testing.assert_allclose(out["m.0.mlp.experts.gate_up_proj"][1, 3:],
                               state["m.0.block_sparse_moe.experts.1.w3.weight"])
    np.testing.assert_allclose(out["m.0.mlp.experts.down_proj"][0],
                               state["m.0.block_sparse_moe.experts.0.w2.weight"])


def test_int4_quantizes_the_per_expert_graph_and_keeps_the_routers_float(
        exported: dict, tmp_path: Path) -> None:
    """optimize's default keeps the per-expert MatMuls (the MoE op is opt-in), so int4 reaches
    the experts, which hold most of an MoE model's weights; the routers stay float."""
    _, package_dir = exported["mixtral"]
    optimized = llmopt.optimize(Package.open(package_dir), tmp_path / "optimized")
    quantized = llmopt.quantize(optimized, tmp_path / "int4",
                                QuantizeOptions.int4().with_(evaluate=False))
    assert sum("router" in n for n in quantized.manifest["steps"][-1]["kept_float"]) == 2
    graph = onnx.load(str(quantized.model_path)).graph
    float_matmuls = [n.input[1] for n in graph.node  # weights, not zero-point corrections
                     if n.op_type == "MatMul" and n.input[1].endswith(".weight")]
    assert sorted(float_matmuls) == sorted(f"model.layers.{i}.moe.router.weight"
                                           for i in range(2))
    # qkv and o per layer, gate_up and down per expert (4) per layer, the LM head
    assert [n.op_type for n in graph.node].count("MatMulNBits") == 2 * 2 + 2 * 4 * 2 + 1


def test_int4_keeps_the_router_and_the_moe_op_experts_float(exported: dict,
                                                           tmp_path: Path) -> None:
    _, package_dir = exported["mixtral"]
    optimized = llmopt.optimize(Package.open(package_dir), tmp_path / "optimized",
                                llmopt.OptimizeOptions(fusions=FUSIONS))
    quantized = llmopt.quantize(optimized, tmp_path / "int4",
                                QuantizeOptions.int4().with_(evaluate=False))
    step = quantized.manifest["steps"][-1]
    assert sum("router" in name for name in step["kept_float"]) == 2
    graph = onnx.load(str(quantized.model_path)).graph
    types = {t.name: t.data_type for t in graph.initializer}
    ops = [n.op_type for n in graph.node]
    # qkv and o in each layer, and the LM head (8 bits by default)
    assert ops.count("MatMulNBits") == 2 * 2 + 1
    routers = [n for n in graph.node
               if n.op_type == "MatMul" and n.input[1].endswith("moe.router.weight")]
    experts = [n for n in graph.node if n.op_type == "MoE"]
    assert len(routers) == 2 and len(experts) == 2
    assert all(types[n.input[1]] == onnx.TensorProto.FLOAT for n in routers)
    assert all(types[n.input[i]] == onnx.TensorProto.FLOAT for n in experts for i in (2, 4))


def test_olmo2_has_no_pre_norms_and_whole_width_qk_norms(tmp_path: Path) -> None:
    """OLMo 2 normalizes block outputs only, and q/k over all heads at once: the package holds
    post-norms and [heads * head_dim] q/k norms, no pre-norms, and validates against PyTorch."""
    import onnx

    source = tiny_decoders.build("olmo2", tmp_path / "source")
    package = export(source, tmp_path / "package", ExportOptions(generation_tokens=4))
    assert package.manifest["validation"]["passed"]
    model = onnx.load(str(package.path / "model.onnx"))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert shapes["model.layers.0.attn.q_norm.weight"] == (4 * 16,)
    assert shapes["model.layers.0.attn.k_norm.weight"] == (2 * 16,)
    assert "model.layers.1.attn_post_norm.weight" in shapes
    assert "model.layers.1.mlp_post_norm.weight" in shapes
    assert not [n for n in shapes if n.endswith(("attn_norm.weight", "mlp_norm.weight"))]


def test_qwen_moe_upgrade_stacks_per_expert_weights_and_keeps_stacked_ones() -> None:
    """Qwen MoE keeps the same module name across versions (``mlp``): transformers 4's
    per-expert weights are stacked, transformers 5's stacked ones pass through untouched."""
    per_expert = {f"l.mlp.experts.{e}.{part}.weight": np.full((2, 2), e, np.float32)
                  for e in range(3) for part in ("gate_proj", "up_proj", "down_proj")}
    stacked = stack_experts({**per_expert, "l.mlp.gate.weight": np.ones((3, 2))}, "mlp", "mlp",
                            gate="gate_proj", up="up_proj", down="down_proj")
    assert set(stacked) == {"l.mlp.gate.weight", "l.mlp.experts.gate_up_proj",
                            "l.mlp.experts.down_proj"}
    assert stacked["l.mlp.experts.gate_up_proj"].shape == (3, 4, 2)
    assert stacked["l.mlp.experts.down_proj"][2].min() == 2
    again = stack_experts(stacked, "mlp", "mlp", gate="gate_proj", up="up_proj",
                          down="down_proj")
    assert set(again) == set(stacked)
    assert again["l.mlp.experts.gate_up_proj"] is stacked["l.mlp.experts.gate_up_proj"]
