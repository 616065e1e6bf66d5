"""KServe v2 REST through the real ``tritonclient.http``, compared with the gRPC door."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.server.conftest import CLASSIFIER, DECODER, ENCODER

http = pytest.importorskip("tritonclient.http")
grpc_client = pytest.importorskip("tritonclient.grpc")
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture
def triton(server: Any) -> Any:
    client = http.InferenceServerClient(server.http_url.split("://", 1)[1])
    yield client
    client.close()


def _inputs(module: Any, feed: dict[str, np.ndarray], binary: bool = True) -> list[Any]:
    inputs = []
    for name, array in feed.items():
        tensor = module.InferInput(name, list(array.shape), "INT64")
        if module is http:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_liveness_readiness_and_metadata(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    for name in (DECODER, ENCODER, CLASSIFIER):
        assert triton.is_model_ready(name) and triton.is_model_ready(name, "1")
    assert not triton.is_model_ready("nope")
    assert not triton.is_model_ready(ENCODER, "2")
    server = triton.get_server_metadata()
    assert server["name"] == "llmopt" and "binary_tensor_data" in server["extensions"]
    meta = triton.get_model_metadata(ENCODER)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["outputs"] == [{"name": "last_hidden_state", "datatype": "FP32",
                                "shape": [-1, -1, 32]}]
    assert triton.get_model_config(DECODER)["model_transaction_policy"]["decoupled"] is True
    with pytest.raises(http.InferenceServerException, match="no model named"):
        triton.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", [ENCODER, CLASSIFIER])
def test_encoder_infer_equals_grpc(triton: Any, server: Any, embedder: Any, name: str,
                                   binary: bool) -> None:
    feed = embedder.tokenize(TEXTS)
    with grpc_client.InferenceServerClient(server.address) as grpc_triton:
        expected = grpc_triton.infer(name, _inputs(grpc_client, feed))
    output = expected.get_response().outputs[0].name
    result = triton.infer(name, _inputs(http, feed, binary), request_id="r7",
                          outputs=[http.InferRequestedOutput(output, binary_data=binary)])
    np.testing.assert_array_equal(result.as_numpy(output), expected.as_numpy(output))
    assert result.get_response()["id"] == "r7"


def test_decoder_infer_over_rest(triton: Any, generator: Any) -> None:
    expected = generator.generate("hello world", max_new_tokens=8, ignore_eos=True)
    text = http.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hello world"], dtype=np.object_))
    result = triton.infer(DECODER, [text], parameters={"max_tokens": 8, "ignore_eos": True})
    assert result.as_numpy("text_output")[0].decode() == expected.text
    assert result.get_response()["parameters"]["generated_tokens"] == 8


def test_bad_infer_requests_are_400_in_triton_shape(triton: Any, server: Any) -> None:
    import json
    import urllib.error
    import urllib.request

    def post(body: bytes) -> tuple[int, Any]:
        request = urllib.request.Request(f"{server.http_url}/v2/models/{ENCODER}/infer",
                                         data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    for body in (b"{", b"[]", b'{"inputs": []}',
                 b'{"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", '
                 b'"data": [1.5, 2]}]}',
                 b'{"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", '
                 b'"data": [1, 2]}]}'):
        status, error = post(body)
        assert status == 400 and isinstance(error["error"], str), body
    status, ok = post(b'{"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": '
                      b'"INT64", "data": [[1, 2]]}]}')
    assert status == 200 and ok["outputs"][0]["shape"] == [1, 2, 32]
