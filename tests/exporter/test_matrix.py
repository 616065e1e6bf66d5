"""The architecture matrix: every family llmopt exports, native or traced, through the whole
pipeline on a tiny random model: export -> validation -> Generator greedy tokens equal
transformers' generate -> optimize -> quantize int4, its fidelity measured and recorded.

``MATRIX`` is also the source of the README's "Supported models" table
(``tests/test_docs.py`` fails when the two drift).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmopt
from llmopt.errors import UnsupportedError
from llmopt.exporter import ExportOptions, export, registry, traced
from llmopt.quantizer import QuantizeOptions
from tests import tiny_decoders, tiny_families, tiny_gguf

NATIVE_ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra",
                   "mpnet")
DECODERS = sorted({*tiny_decoders.CONFIGS, *tiny_families.DECODERS})
ENCODERS = sorted({*NATIVE_ENCODERS, *tiny_families.ENCODERS})
MATRIX = [*DECODERS, *ENCODERS]
PROMPT = "the quick brown fox jumps over the lazy dog and"
# traced decoders whose attention goes through transformers' attention interface, so the trace
# holds one MultiHeadAttention node per layer (the others keep their own eager attention code);
# transformers 4.57 moved fewer families onto that interface
TRACED_ATTENTION = frozenset({"codegen", "exaone4", "gptj", "nemotron", "qwen2_moe",
                              "smollm3"})
TRACED_ATTENTION_TF4 = frozenset({"exaone4", "smollm3"})


def traced_attention() -> frozenset[str]:
    """The traced rows whose graph holds MultiHeadAttention under the installed transformers."""
    import transformers

    major = int(transformers.__version__.split(".", 1)[0])
    return TRACED_ATTENTION if major >= 5 else TRACED_ATTENTION_TF4


def expected_builder(model_type: str) -> str:
    try:
        registry.find(model_type, registry.default_task(model_type))
    except UnsupportedError:
        return "traced"
    return "native"


def test_the_matrix_is_broad() -> None:
    assert len(MATRIX) >= 25
    assert {"qwen3", "gemma", "gemma2", "gemma3_text", "phi", "gpt_neox", "stablelm", "olmo",
            "olmo2", "granite", "starcoder2", "mixtral", "falcon", "bloom"} <= set(DECODERS)
    assert not set(tiny_decoders.CONFIGS) & set(tiny_families.DECODERS)


def torch_greedy(source: Path, ids: list[int], n: int, **load: Any) -> list[int]:
    """transformers' greedy continuation of ``ids`` by the model in ``source`` (``load``:
    more ``from_pretrained`` arguments, such as ``gguf_file``), EOS a token like any other
    (as ``ignore_eos=True``: ``min_new_tokens`` would instead forbid it, a different argmax
    wherever EOS leads)."""
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager",
                                                 **load).eval()
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=n, pad_token_id=0)
    return [int(t) for t in out[0, len(ids):]]


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_pipeline(model_type: str, tmp_path: Path, record_property: Any) -> None:
    reason = tiny_families.missing(model_type)
    if reason:
        pytest.skip(reason)
    source = tiny_families.build_decoder(model_type, tmp_path / "source")
    package = export(source, tmp_path / "package", ExportOptions(generation_tokens=8))
    manifest = package.manifest
    assert manifest["builder"] == expected_builder(model_type)
    assert manifest["validation"]["passed"], manifest["validation"]
    assert {c["case"] for c in manifest["validation"]["cases"]} >= {
        "batch 2, left padding, past 0", "batch 1, one token, past > 0"}

    if manifest["builder"] == "traced":
        ops = {n.op_type for n in onnx.load(str(package.model_path)).graph.node}
        assert ("MultiHeadAttention" in ops) == (model_type in traced_attention()), ops

    generator = llmopt.load(package.path)
    ids = list(AutoTokenizer.from_pretrained(source)(PROMPT)["input_ids"])
    result = generator.generate(ids, max_new_tokens=10, ignore_eos=True)
    assert result.token_ids == torch_greedy(source, ids, 10)

    optimized = llmopt.optimize(package, tmp_path / "optimized",
                                llmopt.OptimizeOptions(generation_tokens=8))
    assert optimized.manifest["validation"]["passed"]
    step = optimized.manifest["steps"][-1]
    if manifest["builder"] == "native":
        assert any(f["fired"] for f in step["fusions"].values()), step["fusions"]
    assert step["nodes_after"] <= step["nodes_before"]

    quantized = llmopt.quantize(optimized, tmp_path / "int4",
                                QuantizeOptions.int4().with_(evaluate=False))
    from llmopt.evaluate import evaluate

    fidelity = evaluate(quantized, optimized, max_length=96, greedy_tokens=8)
    quantized.manifest.fidelity = fidelity  # recorded where `llmopt inspect` shows it
    quantized.write_manifest()
    record_property("int4_perplexity_delta_pct", round(fidelity["perplexity_delta_pct"], 3))
    assert quantized.manifest["steps"][-1]["quantized_matmuls"] > 0
    assert math.isfinite(fidelity["perplexity_delta_pct"]), fidelity
    # tiny random weights are far more fragile than trained ones; chance is 1/275
    assert fidelity["top1_agreement"] > 0.25, fidelity
    assert quantized.size_bytes() < optimized.size_bytes()


@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_export(model_type: str, tmp_path: Path) -> None:
    if model_type in tiny_families.ENCODERS:
        source = tiny_families.build_encoder(model_type, tmp_path / "source")
    else:
        from tests.exporter.test_encoders import build

        source = build(model_type, "feature-extraction", tmp_path / "source")
    package = export(source, tmp_path / "package")
    assert package.manifest["builder"] == expected_builder(model_type)
    assert package.manifest["validation"]["passed"], package.manifest["validation"]
    assert package.manifest["encoder"]["output"] == "last_hidden_state"
    embedder = llmopt.load(package.path)
    vectors = embedder.embed(["hello world", "the sea"])
    assert len(vectors) == 2
    optimized = llmopt.optimize(package, tmp_path / "optimized")
    assert optimized.manifest["validation"]["passed"]


# --- the README's "Supported models" table, generated from the registry and MATRIX ------------

TABLE_START = ("<!-- supported-models: generated by "
               "`python -m tests.exporter.test_matrix --write` -->")
TABLE_END = "<!-- /supported-models -->"


def _gguf(model_type: str) -> str:
    """Whether ``tests/exporter/test_gguf_archs.py`` exports the family from a GGUF file."""
    if model_type not in tiny_gguf.MODELS:
        return "no"
    return "yes (transformers 5)" if model_type in tiny_gguf.NEEDS_TRANSFORMERS_5 else "yes"


def supported_table() -> str:
    """Markdown: one row per architecture the matrix tests, with its builder, whether `optimize`
    fuses its attention into one op, whether it is exported from GGUF files (tested)."""
    rows = ["| `model_type` | kind | builder | fused attention | GGUF source |",
            "|---|---|---|---|---|"]
    for model_type in MATRIX:
        builder = expected_builder(model_type)
        kind = "decoder" if model_type in DECODERS else "encoder"
        fused = ("yes" if builder == "native" else
                 "MultiHeadAttention (copying KV cache)" if model_type in TRACED_ATTENTION_TF4
                 else "MultiHeadAttention (copying KV cache) under transformers 5; no under 4.57"
                 if model_type in TRACED_ATTENTION else "no (norm/GELU fusions only)")
        gguf = _gguf(model_type)
        rows.append(f"| `{model_type}` | {kind} | {builder} | {fused} | {gguf} |")
    return "\n".join([TABLE_START, *rows, TABLE_END])


def test_readme_table_matches_the_registry_and_the_matrix() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    assert start >= 0 and end > start, "README.md lost its supported-models markers"
    assert readme[start:end + len(TABLE_END)] == supported_table(), (
        "README's Supported models table is out of date: run "
        "`.venv/bin/python -m tests.exporter.test_matrix --write`")


def write_readme_table() -> None:
    path = Path(__file__).parents[2] / "README.md"
    readme = path.read_text()
    start, end = readme.index(TABLE_START), readme.index(TABLE_END) + len(TABLE_END)
    path.write_text(readme[:start] + supported_table() + readme[end:])


if __name__ == "__main__":  # python -m tests.exporter.test_matrix [--write]
    import sys

    if "--write" in sys.argv:
        write_readme_table()
    else:
        print(supported_table())


def test_a_trace_that_computes_something_else_fails_validation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that turns a shape into a Python number traces with the example's number baked
    in (what some modelling code does): validation, on several shapes, must catch it, name the
    differences and mark the package failed, never hand it on."""
    from transformers import AlbertModel

    source = tiny_families.build_encoder("albert", tmp_path / "source")
    forward = AlbertModel.forward

    def baking_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        length = float(out.last_hidden_state.shape[1])  # a Python number: traced as a constant
        out.last_hidden_state = out.last_hidden_state * (length / 5)
        return out

    monkeypatch.setattr(AlbertModel, "forward", baking_forward)
    with pytest.raises(llmopt.ValidationError, match="max abs diff"):
        export(source, tmp_path / "package")
    manifest = json.loads((tmp_path / "package" / "llmopt.json").read_text())
    assert manifest["builder"] == "traced" and manifest["validation"]["passed"] is False
    assert not all(c["passed"] for c in manifest["validation"]["cases"])


def test_tracing_leaves_the_model_in_eval_mode(tmp_path: Path) -> None:
    """torch.onnx.export restores its wrapper module's training mode, and a new wrapper is in
    training mode: unless the trace sets it to eval, the model it wraps is validated with its
    dropout on (DeBERTa-v2, MPNet and ELECTRA, dropout 0.1, failed validation that way)."""
    from transformers import AutoModel

    source = tiny_families.build_encoder("deberta-v2", tmp_path / "source")
    model = AutoModel.from_pretrained(source, attn_implementation="eager").eval()
    assert model.config.hidden_dropout_prob > 0
    traced.TracedArch("deberta-v2", "encoder").emit(model, "float32")
    assert not any(module.training for module in model.modules())
