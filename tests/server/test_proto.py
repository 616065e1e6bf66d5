"""The protocol files: generated descriptors match the .proto sources, the KServe service matches
Triton's published one name for name and number for number, and docs/grpc.md covers them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from llmopt import _proto
from llmopt._proto import generate

ROOT = Path(__file__).resolve().parents[2]


def _files(data: bytes) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(data).file}


def test_checked_in_descriptors_equal_a_fresh_protoc_run(tmp_path: Path) -> None:
    from llmopt._proto.descriptors import FILE_DESCRIPTOR_SET

    fresh = generate.descriptor_set()
    assert _files(FILE_DESCRIPTOR_SET) == _files(fresh), (
        "llmopt/_proto/descriptors.py is stale: run `make proto`")
    out = tmp_path / "descriptors.py"
    generate.main(out)
    assert out.read_text().startswith('"""Generated from proto/')


def test_every_proto_file_is_laid_out_by_its_package() -> None:
    for name, file in _files(generate.descriptor_set()).items():
        assert Path(name).parent.as_posix() == file.package.replace(".", "/"), name


def _fields(message: Any) -> dict[str, tuple[Any, ...]]:
    """name -> (number, wire type, message or enum type, repeated, oneof)."""
    return {f.name: (f.number, f.type, f.message_type.full_name if f.message_type else
                     f.enum_type.full_name if f.enum_type else "", f.is_repeated,
                     f.containing_oneof.name if f.containing_oneof else None)
            for f in message.fields}


def _messages(file: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def walk(message: Any) -> None:
        found[message.full_name] = message
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return found


def test_kserve_messages_match_tritonclients_published_proto() -> None:
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    theirs_pool = service_pb2.DESCRIPTOR.pool
    ours = {}
    for name in ("inference/grpc_service.proto", "inference/model_config.proto"):
        ours.update(_messages(_proto.pool().FindFileByName(name)))
    assert len(ours) > 30
    for full_name, message in ours.items():
        theirs = theirs_pool.FindMessageTypeByName(full_name)
        their_fields = _fields(theirs)
        for name, spec in _fields(message).items():
            assert their_fields.get(name) == spec, f"{full_name}.{name}: {spec} vs Triton's"
    data_type = _proto.pool().FindEnumTypeByName("inference.DataType")
    theirs_enum = theirs_pool.FindEnumTypeByName("inference.DataType")
    assert {v.name: v.number for v in data_type.values} == {
        v.name: v.number for v in theirs_enum.values}


def test_kserve_methods_match_tritonclients_service() -> None:
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = _proto.service(_proto.KSERVE_SERVICE)
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming) == (
            other.input_type.full_name, other.output_type.full_name,
            other.client_streaming, other.server_streaming), method.name
    required = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                "ModelInfer", "ModelStreamInfer", "ModelConfig", "RepositoryIndex",
                "RepositoryModelLoad", "RepositoryModelUnload"}
    assert required == {m.name for m in ours.methods}


def test_tritonclient_and_llmopt_messages_live_in_one_process() -> None:
    pytest.importorskip("tritonclient.grpc")
    request = _proto.message("inference.ModelInferRequest")(model_name="m")
    from tritonclient.grpc import service_pb2

    theirs = service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.model_name == "m"


def test_first_use_from_many_threads_makes_one_class_per_message() -> None:
    """Two threads building one message class would make two classes that refuse each other's
    instances; run in a fresh interpreter, where nothing is built yet."""
    script = (
        "import threading\n"
        "from llmopt.client import _common as c\n"
        "errors = []\n"
        "def go():\n"
        "    try:\n"
        "        c.generate_request('m', [{'role': 'user', 'content': 'hi'}], None, True, {})\n"
        "    except Exception as exc:\n"
        "        errors.append(exc)\n"
        "threads = [threading.Thread(target=go) for _ in range(32)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "assert not errors, errors\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


def test_docs_cover_every_rpc_option_and_status() -> None:
    from llmopt.server.config import ModelConfig
    from llmopt.server.status import CODES

    text = (ROOT / "docs" / "grpc.md").read_text()
    documented = set(re.findall(r"^#### `(\w+)`", text, re.MULTILINE))
    methods = {m.name for s in (_proto.LLMOPT_SERVICE, _proto.KSERVE_SERVICE)
               for m in _proto.service(s).methods}
    assert documented == methods
    section = text.split("## Model configuration")[1].split("\n## ")[0]
    options = re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE)
    assert options == list(ModelConfig.__dataclass_fields__)
    errors = text.split("## Errors")[1].split("\n## ")[0]
    statuses = set(re.findall(r"^\| ([A-Z_]+) \|", errors, re.MULTILINE))
    assert statuses == {code.name for code in CODES.values()} - {"UNKNOWN", "CANCELLED"}
