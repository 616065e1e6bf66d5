"""Every field of a KServe request is checked: each malformed request gets its status code and a
message that names the problem, and the server answers normally afterwards."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import llmopt
from llmopt import _proto
from llmopt.runtime.embedder import Embedder
from tests.server.conftest import DECODER, ENCODER

C = grpc.StatusCode
Request = Any


def _msg(name: str) -> Any:
    return _proto.message("inference." + name)


def infer(channel: grpc.Channel, request: Request) -> Any:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=_msg("ModelInferResponse").FromString)
    return call(request, timeout=30)


def ids_request(model: str = ENCODER, shape: tuple[int, ...] = (1, 3), name: str = "input_ids",
                datatype: str = "INT64", values: list[int] | None = None) -> Request:
    request = _msg("ModelInferRequest")(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    count = int(np.prod(shape))
    tensor.contents.int64_contents.extend(values if values is not None else [5] * count)
    return request


def text_request(*texts: bytes, shape: tuple[int, ...] | None = None) -> Request:
    request = _msg("ModelInferRequest")(model_name=DECODER)
    tensor = request.inputs.add(name="text_input", datatype="BYTES",
                                shape=shape or (len(texts),))
    tensor.contents.bytes_contents.extend(texts)
    return request


def edit(base: Callable[[], Request], change: Callable[[Request], None]) -> Callable[[], Request]:
    def make() -> Request:
        request = base()
        change(request)
        return request
    return make


def _raw(request: Request, data: bytes) -> None:
    request.inputs[0].ClearField("contents")
    request.raw_input_contents.append(data)


def _add(request: Request, **tensor: Any) -> None:
    request.inputs.add(**tensor)


CASES: list[tuple[str, Callable[[], Request], grpc.StatusCode, str]] = [
    ("unknown model", lambda: ids_request(model="nope"), C.NOT_FOUND, "no model named"),
    ("no model name", lambda: ids_request(model=""), C.INVALID_ARGUMENT, "model_name is empty"),
    ("unknown version", edit(ids_request, lambda r: setattr(r, "model_version", "7")),
     C.NOT_FOUND, "no version"),
    ("no inputs", lambda: _msg("ModelInferRequest")(model_name=ENCODER), C.INVALID_ARGUMENT,
     "no inputs"),
    ("unknown datatype", lambda: ids_request(datatype="INT128"), C.INVALID_ARGUMENT,
     "unknown datatype"),
    ("wrong datatype", lambda: ids_request(datatype="INT32"), C.INVALID_ARGUMENT,
     "carries int64_contents"),
    ("wrong dtype for the model", edit(
        lambda: _msg("ModelInferRequest")(model_name=ENCODER),
        lambda r: r.inputs.add(name="input_ids", datatype="FP32", shape=[1, 1],
                               contents={"fp32_contents": [1.0]})),
     C.INVALID_ARGUMENT, "must be INT64"),
    ("count off the shape", lambda: ids_request(values=[1, 2]), C.INVALID_ARGUMENT,
     "2 values in int64_contents"),
    ("negative dimension", lambda: ids_request(shape=(1, -3), values=[]), C.INVALID_ARGUMENT,
     "negative dimension"),
    ("empty dimension", lambda: ids_request(shape=(1, 0)), C.INVALID_ARGUMENT, "non-empty"),
    ("no shape", lambda: ids_request(shape=(), values=[1]), C.INVALID_ARGUMENT, "no shape"),
    ("rank 3", lambda: ids_request(shape=(1, 1, 3)), C.INVALID_ARGUMENT, "[batch, sequence]"),
    ("raw size off", edit(ids_request, lambda r: _raw(r, b"\0" * 23)), C.INVALID_ARGUMENT,
     "23 raw bytes"),
    ("raw count off", edit(ids_request, lambda r: r.raw_input_contents.extend([b"", b""])),
     C.INVALID_ARGUMENT, "2 raw_input_contents for 1 inputs"),
    ("raw and typed", edit(edit(ids_request, lambda r: _add(
        r, name="attention_mask", datatype="INT64", shape=[1, 3])),
        lambda r: r.raw_input_contents.extend([b"\0" * 24, b"\0" * 24])),
     C.INVALID_ARGUMENT, "typed contents in a request that uses raw"),
    ("duplicate input", edit(ids_request, lambda r: r.inputs.append(r.inputs[0])),
     C.INVALID_ARGUMENT, "appears twice"),
    ("unnamed input", lambda: ids_request(name=""), C.INVALID_ARGUMENT, "has no name"),
    ("unknown input", lambda: ids_request(name="pixels"), C.INVALID_ARGUMENT,
     "unknown input(s) ['pixels']"),
    ("input_ids missing", lambda: ids_request(name="attention_mask", values=[1, 1, 1]),
     C.INVALID_ARGUMENT, "input_ids tensor is missing"),
    ("shapes differ", edit(ids_request, lambda r: _add(
        r, name="attention_mask", datatype="INT64", shape=[1, 2],
        contents={"int64_contents": [1, 1]})), C.INVALID_ARGUMENT, "all of one shape"),
    ("past the context", lambda: ids_request(shape=(1, 65)), C.INVALID_ARGUMENT,
     "context is 64"),
    ("batch too large", lambda: ids_request(shape=(9, 2)), C.RESOURCE_EXHAUSTED, "at most 8"),
    ("huge shape", lambda: ids_request(shape=(2**31, 2**31), values=[]), C.RESOURCE_EXHAUSTED,
     "past its limit"),
    ("id past the vocabulary", lambda: ids_request(values=[5, 10**6, 5]), C.INVALID_ARGUMENT,
     "outside 0.."),
    ("negative id", lambda: ids_request(values=[5, -1, 5]), C.INVALID_ARGUMENT, "outside 0.."),
    ("mask not 0/1", edit(ids_request, lambda r: _add(
        r, name="attention_mask", datatype="INT64", shape=[1, 3],
        contents={"int64_contents": [1, 2, 1]})), C.INVALID_ARGUMENT, "other than 0 and 1"),
    ("unknown output", edit(ids_request, lambda r: r.outputs.add(name="pooler")),
     C.INVALID_ARGUMENT, "unknown output 'pooler'"),
    ("classification extension", edit(ids_request, lambda r: r.outputs.add(
        name="last_hidden_state", parameters={"classification": {"int64_param": 3}})),
     C.UNIMPLEMENTED, "classification"),
    ("shared memory", edit(ids_request, lambda r: r.inputs[0].parameters[
        "shared_memory_region"].CopyFrom(_msg("InferParameter")(string_param="r"))),
     C.INVALID_ARGUMENT, "shared memory"),
    ("unknown parameter", edit(ids_request, lambda r: r.parameters["colour"].CopyFrom(
        _msg("InferParameter")(string_param="red"))), C.INVALID_ARGUMENT,
     "unknown request parameter"),
    ("bad timeout", edit(ids_request, lambda r: r.parameters["timeout"].CopyFrom(
        _msg("InferParameter")(int64_param=-5))), C.INVALID_ARGUMENT, "timeout must be"),
    ("text not BYTES", lambda: ids_request(model=DECODER, name="text_input"),
     C.INVALID_ARGUMENT, "must be BYTES"),
    ("text not UTF-8", lambda: text_request(b"\xff\xfe"), C.INVALID_ARGUMENT, "not valid UTF-8"),
    ("text shape", lambda: text_request(b"a", b"b", shape=(1, 2)), C.INVALID_ARGUMENT,
     "text_input has shape [1, 2]"),
    ("raw BYTES framing", edit(lambda: text_request(b"hello"),
                               lambda r: _raw(r, struct.pack("<I", 50) + b"hello")),
     C.INVALID_ARGUMENT, "length-prefixed"),
    ("too many prompts", lambda: text_request(*[b"hi"] * 9), C.RESOURCE_EXHAUSTED, "at most 8"),
    ("prompt past the context", lambda: text_request(b"word " * 300), C.INVALID_ARGUMENT,
     "context is 256"),
    ("extra decoder input", edit(lambda: text_request(b"hi"), lambda r: _add(
        r, name="max_tokens", datatype="INT32", shape=[1], contents={"int_contents": [3]})),
     C.INVALID_ARGUMENT, "unknown input(s) ['max_tokens']"),
    ("decoder output", edit(lambda: text_request(b"hi"), lambda r: r.outputs.add(
        name="logits")), C.INVALID_ARGUMENT, "one output, text_output"),
    ("parameter without value", edit(lambda: text_request(b"hi"), lambda r: r.parameters[
        "max_tokens"].CopyFrom(_msg("InferParameter")())), C.INVALID_ARGUMENT, "has no value"),
    ("top_k past the vocabulary", edit(lambda: text_request(b"hi"), lambda r: r.parameters[
        "top_k"].CopyFrom(_msg("InferParameter")(int64_param=2**32 - 1))), C.INVALID_ARGUMENT,
     "beyond the vocabulary"),
]


@pytest.fixture(scope="module")
def channel(server: Any) -> Any:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.mark.parametrize(("make", "code", "text"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_malformed_request_gets_its_code(channel: Any, make: Callable[[], Request],
                                         code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        infer(channel, make())
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()


def test_an_empty_shape_gets_a_valid_example(channel: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        infer(channel, ids_request(shape=(0, 0), values=[]))
    assert info.value.code() == C.INVALID_ARGUMENT
    assert "e.g. [1, 8]" in info.value.details() and "[0, 0])" not in info.value.details()


def test_typed_contents_in_and_out(channel: Any, packages: dict[str, Path]) -> None:
    embedder = llmopt.load(packages[ENCODER])
    assert isinstance(embedder, Embedder)
    feed = embedder.tokenize(["hello world", "sea"])
    request = _msg("ModelInferRequest")(model_name=ENCODER)
    for name, array in feed.items():
        request.inputs.add(name=name, datatype="INT64", shape=array.shape,
                           contents={"int64_contents": array.reshape(-1).tolist()})
    response = infer(channel, request)
    assert not response.raw_output_contents  # typed in, typed out
    (output,) = response.outputs
    values = np.array(output.contents.fp32_contents, np.float32).reshape(output.shape)
    np.testing.assert_array_equal(values, embedder.session.run(None, feed)[0])
    text = infer(channel, text_request(b"hello world", b"the sea", shape=(2, 1)))
    assert list(text.outputs[0].shape) == [2, 1]
    assert len(text.outputs[0].contents.bytes_contents) == 2


def test_message_and_response_size_limits(start_server: Any, repository: Path) -> None:
    from llmopt.server import ServerConfig

    srv = start_server(repository, ServerConfig(max_message_bytes=100 * 1024))
    with grpc.insecure_channel(srv.address) as ch:
        big = ids_request(shape=(8, 2560), values=[])
        big.raw_input_contents.append(b"\0" * 8 * 8 * 2560)
        with pytest.raises(grpc.RpcError) as info:  # a 160 KiB request: grpc refuses it
            infer(ch, big)
        assert info.value.code() == C.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as info:  # 64 KiB of output would pass the limit
            infer(ch, ids_request(shape=(8, 64)))
        assert info.value.code() == C.RESOURCE_EXHAUSTED
        assert "response would hold 65536 bytes" in info.value.details()
        assert list(infer(ch, ids_request(shape=(1, 4))).outputs[0].shape) == [1, 4, 32]
