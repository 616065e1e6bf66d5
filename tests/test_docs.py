"""Reference docs that cannot drift from the code: the gRPC API page is generated from proto/ and
must be current, the manifest schema must accept every llmopt.json the stages write (and
declare every key they write), and the prose docs must quote messages and names that exist."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import fields
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATOR = ROOT / "scripts" / "gen_api_docs.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- gRPC API reference ---------------------------------------------------------------------------

def test_grpc_api_doc_is_generated_from_the_current_protos() -> None:
    diff = _generator().check()
    assert not diff, ("docs/grpc-api.md is stale; run `python scripts/gen_api_docs.py`:\n"
                      + "\n".join(diff[:40]))


def test_check_mode_exits_1_with_a_hint_on_a_stale_page(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "grpc-api.md"
    stale.write_text((DOCS / "grpc-api.md").read_text().replace("| `Generate` |", "| `Gen` |"))
    assert _generator().main(["--check", "--output", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "python scripts/gen_api_docs.py" in err and "+| `Generate` |" in err


def test_every_rpc_the_server_registers_is_documented() -> None:
    from llmopt import _proto
    from llmopt.server.app import SERVICES

    page = (DOCS / "grpc-api.md").read_text()
    sections = re.split(r"^### Service ", page, flags=re.M)[1:]
    by_service = {s.split("`")[1]: s for s in sections}
    assert set(SERVICES) <= set(by_service), "a served service has no section"
    for name in SERVICES:
        service = _proto.service(name)
        section = by_service[name]
        for method in service.methods:
            assert f"| `{method.name}` |" in section, f"{name}/{method.name} is not documented"
            for message in (method.input_type, method.output_type):
                assert f'<a id="{message.full_name.lower().replace(".", "-")}"></a>' in page, (
                    f"{message.full_name} has no section")


# --- manifest schema ------------------------------------------------------------------------------

def _schema() -> dict[str, Any]:
    text = resources.files("llmopt.data").joinpath("manifest.schema.json").read_text("utf-8")
    return json.loads(text)


def _validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(manifest: dict[str, Any]) -> list[str]:
    return [f"{e.json_path}: {e.message[:300]}" for e in _validator().iter_errors(manifest)]


def _undeclared(manifest: dict[str, Any]) -> list[str]:
    """Keys written to the manifest (top level and its fixed-shape objects) that the schema
    does not declare: the schema tolerates them, the docs would silently miss them."""
    schema = _schema()
    defs = schema["$defs"]
    missing = [k for k in manifest if k not in schema["properties"]]
    for key, definition in (("source", "source"), ("onnx", "onnx"), ("kv_cache", "kv_cache"),
                            ("encoder", "encoder"), ("generation", "generation"),
                            ("validation", "validation"), ("fidelity", "fidelity")):
        value = manifest.get(key)
        if isinstance(value, dict):
            missing += [f"{key}.{k}" for k in value if k not in defs[definition]["properties"]]
    return missing


def test_schema_states_the_format_version_and_the_codes_vocabularies() -> None:
    from llmopt.exporter.options import DTYPES
    from llmopt.optimizer import FUSIONS, LEVELS
    from llmopt.package import SCHEMA_VERSION, TASKS
    from llmopt.quantizer.options import METHODS

    schema = _schema()
    _validator()  # the schema itself is valid draft 2020-12
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert schema["properties"]["task"]["enum"] == list(TASKS)
    assert schema["$defs"]["dtype"]["enum"] == list(DTYPES)
    optimize = schema["$defs"]["optimize_step"]["properties"]["options"]["properties"]
    assert optimize["level"]["enum"] == list(LEVELS)
    assert optimize["fusions"]["oneOf"][0]["items"]["enum"] == list(FUSIONS)
    methods = schema["$defs"]["quantize_step"]["properties"]["method"]["enum"]
    assert methods == [*METHODS, "int4_gguf"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama exported, optimized and quantized to int4, and a tiny BERT embedder
    exported."""
    from llmopt.exporter import export
    from llmopt.optimizer import optimize
    from llmopt.quantizer import QuantizeOptions, quantize
    from tests import tiny_decoders
    from tests.exporter.test_encoders import build as build_encoder

    root = tmp_path_factory.mktemp("docs")
    source = tiny_decoders.build("llama", root / "llama")
    fp32 = export(source, root / "llama-fp32")
    fused = optimize(fp32, root / "llama-o2")
    int4 = quantize(fused, root / "llama-int4", QuantizeOptions.int4().with_(evaluate=False))
    (root / "bert").mkdir()
    bert = export(build_encoder("bert", "feature-extraction", root / "bert"), root / "bert-fp32")
    return {"export": fp32.path, "optimize": fused.path, "quantize": int4.path,
            "encoder": bert.path}


@pytest.fixture(scope="module")
def manifests(packages: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """llmopt.json of each of ``packages``."""
    return {name: json.loads((path / "llmopt.json").read_text())
            for name, path in packages.items()}


@pytest.mark.parametrize("stage", ["export", "optimize", "quantize", "encoder"])
def test_every_manifest_the_stages_write_matches_the_schema(
        manifests: dict[str, dict[str, Any]], stage: str) -> None:
    manifest = manifests[stage]
    assert not _errors(manifest), "\n".join(_errors(manifest))
    undeclared = _undeclared(manifest)
    assert not undeclared, f"keys missing from manifest.schema.json: {undeclared}"


@pytest.mark.parametrize("stage", ["export", "optimize", "quantize", "encoder"])
def test_every_manifest_the_stages_write_round_trips(packages: dict[str, Path],
                                                     stage: str) -> None:
    from tests.test_manifest import assert_round_trips

    assert_round_trips(packages[stage])


def test_a_derived_package_records_its_lineage(manifests: dict[str, dict[str, Any]]) -> None:
    steps = manifests["quantize"]["steps"]
    assert [s["stage"] for s in steps] == ["export", "optimize", "quantize"]
    assert steps[:2] == manifests["optimize"]["steps"]
    assert steps[1]["parent"].endswith("llama-fp32") and steps[2]["parent"].endswith("llama-o2")
    assert manifests["quantize"]["source"] == manifests["export"]["source"]
    assert manifests["quantize"]["validation"] is None
    assert manifests["optimize"]["validation"]["reference"] == "onnx"


def test_the_schema_rejects_what_readers_would_misread(
        manifests: dict[str, dict[str, Any]]) -> None:
    good = manifests["quantize"]
    newer = {**good, "schema_version": good["schema_version"] + 1}
    unknown_stage = {**good, "steps": [*good["steps"], {"stage": "prune", "time": "x"}]}
    no_export = {**good, "steps": good["steps"][1:]}
    no_task = {k: v for k, v in good.items() if k != "task"}
    for bad in (newer, unknown_stage, no_export, no_task):
        assert _errors(bad)
    detailed = json.loads(json.dumps(good))
    detailed["steps"][-1]["a_new_detail"] = 1  # stages may add details to their steps
    assert not _errors(detailed)


def test_the_architecture_example_is_a_valid_manifest() -> None:
    text = (DOCS / "architecture.md").read_text()
    block = re.search(r"<!-- manifest-example -->\s*```json\n(.*?)\n```", text, re.S)
    assert block, "docs/architecture.md lost its marked llmopt.json example"
    example = json.loads(block.group(1))
    assert not _errors(example), "\n".join(_errors(example))
    assert not _undeclared(example)
    for key in _schema()["properties"]:
        assert f"`{key}`" in text, f"docs/architecture.md does not explain `{key}`"


# --- prose docs quote what exists -----------------------------------------------------------------

def _source_text() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "llmopt").rglob("*.py")
                     if "_proto" not in p.parts)


# Fragments of the messages docs/troubleshooting.md quotes, as the code spells them.
MESSAGES = (
    "offline, set HF_HUB_OFFLINE=1 to use the",
    "has no safetensors weights; its pickled weights",
    "needs code from its repository to load",
    "is not supported; supported: ",
    "is not a GGUF file (it does not start with the GGUF magic bytes)",
    "could not read GGUF file",
    "its header is unreadable (",
    "GGUF loader would build another model than the file holds",
    "cannot read {arch!r} models ",
    "dequantize for transformers: ",
    "strict providers (--strict-providers) to allow the fallback",
    "llmopt's CPU kernels cannot run here: ",
    "is a link: ONNX Runtime refuses weights files behind symbolic ",
    "was requested but onnxruntime could not load it",
    "is not installed in this onnxruntime build",
    "onnxruntime could not create a session on",
    "is already quantized (",
    "optimize before quantizing",
    "does not divide the input size",
    "int4 block size {self.block_size} is not supported",
    "calibration file {path} does not exist",
    "cannot bind {address}: {reason}",
    "cannot serve metrics on {host}:{port}",
    "missing or invalid bearer token",
    "TLS needs both --tls-cert and --tls-key",
    "cannot read TLS file {path}",
    "could not download {model.requirement} for model",
    "has SHA-256 {digest.hexdigest()}, expected {model.sha256}",
    "cannot create the model cache",
    "port {options.port} on 127.0.0.1 is in use",
    "is not a file, a directory, a hub id or a model llmopt fetches",
)


def test_troubleshooting_quotes_messages_the_code_prints() -> None:
    page = (DOCS / "troubleshooting.md").read_text()
    code = _source_text()
    for fragment in MESSAGES:
        assert fragment in code, f"the code no longer says {fragment!r}"
        for piece in filter(None, (p.strip(" :,(") for p in re.split(r"\{[^}]*\}", fragment))):
            assert piece in page, f"docs/troubleshooting.md does not quote {piece!r}"


def test_adding_an_architecture_names_every_field_of_the_descriptions() -> None:
    from llmopt.exporter.decoder import DecoderArch, DecoderNames

    page = (DOCS / "adding-an-architecture.md").read_text()
    for cls in (DecoderArch, DecoderNames):
        for field in fields(cls):
            assert f"`{field.name}`" in page, f"{cls.__name__}.{field.name} is not explained"
    for path in ("llmopt/exporter/architectures/decoders.py", "tests/tiny_decoders.py",
                 "tests/exporter/test_decoders.py"):
        assert (ROOT / path).is_file() and path in page
