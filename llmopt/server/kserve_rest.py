"""KServe v2 REST: health, metadata and inference, answered by the gRPC KServe servicer itself.

Each REST request becomes the same protobuf request a gRPC client would send (tensor data
always as raw bytes), goes through :class:`~llmopt.server.kserve.KServeService`, and its
response is written back as JSON, so both doors validate, run and fail alike. Binary tensor
data (Triton's extension, which ``tritonclient.http`` uses by default) works both ways: the
``Inference-Header-Content-Length`` header says where the JSON ends and the raw bytes begin.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmopt import _proto
from llmopt.errors import InvalidInputError
from llmopt.server.http_context import HttpContext
from llmopt.server.tensors import DTYPES

HEADER_LENGTH = "inference-header-content-length"
INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class CallContext:
    """The part of ``grpc.ServicerContext`` the servicer uses: no deadline of its own, and
    callbacks run when the HTTP client disconnects (which cancels the generations)."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.active = True

    def time_remaining(self) -> float | None:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        return self.active

    def end(self) -> None:
        self.active = False
        for callback in self.callbacks:
            callback()


# -- health and metadata ----------------------------------------------------------------------

async def live(request: Request, ctx: HttpContext) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request, ctx: HttpContext) -> Response:
    ok = ctx.kserve.ServerReady(None, CallContext()).ready
    return JSONResponse({"ready": ok}, 200 if ok else 503)


async def server_metadata(request: Request, ctx: HttpContext) -> Response:
    meta = ctx.kserve.ServerMetadata(None, CallContext())
    return JSONResponse({"name": meta.name, "version": meta.version,
                         "extensions": [*meta.extensions, "binary_tensor_data"]})


async def model_ready(request: Request, ctx: HttpContext) -> Response:
    name, version = _name_version(request)
    ok = ctx.kserve.ModelReady(_msg("ModelReadyRequest")(name=name, version=version),
                               CallContext()).ready
    return JSONResponse({"name": name, "ready": ok}, 200 if ok else 503)


async def model_metadata(request: Request, ctx: HttpContext) -> Response:
    name, version = _name_version(request)
    meta = ctx.kserve.ModelMetadata(_msg("ModelMetadataRequest")(name=name, version=version),
                                    CallContext())

    def tensors(side: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in side]

    return JSONResponse({"name": meta.name, "versions": list(meta.versions),
                         "platform": meta.platform, "inputs": tensors(meta.inputs),
                         "outputs": tensors(meta.outputs)})


async def model_config(request: Request, ctx: HttpContext) -> Response:
    from google.protobuf.json_format import MessageToDict

    name, version = _name_version(request)
    config = ctx.kserve.ModelConfig(_msg("ModelConfigRequest")(name=name, version=version),
                                    CallContext()).config
    return JSONResponse(MessageToDict(config, preserving_proto_field_name=True))


def _name_version(request: Request) -> tuple[str, str]:
    name = request.path_params["name"]
    request.state.model = name
    return name, request.path_params.get("version", "")


# -- inference ----------------------------------------------------------------------------------

async def infer(request: Request, ctx: HttpContext) -> Response:
    name, version = _name_version(request)
    data = await request.body()
    header, binary = _split(data, request.headers.get(HEADER_LENGTH))
    proto, binary_out = infer_request(header, binary, name, version)
    call = CallContext()
    loop = asyncio.get_running_loop()
    watcher = asyncio.ensure_future(_on_disconnect(request, call))
    try:
        response = await loop.run_in_executor(ctx.pool, ctx.kserve.ModelInfer, proto, call)
    finally:
        watcher.cancel()
    return infer_response(response, proto, binary_out)


async def _on_disconnect(request: Request, call: CallContext) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    call.end()


def _split(data: bytes, header_length: str | None) -> tuple[Any, bytes]:
    length = len(data)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(data):
            raise InvalidInputError(f"{HEADER_LENGTH} is {header_length[:20]!r} for a body of "
                                    f"{len(data)} bytes", fix="send the JSON header's length")
        length = int(header_length)
    try:
        header = json.loads(data[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"the inference request is not valid JSON: {exc}",
                                fix="send a KServe v2 inference request object") from None
    if not isinstance(header, dict):
        raise InvalidInputError("the inference request must be a JSON object",
                                fix='e.g. {"inputs": [{"name", "shape", "datatype", "data"}]}')
    return header, data[length:]


def infer_request(body: dict[str, Any], binary: bytes, name: str,
                  version: str) -> tuple[Any, bool]:
    """The gRPC ModelInferRequest a REST request stands for, and whether outputs default to
    binary data (the ``binary_data_output`` request parameter)."""
    _known(body, {"id", "parameters", "inputs", "outputs"}, "the request")
    request = _msg("ModelInferRequest")(model_name=name, model_version=version,
                                        id=str(body.get("id") or ""))
    parameters = _dict(body.get("parameters", {}), "parameters")
    binary_out = bool(parameters.pop("binary_data_output", False))
    _parameters(request.parameters, parameters)
    offset = 0
    for index, item in enumerate(_list(body.get("inputs"), "inputs")):
        tensor = _dict(item, f"inputs[{index}]")
        _known(tensor, {"name", "shape", "datatype", "data", "parameters"}, f"inputs[{index}]")
        entry = request.inputs.add(name=str(tensor.get("name") or ""),
                                   datatype=str(tensor.get("datatype") or ""))
        shape = _list(tensor.get("shape"), f"inputs[{index}].shape", empty=True)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInputError(f"inputs[{index}].shape must be non-negative integers",
                                    fix="e.g. [1, 8]")
        entry.shape.extend(shape)
        options = dict(_dict(tensor.get("parameters", {}), f"inputs[{index}].parameters"))
        size = options.pop("binary_data_size", None)
        _parameters(entry.parameters, options)
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInputError(f"inputs[{index}] binary_data_size {size!r} overruns "
                                        f"the {len(binary)} bytes after the JSON header",
                                        fix="send each input's exact byte size")
            request.raw_input_contents.append(binary[offset:offset + size])
            offset += size
        else:
            request.raw_input_contents.append(_raw(entry.name, entry.datatype,
                                                   tensor.get("data")))
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} bytes after the JSON header belong to "
                                "no input", fix="set binary_data_size on each binary input")
    for index, item in enumerate(_list(body.get("outputs", []), "outputs", empty=True)):
        output = _dict(item, f"outputs[{index}]")
        entry = request.outputs.add(name=str(output.get("name") or ""))
        _parameters(entry.parameters, _dict(output.get("parameters", {}),
                                            f"outputs[{index}].parameters"))
    return request, binary_out


def infer_response(response: Any, request: Any, binary_out: bool) -> Response:
    """The servicer's (raw) response as JSON, with binary data where the request asked."""
    wanted = {o.name: o.parameters["binary_data"].bool_param if "binary_data" in o.parameters
              else binary_out for o in request.outputs}
    outputs, chunks = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
        if wanted.get(tensor.name, binary_out):
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _values(tensor.datatype, raw)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name,
                            "model_version": response.model_version, "outputs": outputs}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = {k: _value(v) for k, v in response.parameters.items()}
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def _raw(name: str, datatype: str, data: Any) -> bytes:
    """JSON tensor data (nested lists, row-major) as KServe raw bytes."""
    values = list(_flatten(data if isinstance(data, list) else [data]))
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidInputError(f"input {name!r}: BYTES data must be strings",
                                    fix='e.g. "data": ["Hello"]')
        return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))
    if datatype not in DTYPES:
        raise InvalidInputError(f"input {name!r} has unknown datatype {datatype[:30]!r}",
                                fix=f"use one of {', '.join(DTYPES)}")
    ok = {"BOOL": lambda v: isinstance(v, bool)}.get(datatype) or (
        (lambda v: isinstance(v, int) and not isinstance(v, bool)) if datatype in INTEGER_TYPES
        else (lambda v: isinstance(v, int | float) and not isinstance(v, bool)))
    if not all(ok(v) for v in values):
        raise InvalidInputError(f"input {name!r}: data does not match datatype {datatype}",
                                fix="send numbers of the tensor's datatype, row-major")
    try:
        array = np.asarray(values, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<"))
    except OverflowError:
        raise InvalidInputError(f"input {name!r}: a value is out of range for {datatype}",
                                fix="send values that fit the datatype") from None
    return array.tobytes()


def _flatten(values: list[Any]) -> Any:
    for value in values:
        if isinstance(value, list):
            yield from _flatten(value)
        else:
            yield value


def _values(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4:offset + 4 + length].decode("utf-8", "replace"))
            offset += 4 + length
        return items
    return np.frombuffer(raw, np.dtype(DTYPES[datatype]).newbyteorder("<")).tolist()


def _parameters(target: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int) and -2**63 <= value < 2**63:
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise InvalidInputError(f"parameter {key[:50]!r} must be a bool, integer, number "
                                    "or string", fix="send a scalar value")


def _value(parameter: Any) -> Any:
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be a JSON object", fix="see the KServe v2 REST "
                                "protocol")
    return value


def _list(value: Any, where: str, empty: bool = False) -> list[Any]:
    if not isinstance(value, list) or (not value and not empty):
        raise InvalidInputError(f"{where} must be a{'' if empty else ' non-empty'} list",
                                fix="see the KServe v2 REST protocol")
    return value


def _known(value: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidInputError(f"{where} has unknown field(s) {', '.join(unknown)[:100]}",
                                fix=f"its fields are {', '.join(sorted(allowed))}")


def _msg(name: str) -> Any:
    return _proto.message("inference." + name)


_MODEL = "/v2/models/{name}"
_VERSIONED = "/v2/models/{name}/versions/{version}"
ROUTES = (
    ("GET", "/v2/health/live", "v2.live", live),
    ("GET", "/v2/health/ready", "v2.ready", ready),
    ("GET", "/v2", "v2.metadata", server_metadata),
    *(r for base in (_MODEL, _VERSIONED) for r in (
        ("GET", base, "v2.model_metadata", model_metadata),
        ("GET", base + "/ready", "v2.model_ready", model_ready),
        ("GET", base + "/config", "v2.model_config", model_config),
        ("POST", base + "/infer", "v2.infer", infer),
    )),
)
