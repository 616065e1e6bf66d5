"""Encoder export (BERT, RoBERTa, DistilBERT) on tiny models, and on all-MiniLM-L6-v2."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import llmopt
from llmopt.errors import UnsupportedError
from llmopt.exporter import ExportOptions, export, registry
from llmopt.exporter.encoder import EncoderArch
from llmopt.exporter.options import FP16_TOLERANCE
from llmopt.exporter.pooling import pooling
from llmopt.exporter.validate import validate_encoder
from llmopt.runtime.session import cpu_session
from tests import tiny_tokenizers
from tests.test_manifest import assert_round_trips

TASKS = ("feature-extraction", "text-classification")
AUTO = {"feature-extraction": AutoModel, "text-classification": AutoModelForSequenceClassification}
NUM_LABELS = 3
_BERT_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 64, "max_position_embeddings": 64}
_ROBERTA_SHAPE = {**_BERT_SHAPE, "max_position_embeddings": 66, "type_vocab_size": 1,
                  "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
# model type -> (tiny config kwargs, tokenizer builder)
TINY: dict[str, tuple[dict[str, Any], Callable[[Path], Any]]] = {
    "bert": ({**_BERT_SHAPE, "hidden_act": "gelu"}, tiny_tokenizers.bert_tokenizer),
    "roberta": ({**_ROBERTA_SHAPE, "hidden_act": "gelu_new"}, tiny_tokenizers.roberta_tokenizer),
    "xlm-roberta": (_ROBERTA_SHAPE, tiny_tokenizers.roberta_tokenizer),
    # embeddings of 16 projected to the hidden 32 after their norm
    "electra": ({**_BERT_SHAPE, "embedding_size": 16}, tiny_tokenizers.bert_tokenizer),
    # a relative position bias shared by the layers; positions after padding id 1, as RoBERTa
    "mpnet": (_BERT_SHAPE, lambda d: tiny_tokenizers.bert_tokenizer(d, token_types=False)),
    "camembert": (_ROBERTA_SHAPE, tiny_tokenizers.roberta_tokenizer),
    "distilbert": (
        {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "max_position_embeddings": 64,
         "activation": "relu"},
        lambda d: tiny_tokenizers.bert_tokenizer(d, token_types=False),
    ),
}
ENCODER_TYPES = sorted(
    t for a in registry.supported() if a.kind == "encoder" for t in a.model_types
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "What is the capital of France? Paris, 2 3 4.",
    "sea",
]


def build(model_type: str, task: str, directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A seeded tiny model of ``model_type`` for ``task`` saved with its tokenizer in ``directory``.

    Every parameter gets seeded noise, so LayerNorm weights and biases, padding rows and heads
    all differ from their defaults and a swapped or dropped weight shows in the comparison.
    """
    kwargs, make_tokenizer = TINY[model_type]
    tokenizer = make_tokenizer(directory)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), num_labels=NUM_LABELS,
                                  initializer_range=0.2, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = AUTO[task].from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return directory


def torch_model(source: Path, task: str) -> Any:
    return AUTO[task].from_pretrained(source, attn_implementation="eager").eval()


def right_padded(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding=True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """Each tiny encoder exported once per task: (model type, task) -> (source, package)."""
    out = {}
    for model_type in ENCODER_TYPES:
        for task in TASKS:
            root = tmp_path_factory.mktemp(f"{model_type}-{task}")
            source = build(model_type, task, root / "source")
            export(source, root / "package", ExportOptions(task=task))
            out[model_type, task] = (source, root / "package")
    return out


def test_every_registered_encoder_has_a_tiny_model() -> None:
    assert set(ENCODER_TYPES) == set(TINY)
    assert {"bert", "roberta", "distilbert"} <= set(ENCODER_TYPES)
    for model_type in ENCODER_TYPES:
        arch = registry.find(model_type, "text-classification")
        assert arch.kind == "encoder"
        assert set(arch.tasks) == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_export_validates_against_pytorch(exported: dict, model_type: str, task: str) -> None:
    _, package_dir = exported[model_type, task]
    manifest = json.loads((package_dir / "llmopt.json").read_text())
    validation = manifest["validation"]
    assert validation["passed"], validation
    assert validation["generation"] == []
    cases = {c["case"]: c for c in validation["cases"]}
    assert {"batch 1", "batch 1, one token", "batch 5, right padding, one-token row"} <= set(cases)
    output = "logits" if task == "text-classification" else "last_hidden_state"
    for case in cases.values():
        assert 0 <= case["max_abs_diff"][output] < 1e-4
    assert manifest["task"] == task
    assert manifest["architecture"] == registry.find(model_type, task).name
    inputs = [i["name"] for i in manifest["signature"]["inputs"]]
    token_types = model_type in ("bert", "electra")  # RoBERTa folds its one type in
    assert inputs == ["input_ids", "attention_mask", *(["token_type_ids"] if token_types else [])]
    if token_types:
        assert "batch 2, sentence pairs, right padding" in cases
    (out,) = manifest["signature"]["outputs"]
    assert out["name"] == output
    assert out["dtype"] == "float32"
    if task == "text-classification":
        assert out["shape"] == ["batch", NUM_LABELS]
        assert len(manifest["labels"]) == NUM_LABELS
    else:
        assert out["shape"] == ["batch", "sequence", 32]
    for name in ("model.onnx", "config.json", "tokenizer.json"):
        assert (package_dir / name).is_file()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_onnx_matches_pytorch_on_a_padded_batch(exported: dict, model_type: str,
                                                task: str) -> None:
    """Checked here directly, not through llmopt's own validation: a right-padded batch gives
    PyTorch's outputs at real positions, and each row matches that sentence run alone."""
    source, package_dir = exported[model_type, task]
    tokenizer = AutoTokenizer.from_pretrained(package_dir)
    session = ort.InferenceSession(str(package_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = right_padded(tokenizer, TEXTS)
    assert feeds["attention_mask"].min() == 0  # the batch really is padded
    (got,) = session.run(None, {n: feeds[n] for n in names})
    model = torch_model(source, task)
    with torch.no_grad():
        out = model(**{n: torch.from_numpy(feeds[n]) for n in names})
    valid = feeds["attention_mask"].astype(bool)
    if task == "text-classification":
        want = out.logits.numpy()
        assert got.shape == (len(TEXTS), NUM_LABELS)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    else:
        want = out.last_hidden_state.numpy()
        assert got.shape == (*feeds["input_ids"].shape, 32)
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    for row, text in enumerate(TEXTS):
        alone = right_padded(tokenizer, [text])
        (single,) = session.run(None, {n: alone[n] for n in names})
        length = alone["input_ids"].shape[1]
        if task == "text-classification":
            np.testing.assert_allclose(got[row], single[0], atol=1e-5, rtol=0)
        else:
            np.testing.assert_allclose(got[row, :length], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("model_type", "task"), [
    ("bert", "feature-extraction"),
    ("roberta", "text-classification"),
    ("distilbert", "feature-extraction"),
    ("mpnet", "feature-extraction"),
])
def test_float16_export_passes_with_its_tolerance(tmp_path: Path, model_type: str,
                                                  task: str) -> None:
    source = build(model_type, task, tmp_path / "source")
    package = export(source, tmp_path / "package", ExportOptions(task=task, dtype="float16"))
    validation = package.manifest["validation"]
    assert validation["passed"], validation
    assert validation["tolerance"] == FP16_TOLERANCE
    worst = max(v for c in validation["cases"] for v in c["max_abs_diff"].values())
    assert 0 < worst < FP16_TOLERANCE  # really computed in float16, and close
    proto = onnx.load(str(package.model_path))
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    assert weights["embeddings.word_embeddings.weight"] == onnx.TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_validation_fails_for_a_graph_of_other_weights(tmp_path: Path) -> None:
    """The comparison can fail: a graph emitted from different weights does not pass."""
    arch = registry.find("bert", "feature-extraction")
    model = torch_model(build("bert", "feature-extraction", tmp_path / "a", seed=0),
                        "feature-extraction")
    other = torch_model(build("bert", "feature-extraction", tmp_path / "b", seed=1),
                        "feature-extraction")
    proto, layout = arch.emit(other, "float32")
    onnx.save(proto, str(tmp_path / "other.onnx"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    report = arch.validate(model, cpu_session(tmp_path / "other.onnx"), layout, tokenizer,
                           1e-4, 0)
    assert not report["passed"]
    assert all(not c["passed"] for c in report["cases"])


@pytest.mark.parametrize("embedding_size", [16, 32])
def test_electra_projects_its_embeddings_only_where_sizes_differ(tmp_path: Path,
                                                                 embedding_size: int) -> None:
    """ELECTRA's embeddings (size E) are normalized, then projected to the hidden size H where
    E != H; where E == H the model has no projection and neither has the graph."""
    source = build("electra", "text-classification", tmp_path / "source",
                   embedding_size=embedding_size)
    package = export(source, tmp_path / "package", ExportOptions(task="text-classification"))
    assert_round_trips(package)
    assert package.manifest["validation"]["passed"], package.manifest["validation"]
    weights = {t.name: list(t.dims) for t in onnx.load(str(package.model_path)).graph.initializer}
    assert weights["embeddings.word_embeddings.weight"][1] == embedding_size
    if embedding_size == 32:
        assert "embeddings_project.weight" not in weights
    else:
        assert weights["embeddings_project.weight"] == [16, 32]


def test_mpnet_relative_position_bias_is_in_the_graph(tmp_path: Path) -> None:
    """MPNet's relative position bias is looked up by key - query distance in the graph, also in
    the fused form; a graph without it fails validation."""
    source = build("mpnet", "text-classification", tmp_path / "source")
    model = torch_model(source, "text-classification")
    tokenizer = AutoTokenizer.from_pretrained(source)
    arch = registry.find("mpnet", "text-classification")
    assert isinstance(arch, EncoderArch)
    for variant, passes in ((arch, True), (replace(arch, relative_bias=None), False)):
        proto, layout = variant.emit(model, "float32")
        path = tmp_path / f"{passes}.onnx"
        onnx.save(proto, str(path))
        report = validate_encoder(model, cpu_session(path), layout, tokenizer, 1e-4, 0)
        assert report["passed"] is passes, report
    package = export(source, tmp_path / "package", ExportOptions(task="text-classification"))
    fused = llmopt.optimize(package, tmp_path / "fused")
    assert fused.manifest["validation"]["passed"], fused.manifest["validation"]
    ops = {n.op_type for n in onnx.load(str(fused.model_path)).graph.node}
    assert {"Attention", "LayerNormalization"} <= ops and "SkipLayerNormalization" not in ops


def test_roberta_position_ids_follow_padding_idx(tmp_path: Path) -> None:
    """RoBERTa positions start after the pad id; counting them from 0 fails validation."""
    source = build("roberta", "feature-extraction", tmp_path / "source")
    model = torch_model(source, "feature-extraction")
    tokenizer = AutoTokenizer.from_pretrained(source)
    arch = registry.find("roberta", "feature-extraction")
    assert isinstance(arch, EncoderArch)
    layouts = {}
    for positions, passes in (("padded", True), ("absolute", False)):
        proto, layouts[positions] = replace(arch, positions=positions).emit(model, "float32")
        path = tmp_path / f"{positions}.onnx"
        onnx.save(proto, str(path))
        report = validate_encoder(model, cpu_session(path), layouts[positions], tokenizer, 1e-4,
                                  0)
        assert report["passed"] is passes, report
    assert layouts["padded"]["max_positions"] == 66 - 1 - 1  # pad id 1, then positions 2..65
    assert layouts["padded"]["inputs"] == ["input_ids", "attention_mask"]


def test_validation_without_a_tokenizer_uses_random_ids(tmp_path: Path) -> None:
    source = build("bert", "text-classification", tmp_path / "source")
    model = torch_model(source, "text-classification")
    arch = registry.find("bert", "text-classification")
    proto, layout = arch.emit(model, "float32")
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = arch.validate(model, cpu_session(tmp_path / "model.onnx"), layout, None, 1e-4, 0)
    assert report["passed"], report
    assert len(report["cases"]) == 4


def test_graph_fuses_qkv_and_names_nodes(exported: dict) -> None:
    _, package_dir = exported["bert", "feature-extraction"]
    proto = onnx.load(str(package_dir / "model.onnx"))
    nodes = {n.name: n for n in proto.graph.node}
    weights = {t.name: t for t in proto.graph.initializer}
    qkv = nodes["/encoder/layers.0/attn/qkv/MatMul"]
    assert list(weights[qkv.input[1]].dims) == [32, 96]
    assert not any("query" in name for name in weights)
    assert "/encoder/layers.1/mlp/gelu/Erf" in nodes
    assert proto.opset_import[0].version == 18
    assert {n.op_type for n in proto.graph.node} >= {"LayerNormalization", "Softmax", "Where"}


def test_layout_reads_sentence_transformers_pooling(tmp_path: Path) -> None:
    source = build("bert", "feature-extraction", tmp_path / "source")
    model = torch_model(source, "feature-extraction")
    arch = registry.find("bert", "feature-extraction")
    _, layout = arch.emit(model, "float32")
    assert layout["pooling"] == "mean"
    assert layout["pooling_from"] == "default"
    assert layout["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert (layout["hidden_size"], layout["max_positions"]) == (32, 64)

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]
    (source / "modules.json").write_text(json.dumps(modules))
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
         "pooling_mode_mean_tokens": False}))
    pooled = pooling(torch_model(source, "feature-extraction"), classifier=False)
    assert pooled["pooling"] == "cls"
    assert pooled["normalize"] is True
    assert pooled["pooling_from"] == "sentence-transformers"

    classifier = torch_model(build("bert", "text-classification", tmp_path / "cls"),
                             "text-classification")
    _, layout = arch.emit(classifier, "float32")
    assert (layout["output"], layout["pooling"], layout["num_labels"]) == ("logits", "cls", 3)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"hidden_act": "quick_gelu"}, "activation 'quick_gelu'"),
    ({"is_decoder": True}, "is_decoder=True"),
])
def test_unsupported_configs_fail_with_the_reason(tmp_path: Path, overrides: dict,
                                                  message: str) -> None:
    source = build("bert", "feature-extraction", tmp_path / "source", **overrides)
    with pytest.raises(UnsupportedError, match=message.replace("(", r"\(")):
        export(source, tmp_path / "package", ExportOptions(task="feature-extraction"))
    assert not (tmp_path / "package").exists()


# ---------------------------------------------------------------------------------------------
# real model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Hi",
    "?",
    "Is this the real life? Is this just fantasy?!",
    "Numbers: 3.14159, 2,718 and 1e-9; 42% of 1000 is 420.",
    "Call me at +1 (555) 010-9999 or mail test@example.com.",
    "Ceci n'est pas une pipe.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El veloz murciélago hindú comía feliz cardillo y kiwi.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "日本語の文章もトークン化できますか？",
    "我爱自然语言处理。",
    "안녕하세요, 만나서 반갑습니다.",
    "مرحبا بالعالم",
    "I love pizza 🍕🍕 and tacos 🌮!!",
    "🙂🙃😉",
    "def f(x): return x ** 2  # squares a number",
    "<html><body>Hello &amp; welcome</body></html>",
    "UPPER CASE AND lower case AND MiXeD cAsE",
    " ".join(["Sentence embeddings map text to dense vectors for semantic search."] * 20),
    "\tTabs\tand\nnew lines\n",
    "a",
]


@pytest.mark.real_model
def test_minilm_embeddings_match_pytorch(minilm_dir: Path, tmp_path: Path) -> None:
    """Mean-pooled, normalized sentence embeddings from the ONNX graph and from PyTorch agree
    (cosine >= 0.9999) on varied text, run as padded batches."""
    package = export(minilm_dir, tmp_path / "package", ExportOptions(task="feature-extraction"))
    assert package.manifest["validation"]["passed"], package.manifest["validation"]
    tokenizer = AutoTokenizer.from_pretrained(package.path)
    session = cpu_session(package.model_path)
    names = [i.name for i in session.get_inputs()]
    model = torch_model(minilm_dir, "feature-extraction")
    assert pooling(model, classifier=False)["pooling"] == "mean"
    assert pooling(model, classifier=False)["normalize"] is True

    cosines = []
    for start in range(0, len(SENTENCES), 8):
        batch = SENTENCES[start:start + 8]
        feeds = right_padded(tokenizer, batch)
        (hidden,) = session.run(None, {n: feeds[n] for n in names})
        with torch.no_grad():
            want = model(**{n: torch.from_numpy(feeds[n]) for n in names}).last_hidden_state
        got_emb = _mean_pool(hidden, feeds["attention_mask"])
        want_emb = _mean_pool(want.numpy(), feeds["attention_mask"])
        cosines.extend(np.sum(got_emb * want_emb, axis=1).tolist())
    assert len(cosines) == len(SENTENCES) >= 20
    assert min(cosines) >= 0.9999, min(cosines)


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float64)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
