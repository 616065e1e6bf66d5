"""The KServe v2 / Triton protocol, through the real tritonclient package."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llmopt
from llmopt.runtime.embedder import Embedder
from llmopt.runtime.generator import Generator
from tests.server.conftest import CLASSIFIER, DECODER, ENCODER

tc = pytest.importorskip("tritonclient.grpc")
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "sea"]


@pytest.fixture
def triton(server: Any) -> Any:
    client = tc.InferenceServerClient(server.address)
    yield client
    client.close()


def _inputs(feed: dict[str, np.ndarray]) -> list[Any]:
    inputs = []
    for name, array in feed.items():
        tensor = tc.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _text(prompt: str) -> Any:
    tensor = tc.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return tensor


def test_server_and_model_readiness(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    for name in (DECODER, ENCODER, CLASSIFIER):
        assert triton.is_model_ready(name)
        assert triton.is_model_ready(name, "1")
    assert not triton.is_model_ready("nope")
    assert not triton.is_model_ready(ENCODER, "2")
    metadata = triton.get_server_metadata(as_json=True)
    assert metadata["name"] == "llmopt" and "model_repository" in metadata["extensions"]


def test_model_metadata_and_config(triton: Any) -> None:
    meta = triton.get_model_metadata(ENCODER, as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        (n, "INT64", ["-1", "-1"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert meta["outputs"] == [{"name": "last_hidden_state", "datatype": "FP32",
                                "shape": ["-1", "-1", "32"]}]
    assert triton.get_model_metadata(CLASSIFIER, as_json=True)["outputs"][0]["name"] == "logits"
    decoder = triton.get_model_metadata(DECODER, as_json=True)
    assert decoder["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": ["-1"]}]
    config = triton.get_model_config(DECODER, as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True
    assert triton.get_model_config(ENCODER, as_json=True)["config"]["input"][0][
        "data_type"] == "TYPE_INT64"
    with pytest.raises(tc.InferenceServerException, match="NOT_FOUND"):
        triton.get_model_metadata("nope")


@pytest.mark.parametrize("name", [ENCODER, CLASSIFIER])
def test_infer_on_an_encoder_equals_in_process(triton: Any, packages: dict[str, Path],
                                               name: str) -> None:
    embedder = llmopt.load(packages[name])
    assert isinstance(embedder, Embedder)
    feed = embedder.tokenize(TEXTS)
    expected = embedder.session.run(None, feed)[0]
    result = triton.infer(name, _inputs(feed), request_id="r1")
    output = result.as_numpy(embedder.output)
    assert output.dtype == np.float32 and output.shape == expected.shape
    np.testing.assert_array_equal(output, expected)
    assert result.get_response().id == "r1"
    # attention_mask and token_type_ids are optional; only the requested output comes back
    ids_only = {"input_ids": feed["input_ids"][:1, :3]}
    out = triton.infer(name, _inputs(ids_only),
                       outputs=[tc.InferRequestedOutput(embedder.output)])
    full = {"input_ids": ids_only["input_ids"], "attention_mask": np.ones((1, 3), np.int64),
            "token_type_ids": np.zeros((1, 3), np.int64)}
    np.testing.assert_array_equal(out.as_numpy(embedder.output),
                                  embedder.session.run(None, full)[0])


def test_infer_and_stream_on_a_decoder(triton: Any, packages: dict[str, Path]) -> None:
    generator = llmopt.load(packages[DECODER])
    assert isinstance(generator, Generator)
    expected = generator.generate("hello world", max_new_tokens=12, ignore_eos=True)
    result = triton.infer(DECODER, [_text("hello world")],
                          parameters={"max_tokens": 12, "ignore_eos": True})
    assert result.as_numpy("text_output").tolist() == [expected.text.encode()]
    params = result.get_response().parameters
    assert params["finish_reason"].string_param == "length"
    assert params["generated_tokens"].int64_param == 12
    drafted = triton.infer(DECODER, [_text("hello world")],
                           parameters={"max_tokens": 12, "ignore_eos": True, "prompt_lookup": 3})
    assert drafted.as_numpy("text_output").tolist() == [expected.text.encode()]
    accepted = drafted.get_response().parameters["accepted_draft_tokens"].int64_param
    assert 0 <= accepted < 12
    predicted = triton.infer(DECODER, [_text("hello world")], parameters={
        "max_tokens": 12, "ignore_eos": True, "prediction": expected.text})
    assert predicted.as_numpy("text_output").tolist() == [expected.text.encode()]
    assert predicted.get_response().parameters["accepted_draft_tokens"].int64_param > 6

    responses: queue.Queue[Any] = queue.Queue()
    triton.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for empty_final in (True, False):
            triton.async_stream_infer(DECODER, [_text("hello world")], request_id="s",
                                      parameters={"max_tokens": 12, "ignore_eos": True},
                                      enable_empty_final_response=empty_final)
            text, finals = b"", 0
            while not finals:
                got, error = responses.get(timeout=30)
                assert error is None
                response = got.get_response()
                finals += response.parameters["triton_final_response"].bool_param
                out = got.as_numpy("text_output")
                text += b"" if out is None else out[0]
            assert text == expected.text.encode()
        triton.async_stream_infer("nope", [_text("x")])
        got, error = responses.get(timeout=30)
        assert got is None and "no model named 'nope'" in str(error)
        triton.async_stream_infer(DECODER, [_text("hi")], parameters={"max_tokens": 2})
        got, error = responses.get(timeout=30)  # the stream survived the failed request
        assert error is None
    finally:
        triton.stop_stream()


@pytest.mark.parametrize(("parameters", "match"), [
    ({"max_tokens": "many"}, "must be int"),
    ({"max_tokens": 0}, "max_new_tokens must be"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"flavour": "vanilla"}, "unknown request parameter"),
    ({"stop": "[1, 2]"}, "JSON list"),
])
def test_bad_decoder_parameters(triton: Any, parameters: dict, match: str) -> None:
    with pytest.raises(tc.InferenceServerException, match=match) as info:
        triton.infer(DECODER, [_text("hello")], parameters=parameters)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_repository_index_load_and_unload(triton: Any) -> None:
    index = {m["name"]: m for m in triton.get_model_repository_index(as_json=True)["models"]}
    assert index[ENCODER]["state"] == "READY"
    try:
        triton.unload_model(CLASSIFIER)
        assert not triton.is_model_ready(CLASSIFIER)
        assert triton.is_server_ready()  # an unloaded model is not a failed one
        index = triton.get_model_repository_index(as_json=True)["models"]
        assert {"name": CLASSIFIER, "version": "1", "state": "UNAVAILABLE",
                "reason": "unloaded"} in index
        with pytest.raises(tc.InferenceServerException, match="UNAVAILABLE"):
            triton.infer(CLASSIFIER, _inputs({"input_ids": np.ones((1, 2), np.int64)}))
        with pytest.raises(tc.InferenceServerException, match="unknown option"):
            triton.load_model(CLASSIFIER, config=json.dumps({"max_batch": 2}))
        assert not triton.is_server_ready()  # that load failed: the model is wanted, not ready
        with pytest.raises(tc.InferenceServerException) as failed:  # says why, with one fix
            triton.infer(CLASSIFIER, _inputs({"input_ids": np.ones((1, 2), np.int64)}))
        assert "unknown option" in str(failed.value) and str(failed.value).count("fix:") == 1
    finally:
        triton.load_model(CLASSIFIER, config=json.dumps({"max_batch_size": 2}))
    assert triton.is_model_ready(CLASSIFIER) and triton.is_server_ready()
    with pytest.raises(tc.InferenceServerException, match="at most 2"):
        triton.infer(CLASSIFIER, _inputs({"input_ids": np.ones((3, 2), np.int64)}))
    triton.load_model(CLASSIFIER)  # back to the defaults
    with pytest.raises(tc.InferenceServerException, match="NOT_FOUND"):
        triton.load_model("no-such-model")


def test_unimplemented_triton_rpcs_say_so(triton: Any) -> None:
    with pytest.raises(tc.InferenceServerException, match="UNIMPLEMENTED"):
        triton.get_inference_statistics()
