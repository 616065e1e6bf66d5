"""Optimize on encoders: the graph re-emitted from the package's own weights in fused form, on a
tiny model of every registered encoder type x task, and on all-MiniLM-L6-v2."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from llmopt.errors import UnsupportedError
from llmopt.exporter import ExportOptions, export, registry
from llmopt.exporter.encoder import read_dims, weights_from_onnx
from llmopt.exporter.encoder_graph import WORD_EMBED, build_encoder
from llmopt.exporter.graph import SKIP_LAYER_NORM_CPU
from llmopt.optimizer import OptimizeOptions, optimize
from llmopt.optimizer.check import FP16_TOLERANCE
from llmopt.optimizer.graphs import initializers
from llmopt.package import Package
from llmopt.runtime.session import cpu_session
from tests.exporter.test_encoders import (
    ENCODER_TYPES,
    SENTENCES,
    TASKS,
    TEXTS,
    build,
    right_padded,
    torch_model,
)

LAYERS = 2  # the tiny models' depth
FUSED = frozenset({"norm", "skip_norm", "attention", "activation"})


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Package]]:
    """(model type, task) -> {"source", "export", "level2", "level3"} packages (source: a path)."""
    out = {}
    for model_type in ENCODER_TYPES:
        for task in TASKS:
            root = tmp_path_factory.mktemp(f"{model_type}-{task}")
            source = build(model_type, task, root / "source")
            exported = export(source, root / "export", ExportOptions(task=task))
            out[model_type, task] = {
                "source": source,
                "export": exported,
                "level2": optimize(exported, root / "level2", OptimizeOptions(level=2)),
                "level3": optimize(exported, root / "level3", OptimizeOptions(level=3)),
            }
    return out


def run(package: Package, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = cpu_session(package.model_path)
    (out,) = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    return out


def ops(package: Package) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(package.model_path)).graph.node)


def padded_feeds(package: Package) -> dict[str, np.ndarray]:
    feeds = right_padded(AutoTokenizer.from_pretrained(package.path), TEXTS)
    feeds.setdefault("token_type_ids", np.zeros_like(feeds["input_ids"]))
    assert feeds["attention_mask"].min() == 0  # the batch really is padded
    return feeds


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_level2_fuses_and_validates_against_the_parent(packages: dict, model_type: str,
                                                       task: str) -> None:
    exported, fused = packages[model_type, task]["export"], packages[model_type, task]["level2"]
    validation = fused.manifest["validation"]
    assert validation["passed"], validation
    assert validation["reference"] == "onnx"
    assert validation["against"] == str(exported.path)
    assert validation["generation"] == []
    cases = {c["case"] for c in validation["cases"]}
    assert {"batch 1", "batch 1, one token", "batch 5, right padding, one-token row"} <= cases

    step = fused.manifest["steps"][-1]
    assert step["stage"] == "optimize"
    fusions = step["fusions"]
    assert fusions["attention"] == {"fired": True, "ops": {"Attention": LAYERS}}
    # float32 keeps Add + LayerNormalization (faster on the CPU), and says so
    assert fusions["skip_norm"] == {"fired": False, "reason": SKIP_LAYER_NORM_CPU}
    assert fusions["norm"]["fired"] is False
    assert fusions["norm"]["reason"].startswith("not applicable")
    activation = AutoConfig.from_pretrained(exported.path).to_dict().get("hidden_act", "relu")
    if activation == "gelu":
        assert fusions["activation"] == {"fired": True, "ops": {"BiasGelu": LAYERS}}
    elif activation.startswith("gelu"):
        assert fusions["activation"] == {"fired": True, "ops": {"FastGelu": LAYERS}}
    else:  # DistilBERT's tiny model uses relu
        assert fusions["activation"] == {"fired": False,
                                         "reason": "not applicable: relu is already one op"}

    before, after = ops(exported), ops(fused)
    assert step["nodes_before"] == sum(before.values())
    # (LayerNorm and its residual Add stay two ops in float32)
    assert step["nodes_after"] == sum(after.values()) < 0.75 * step["nodes_before"]
    assert after["Attention"] == LAYERS and after["SkipLayerNormalization"] == 0
    assert after["LayerNormalization"] == 2 * LAYERS + 1 and after["Softmax"] == 0
    # no per-layer Transpose is left; MPNet's relative bias is laid out for all layers once
    assert after["Transpose"] == (1 if model_type == "mpnet" else 0)
    assert before["Attention"] == before["SkipLayerNormalization"] == 0
    proto = onnx.load(str(fused.model_path), load_external_data=False)
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 23
    assert fused.manifest["signature"] == exported.manifest["signature"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_level2_equals_the_unfused_package_on_a_padded_batch(packages: dict, model_type: str,
                                                             task: str) -> None:
    exported, fused = packages[model_type, task]["export"], packages[model_type, task]["level2"]
    feeds = padded_feeds(exported)
    want, got = run(exported, feeds), run(fused, feeds)
    assert got.dtype == np.float32
    if task == "text-classification":
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    else:
        valid = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    # and PyTorch agrees with the fused graph directly, not only through the parent
    model = torch_model(packages[model_type, task]["source"], task)
    names = [i.name for i in cpu_session(fused.model_path).get_inputs()]
    with torch.no_grad():
        out = model(**{n: torch.from_numpy(feeds[n]) for n in names})
    if task == "text-classification":
        np.testing.assert_allclose(got, out.logits.numpy(), atol=1e-4, rtol=0)
    else:
        valid = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[valid], out.last_hidden_state.numpy()[valid], atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("level", ["level2", "level3"])
@pytest.mark.parametrize(("model_type", "task"), [("bert", "feature-extraction"),
                                                  ("roberta", "text-classification")])
def test_an_all_padding_row_stays_finite_and_leaks_nowhere(packages: dict, model_type: str,
                                                            task: str, level: str) -> None:
    """A row with no real token at all masks every key of every query; the fused attention must
    not turn it into NaN, and the other rows must not change."""
    exported, fused = packages[model_type, task]["export"], packages[model_type, task][level]
    feeds = padded_feeds(exported)
    empty = {name: np.concatenate([a, np.zeros_like(a[:1])]) for name, a in feeds.items()}
    empty["input_ids"][-1] = int(exported.manifest["encoder"]["pad_token_id"])
    got = run(fused, empty)
    assert np.isfinite(got).all()
    want = run(exported, feeds)
    tolerance = 1e-4 if level == "level2" else FP16_TOLERANCE * max(1.0, np.abs(want).max())
    if task == "text-classification":
        np.testing.assert_allclose(got[:-1], want, atol=tolerance, rtol=0)
    else:
        valid = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[:-1][valid], want[valid], atol=tolerance, rtol=0)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_level3_float16_passes_with_its_tolerance(packages: dict, model_type: str,
                                                  task: str) -> None:
    half = packages[model_type, task]["level3"]
    validation = half.manifest["validation"]
    assert validation["passed"], validation
    assert validation["tolerance"] == FP16_TOLERANCE
    worst = max(v for c in validation["cases"] for v in c["max_abs_diff"].values())
    assert 0 < worst < FP16_TOLERANCE  # really computed in float16, and close
    assert half.manifest["onnx"]["dtype"] == "float16"
    proto = onnx.load(str(half.model_path))
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    assert weights[WORD_EMBED] == onnx.TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    after = Counter(n.op_type for n in proto.graph.node)
    assert after["Attention"] == LAYERS and after["SkipLayerNormalization"] == 2 * LAYERS + 1
    attention = next(n for n in proto.graph.node if n.op_type == "Attention")
    precision = {a.name: a.i for a in attention.attribute}["softmax_precision"]
    assert precision == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_weights_round_trip_through_the_initializers(packages: dict, model_type: str) -> None:
    """Re-emitting the unfused graph from an exported package's initializers gives back the
    same initializers, byte for byte: nothing is lost by normalizing the weights."""
    exported = packages[model_type, "text-classification"]["export"]
    original = onnx.load(str(exported.model_path))
    arch = registry.find(model_type, "text-classification")
    dims = read_dims(arch, AutoConfig.from_pretrained(exported.path),
                     "token_type_ids" in exported.manifest["encoder"]["inputs"])
    tensors = initializers(exported)
    again = build_encoder(dims, weights_from_onnx(tensors, dims.num_layers))
    assert {t.name: t.raw_data for t in again.graph.initializer} == \
        {t.name: t.raw_data for t in original.graph.initializer}
    assert [n.op_type for n in again.graph.node] == [n.op_type for n in original.graph.node]


def test_a_fused_package_optimizes_again(packages: dict, tmp_path: Path) -> None:
    """The fused graph keeps the stable weight names, so it can itself be re-emitted."""
    fused = packages["roberta", "feature-extraction"]["level2"]
    again = optimize(fused, tmp_path / "again", OptimizeOptions(level=2))
    assert again.manifest["validation"]["passed"]
    assert again.manifest["steps"][-1]["nodes_after"] == fused.manifest["steps"][-1]["nodes_after"]


def test_fusions_are_independent(packages: dict, tmp_path: Path) -> None:
    exported = packages["bert", "feature-extraction"]["export"]
    only = optimize(exported, tmp_path / "attention",
                    OptimizeOptions(level=2, fusions=("attention",)))
    assert only.manifest["validation"]["passed"]
    after = ops(only)
    assert after["Attention"] == LAYERS
    assert after["SkipLayerNormalization"] == after["BiasGelu"] == 0
    assert after["LayerNormalization"] == 2 * LAYERS + 1
    assert after["Erf"] == LAYERS
    assert set(only.manifest["steps"][-1]["fusions"]) == {"attention"}


def test_reemit_refuses_a_graph_without_llmopt_weight_names(packages: dict) -> None:
    exported = packages["bert", "feature-extraction"]["export"]
    tensors = {k: v for k, v in initializers(exported).items()
               if not k.startswith("encoder.layer.1.")}
    with pytest.raises(UnsupportedError, match=r"no initializer 'encoder\.layer\.1\."):
        registry.find("bert", "feature-extraction").reemit(exported, tensors, FUSED, "float32")


# ---------------------------------------------------------------------------------------------
# real model


@pytest.mark.real_model
def test_minilm_level2_embeddings_match_pytorch(minilm_dir: Path, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 exported, then optimized at level 2: its mean-pooled, normalized
    embeddings agree with PyTorch's (cosine >= 0.9999) on varied text in padded batches.
    Prints node counts and the latency of one batch of 8 sentences before and after."""
    from llmopt.runtime import load

    exported = export(minilm_dir, tmp_path / "export", ExportOptions(task="feature-extraction"))
    fused = optimize(exported, tmp_path / "level2", OptimizeOptions(level=2))
    assert fused.manifest["validation"]["passed"], fused.manifest["validation"]
    step = fused.manifest["steps"][-1]
    assert all(step["fusions"][f]["fired"] for f in ("attention", "activation"))
    embedder = load(fused)
    assert (embedder.pooling, embedder.normalize) == ("mean", True)
    model = torch_model(minilm_dir, "feature-extraction")

    cosines = []
    for start in range(0, len(SENTENCES), 8):
        batch = SENTENCES[start:start + 8]
        got = embedder.embed(batch)
        feeds = embedder.tokenize(batch)
        with torch.no_grad():
            hidden = model(**{n: torch.from_numpy(a) for n, a in feeds.items()}).last_hidden_state
        weights = feeds["attention_mask"][..., None].astype(np.float64)
        want = (hidden.numpy() * weights).sum(1) / weights.sum(1)
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        cosines.extend(np.sum(got * want, axis=1).tolist())
    assert len(cosines) == len(SENTENCES) >= 20
    assert min(cosines) >= 0.9999, min(cosines)

    feeds = embedder.tokenize(SENTENCES[:8])
    sessions = {"export": cpu_session(exported.model_path), "level2": embedder.session}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(30):  # interleaved, so load from other processes hits both alike
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    median = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    worst = max(v for c in fused.manifest["validation"]["cases"]
                for v in c["max_abs_diff"].values())
    print(f"\nall-MiniLM-L6-v2 level 2: nodes {step['nodes_before']} -> {step['nodes_after']}, "
          f"max abs diff vs export {worst:.2e}, 1 - min cosine vs PyTorch "
          f"{1 - min(cosines):.1e}; batch of 8 x {feeds['input_ids'].shape[1]} tokens: "
          f"{median['export']:.1f} ms -> {median['level2']:.1f} ms (median of 30, CPU)")
