"""The KServe v2 / Triton ``inference.GRPCInferenceService`` over the model repository.

Encoders take ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (INT64 ``[batch,
sequence]``) and return their session's outputs (``last_hidden_state`` or ``logits``, FP32).
Decoders take a BYTES ``text_input`` and return ``text_output`` (see kserve_params).
Responses mirror the request: raw output bytes when the inputs came raw, typed contents
otherwise. ModelStreamInfer answers the requests of one stream in order; a decoder's answer is
one response per text delta, the last flagged ``triton_final_response``; a failed request is
answered with ``error_message`` and the stream stays open.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np

from llmopt import _proto
from llmopt.errors import InvalidInputError, UnsupportedError
from llmopt.manifest import TensorSpec
from llmopt.runtime.sequence import GenerationResult
from llmopt.server.deadline import request_timeout
from llmopt.server.kserve_params import (
    TEXT_INPUT,
    TEXT_OUTPUT,
    DecoderRequest,
    check_reserved,
    decoder_request,
    value,
)
from llmopt.server.llmopt_api import Generation
from llmopt.server.metrics import Metrics
from llmopt.server.models import Decoder, Encoder, ServedModel
from llmopt.server.repository import READY, ModelRepository
from llmopt.server.rpc import as_llmopt
from llmopt.server.status import ModelNotFoundError, RequestTooLargeError, code_of
from llmopt.server.tensors import NUMPY_TO_KSERVE, decode_inputs, encode_outputs, output_bytes

VERSION = "1"
EXTENSIONS = ["model_repository", "model_configuration", "parameters"]
ENVELOPE_BYTES = 64 * 1024  # room for everything in a response besides tensor data


class KServeService:
    def __init__(self, repository: ModelRepository, metrics: Metrics,
                 draining: Callable[[], bool], max_message_bytes: int) -> None:
        self.repository = repository
        self.metrics = metrics
        self.draining = draining
        self.max_message_bytes = max_message_bytes

    # -- health and metadata ----------------------------------------------------------------

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _msg("ServerLiveResponse")(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _msg("ServerReadyResponse")(ready=not self.draining() and self.repository.ready())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        ready = request.version in ("", VERSION) and any(
            m.name == request.name for m in self.repository.loaded())
        return _msg("ModelReadyResponse")(ready=ready and not self.draining())

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        from llmopt import __version__

        return _msg("ServerMetadataResponse")(name="llmopt", version=__version__,
                                              extensions=EXTENSIONS)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        _check_version(request.name, request.version)
        inputs, outputs, platform = self._signature(request.name)
        tensor = _msg("ModelMetadataResponse").TensorMetadata
        return _msg("ModelMetadataResponse")(
            name=request.name, versions=[VERSION], platform=platform,
            inputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in inputs],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in outputs])

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        _check_version(request.name, request.version)
        inputs, outputs, platform = self._signature(request.name)
        config = _msg("ModelConfig")(name=request.name, platform=platform,
                                     backend="onnxruntime", max_batch_size=0)
        for name, datatype, shape in inputs:
            config.input.add(name=name, data_type=_config_type(datatype), dims=shape,
                             optional=name in ("attention_mask", "token_type_ids"))
        for name, datatype, shape in outputs:
            config.output.add(name=name, data_type=_config_type(datatype), dims=shape)
        config.model_transaction_policy.decoupled = platform == "llmopt_generate"
        return _msg("ModelConfigResponse")(config=config)

    def _signature(self, name: str) -> tuple[list[Any], list[Any], str]:
        package = self.repository.package(name)
        if package.is_decoder:
            return ([(TEXT_INPUT, "BYTES", [-1])], [(TEXT_OUTPUT, "BYTES", [-1])],
                    "llmopt_generate")
        signature = package.manifest.signature

        def tensors(specs: list[TensorSpec]) -> list[Any]:
            return [(t["name"], NUMPY_TO_KSERVE.get(t["dtype"], t["dtype"].upper()),
                     [d if isinstance(d, int) else -1 for d in t["shape"]])
                    for t in specs]

        return (tensors(signature["inputs"]), tensors(signature["outputs"]),
                "onnxruntime_onnx")

    # -- inference ----------------------------------------------------------------------------

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._model(request)
        if isinstance(model, Decoder):
            return self._generate(model, request, context)
        assert isinstance(model, Encoder)
        return self._encode(model, request, context)

    def ModelStreamInfer(self, requests: Iterator[Any],
                         context: grpc.ServicerContext) -> Iterator[Any]:
        current: list[Generation] = []
        context.add_callback(lambda: _cancel(current))
        stream_response = _msg("ModelStreamInferResponse")
        for request in requests:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                model = self._model(request)
                if isinstance(model, Decoder):
                    yield from self._stream_generate(model, request, current, context)
                else:
                    assert isinstance(model, Encoder)
                    response = self._encode(model, request, context)
                    response.parameters["triton_final_response"].bool_param = True
                    yield stream_response(infer_response=response)
            except Exception as exc:  # noqa: BLE001 - a failed request must not end the stream
                error = as_llmopt(exc, "ModelStreamInfer")
                code = code_of(error)
                yield stream_response(error_message=str(error), infer_response=_msg(
                    "ModelInferResponse")(model_name=request.model_name, id=request.id))
            finally:
                current.clear()
                self.metrics.rpc("ModelStreamInfer/request", request.model_name, code,
                                 time.perf_counter() - started)
            if not context.is_active():
                return

    def _model(self, request: Any) -> ServedModel:
        if not request.model_name:
            raise InvalidInputError("model_name is empty", fix="name the model to run")
        _check_version(request.model_name, request.model_version)
        return self.repository.get(request.model_name)

    def _encode(self, model: Encoder, request: Any, context: grpc.ServicerContext) -> Any:
        tensors = decode_inputs(request, self.max_message_bytes)
        feed = model.check_feed(tensors)
        timeout = request_timeout(context, check_reserved(request.parameters),
                                  model.config.request_timeout_s)
        names = self._requested(request, model.outputs)
        arrays = model.run(feed, names, timeout)
        return self._response(request, list(zip(names, arrays, strict=True)))

    def _generate(self, model: Decoder, request: Any, context: grpc.ServicerContext) -> Any:
        spec = self._decoder_request(model, request)
        timeout = request_timeout(context, spec.timeout, model.config.request_timeout_s)
        generations: list[Generation] = []
        context.add_callback(lambda: _cancel(generations))
        try:
            for prompt in spec.prompts:
                generations.append(Generation(model, prompt, spec.params, chat=spec.chat,
                                              metrics=self.metrics, timeout=timeout))
        except Exception:
            _cancel(generations)  # one prompt refused (queue full, too long): drop the batch
            raise
        results = [g.result() for g in generations]
        texts = np.empty(len(results), dtype=np.object_)
        texts[:] = [r.text.encode() for r in results]
        response = self._response(request, [(TEXT_OUTPUT, texts.reshape(spec.shape))])
        if len(results) == 1:
            _result_parameters(response, results[0])
        return response

    def _stream_generate(self, model: Decoder, request: Any, current: list[Generation],
                         context: grpc.ServicerContext) -> Iterator[Any]:
        spec = self._decoder_request(model, request)
        if len(spec.prompts) != 1:
            raise InvalidInputError("a streamed request takes one prompt",
                                    fix=f"send {TEXT_INPUT} of shape [1]")
        generation = Generation(model, spec.prompts[0], spec.params, chat=spec.chat,
                                metrics=self.metrics, timeout=request_timeout(
                                    context, spec.timeout, model.config.request_timeout_s))
        current.append(generation)
        held: str | None = None  # without empty final responses, the last delta is the final
        for delta in generation:
            if spec.empty_final:
                yield self._delta(request, delta)
            else:
                if held is not None:
                    yield self._delta(request, held)
                held = delta
        result = generation.result()
        yield self._delta(request, None if spec.empty_final else held or "", result)

    def _decoder_request(self, model: Decoder, request: Any) -> DecoderRequest:
        if any(o.name != TEXT_OUTPUT for o in request.outputs):
            raise InvalidInputError("a text-generation model has one output, text_output",
                                    fix="request text_output or no outputs")
        tensors = decode_inputs(request, self.max_message_bytes)
        return decoder_request(request, tensors, model.config.max_batch_size)

    def _delta(self, request: Any, text: str | None,
               result: GenerationResult | None = None) -> Any:
        outputs = []
        if text is not None:
            array = np.empty(1, dtype=np.object_)
            array[0] = text.encode()
            outputs.append((TEXT_OUTPUT, array))
        response = self._response(request, outputs)
        response.parameters["triton_final_response"].bool_param = result is not None
        if result is not None:
            _result_parameters(response, result)
        return _msg("ModelStreamInferResponse")(infer_response=response)

    def _requested(self, request: Any, available: list[str]) -> list[str]:
        names = []
        for output in request.outputs:
            if output.name not in available:
                raise InvalidInputError(f"unknown output {output.name[:50]!r}",
                                        fix=f"this model's outputs: {', '.join(available)}")
            for key in output.parameters:
                if key == "classification":
                    raise UnsupportedError("the classification extension is not supported",
                                           fix="request the logits and take their top-k")
                if key not in ("binary_data",):
                    raise InvalidInputError(f"unknown output parameter {key[:50]!r}",
                                            fix="outputs take no parameters")
            if output.name in names:
                raise InvalidInputError(f"output {output.name!r} requested twice",
                                        fix="request each output once")
            names.append(output.name)
        return names or list(available)

    def _response(self, request: Any, outputs: list[tuple[str, np.ndarray]]) -> Any:
        size = output_bytes(outputs)
        if size > self.max_message_bytes - ENVELOPE_BYTES:
            raise RequestTooLargeError(
                f"the response would hold {size} bytes of tensors, past the server's message "
                f"limit of {self.max_message_bytes}", fix="send a smaller batch or sequence")
        response = _msg("ModelInferResponse")(model_name=request.model_name,
                                              model_version=VERSION, id=request.id)
        encode_outputs(response, outputs, raw=bool(request.raw_input_contents))
        return response

    # -- repository extension -------------------------------------------------------------------

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        _check_repository(request.repository_name)
        index = _msg("RepositoryIndexResponse")
        entries = [e for e in self.repository.index() if not request.ready or e.state == READY]
        return index(models=[index.ModelIndex(name=e.name, version=VERSION, state=e.state,
                                              reason=e.detail) for e in entries])

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        _check_repository(request.repository_name)
        overrides = None
        for key in request.parameters:
            if key != "config":
                raise InvalidInputError(f"unknown load parameter {key[:50]!r}",
                                        fix="the one parameter is config: a JSON object of "
                                        "llmopt-serve.yaml options")
            text = value(key, request.parameters[key], str)
            try:
                overrides = _json_object(text)
            except ValueError:
                raise InvalidInputError("the config parameter is not a JSON object",
                                        fix='e.g. {"max_batch_size": 4}') from None
        self.repository.load(request.model_name, overrides)
        return _msg("RepositoryModelLoadResponse")()

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        _check_repository(request.repository_name)
        for key in request.parameters:
            if key != "unload_dependents":
                raise InvalidInputError(f"unknown unload parameter {key[:50]!r}",
                                        fix="the one parameter is unload_dependents")
            value(key, request.parameters[key], bool)
        self.repository.unload(request.model_name)
        return _msg("RepositoryModelUnloadResponse")()


def _cancel(generations: list[Generation]) -> None:
    for generation in list(generations):
        generation.cancel()


def _result_parameters(response: Any, result: GenerationResult) -> None:
    params = response.parameters
    params["finish_reason"].string_param = result.finish_reason
    params["prompt_tokens"].int64_param = result.stats.prompt_tokens
    params["generated_tokens"].int64_param = result.stats.generated_tokens
    params["cached_prompt_tokens"].int64_param = result.stats.cached_prompt_tokens
    params["accepted_draft_tokens"].int64_param = result.stats.accepted_draft_tokens
    params["rejected_draft_tokens"].int64_param = result.stats.rejected_draft_tokens
    params["ttft_s"].double_param = result.stats.ttft_s


def _check_version(name: str, version: str) -> None:
    if version not in ("", VERSION):
        raise ModelNotFoundError(f"model {name[:100]!r} has no version {version[:20]!r}",
                                 fix=f"use version {VERSION!r} or leave it empty")


def _check_repository(name: str) -> None:
    if name:
        raise ModelNotFoundError(f"no repository named {name[:100]!r}",
                                 fix="leave repository_name empty: the server has one")


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _json_object(text: str) -> dict[str, Any]:
    import json

    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return data


def _msg(name: str) -> Any:
    return _proto.message("inference." + name)
