"""The typed manifest: properties over llmopt.json, the check on open, derivation, and a
byte-identical round trip (also asserted on every package kind the stage tests build, through
:func:`assert_round_trips`)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import PackageError
from llmopt.manifest import Manifest
from llmopt.package import MANIFEST_NAME, Package

ROOT = Path(__file__).resolve().parents[1]


def assert_round_trips(package: Package | Path) -> None:
    """Opening a package and writing its manifest back changes no byte of llmopt.json."""
    path = package.path if isinstance(package, Package) else Path(package)
    text = (path / MANIFEST_NAME).read_text()
    assert Package.open(path).manifest.to_json() + "\n" == text


@pytest.fixture
def document() -> dict[str, Any]:
    """The int4 Llama manifest docs/architecture.md shows (kept valid by tests/test_docs.py)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- manifest-example -->\s*```json\n(.*?)\n```", text, re.S)
    assert block
    return json.loads(block.group(1))


def test_properties_read_the_document(document: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(document)
    assert manifest.vocab_size == document["signature"]["outputs"][0]["shape"][-1] == 275
    assert manifest.kv_cache == document["kv_cache"] and manifest.encoder is None
    assert manifest.context_length == 256
    assert manifest.eos_token_ids == (2,) and manifest.pad_token_id == 3
    assert manifest.stages == ("export", "optimize", "quantize")
    assert manifest.quantization == "int4"
    assert manifest.input_names[:2] == ["input_ids", "attention_mask"]
    assert (manifest.task, manifest.is_decoder, manifest.builder) == ("text-generation", True,
                                                                     "native")
    assert manifest.labels == {}
    assert dict(manifest) == document  # the mapping is the document, unchanged


def test_an_encoder_reads_its_own_layout(document: dict[str, Any]) -> None:
    encoder = {"inputs": ["input_ids", "attention_mask"], "output": "last_hidden_state",
               "padding_side": "right", "pad_token_id": None, "hidden_size": 32,
               "num_layers": 2, "num_attention_heads": 2, "max_positions": 128,
               "num_labels": None, "dtype": "float32", "pooling": "mean", "normalize": True,
               "pooling_from": "default"}
    document.update(task="feature-extraction", kv_cache=None, generation=None, encoder=encoder,
                    steps=document["steps"][:1])
    manifest = Manifest.from_dict(document)
    assert (manifest.context_length, manifest.pad_token_id) == (128, 0)
    assert manifest.eos_token_ids == () and manifest.quantization is None


def test_the_round_trip_keeps_order_and_unknown_keys(document: dict[str, Any]) -> None:
    document["a_key_from_a_newer_llmopt"] = {"z": 1, "a": 2}
    text = json.dumps(document, indent=2)
    assert Manifest.from_dict(json.loads(text)).to_json() == text


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: d.pop("task"), "missing `task`"),
    (lambda d: d["kv_cache"].pop("num_kv_heads"), "missing `kv_cache.num_kv_heads`"),
    (lambda d: d.update(kv_cache=None), "text-generation package needs `kv_cache`"),
    (lambda d: d.update(signature=[]), "`signature` is list, not an object"),
    (lambda d: d.update(task="translation"), "unknown task 'translation'"),
    (lambda d: d.update(steps=d["steps"][1:]), "does not start with the export step"),
    (lambda d: d["signature"].update(outputs=[]), "`signature.outputs` is empty"),
    (lambda d: d.update(schema_version=2), "has schema version 2; this llmopt reads up to 1"),
])
def test_a_damaged_manifest_fails_on_open_naming_the_key(
        document: dict[str, Any], tmp_path: Path, damage: Any, message: str) -> None:
    damage(document)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(document))
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(PackageError, match=re.escape(message)) as caught:
        Package.open(tmp_path)
    assert caught.value.fix  # every refusal says how to get a good package


def test_unreadable_json_is_a_package_error(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(PackageError, match="is unreadable"):
        Package.open(tmp_path)


def test_derived_records_the_step_and_resets_what_the_new_graph_invalidates(
        document: dict[str, Any]) -> None:
    document["validation"] = {"passed": True}
    parent = Manifest.from_dict(document)
    before = copy.deepcopy(document)
    signature = {"inputs": document["signature"]["inputs"][:1],
                 "outputs": document["signature"]["outputs"][:1]}
    step = {"stage": "quantize", "time": "t", "method": "int8", "parent": "p"}
    child = parent.derived("quantize", signature, step, dtype="float16",
                           kv_cache={"shared_buffer": False})
    assert child.steps == [*before["steps"], step] and child.last_step is child.steps[-1]
    assert child.signature == signature
    assert child.validation is None and child.fidelity is None and "fidelity" in child
    assert child.dtype == "float16" and child.kv_cache is not None
    assert child.kv_cache["dtype"] == "float16" and child.kv_cache["shared_buffer"] is False
    assert parent.to_dict() == before  # the parent's manifest is untouched
    child.update_step(seconds=1.5)
    assert child.last_step["seconds"] == 1.5 and parent.to_dict() == before


def test_optimize_leaves_fidelity_absent(document: dict[str, Any]) -> None:
    document["steps"] = document["steps"][:1]
    document.pop("fidelity")  # an exported package has none yet
    child = Manifest.from_dict(document).derived(
        "optimize", document["signature"], {"stage": "optimize", "time": "t"})
    assert "fidelity" not in child


def test_the_library_reads_the_manifest_through_its_properties() -> None:
    """Key paths into llmopt.json live in llmopt/manifest.py alone; everywhere else reads a
    property, so a format change has one place to go. (The gRPC client's ModelDetails.manifest
    is the JSON the server sent, a plain dict.)"""
    pattern = re.compile(r"manifest(\[|\.get\()")
    allowed = {"llmopt/manifest.py", "llmopt/cli/cmd_generate.py"}
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in sorted((ROOT / "llmopt").rglob("*.py"))
                 if str(path.relative_to(ROOT)) not in allowed
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []
