"""KServe v2 tensors <-> numpy, validating every field on the way in.

An input's data comes either in its typed ``contents`` or, for all inputs at once, in
``raw_input_contents`` (little-endian, row-major; BYTES elements each prefixed by a 4-byte
little-endian length). Shapes, element counts, byte sizes and datatypes must all agree, and
the element count is bounded before anything is allocated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.server.status import RequestTooLargeError

# KServe datatype -> numpy dtype (BYTES: numpy object arrays of bytes)
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}
# KServe datatype -> InferTensorContents field (FP16 has none: raw only)
CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
ALL_CONTENTS = sorted(set(CONTENTS.values()))
NUMPY_TO_KSERVE = {np.dtype(v).name: k for k, v in DTYPES.items() if k != "BYTES"}
# parameters an input may carry: the HTTP binary extension's, harmless over gRPC
IGNORED_INPUT_PARAMETERS = ("binary_data", "binary_data_size")


def decode_inputs(request: Any, max_elements: int) -> dict[str, np.ndarray]:
    """The request's input tensors by name, as numpy arrays of their datatype."""
    inputs = list(request.inputs)
    if not inputs:
        raise InvalidInputError("the request has no inputs", fix="send at least one input tensor")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(inputs):
        raise InvalidInputError(
            f"{len(raw)} raw_input_contents for {len(inputs)} inputs",
            fix="send one raw_input_contents entry per input, or typed contents for all")
    out: dict[str, np.ndarray] = {}
    budget = max_elements
    for index, tensor in enumerate(inputs):
        name = tensor.name
        if not name:
            raise InvalidInputError(f"input {index} has no name", fix="name every input")
        if name in out:
            raise InvalidInputError(f"input {name!r} appears twice", fix="send each input once")
        _check_parameters(name, tensor.parameters)
        dtype = _datatype(name, tensor.datatype)
        shape = [int(d) for d in tensor.shape]
        count = element_count(name, shape, budget)
        budget -= count
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input {name!r} has typed contents in a request that uses "
                    "raw_input_contents", fix="use one or the other for all inputs")
            array = _from_raw(name, tensor.datatype, raw[index], count)
        else:
            array = _from_contents(name, tensor.datatype, dtype, tensor, count)
        out[name] = array.reshape(shape)
    return out


def element_count(name: str, shape: Sequence[int], budget: int) -> int:
    if not shape:
        raise InvalidInputError(f"input {name!r} has no shape",
                                fix="give the tensor's shape, e.g. [1, 8]")
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r} has a negative dimension in {list(shape)}",
                                fix="dimensions are sizes, >= 0")
    if len(shape) > 8:
        raise InvalidInputError(f"input {name!r} has {len(shape)} dimensions",
                                fix="send at most 8")
    count = math.prod(shape)
    if count > budget:
        raise RequestTooLargeError(
            f"input {name!r} of shape {list(shape)} brings the request past its limit of "
            f"{budget} elements", fix="send smaller tensors")
    return count


def encode_outputs(response: Any, outputs: Sequence[tuple[str, np.ndarray]], raw: bool) -> int:
    """Add ``outputs`` to ``response`` (raw bytes or typed contents); returns the byte size."""
    size = 0
    for name, array in outputs:
        tensor = response.outputs.add()
        tensor.name = name
        tensor.shape.extend(array.shape)
        if array.dtype == np.object_:
            tensor.datatype = "BYTES"
            items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
            if raw:
                data = b"".join(struct.pack("<I", len(v)) + v for v in items)
                response.raw_output_contents.append(data)
                size += len(data)
            else:
                tensor.contents.bytes_contents.extend(items)
                size += sum(len(v) for v in items)
            continue
        datatype = NUMPY_TO_KSERVE[array.dtype.name]
        tensor.datatype = datatype
        if raw:
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            response.raw_output_contents.append(data)
            size += len(data)
        else:
            getattr(tensor.contents, CONTENTS[datatype]).extend(array.reshape(-1).tolist())
            size += array.nbytes
    return size


def output_bytes(outputs: Sequence[tuple[str, np.ndarray]]) -> int:
    return sum(a.nbytes if a.dtype != np.object_ else sum(len(v) + 4 for v in a.reshape(-1))
               for _, a in outputs)


def _datatype(name: str, datatype: str) -> Any:
    if datatype not in DTYPES:
        raise InvalidInputError(f"input {name!r} has unknown datatype {datatype[:30]!r}",
                                fix=f"use one of {', '.join(DTYPES)}")
    return DTYPES[datatype]


def _check_parameters(name: str, parameters: Any) -> None:
    for key in parameters:
        if key.startswith("shared_memory"):
            raise InvalidInputError(f"input {name!r} asks for shared memory ({key})",
                                    fix="send the data in the request; llmopt has no "
                                    "shared-memory extension")
        if key not in IGNORED_INPUT_PARAMETERS:
            raise InvalidInputError(f"input {name!r} has unknown parameter {key[:50]!r}",
                                    fix="input tensors take no parameters")


def _from_raw(name: str, datatype: str, data: bytes, count: int) -> np.ndarray:
    if datatype == "BYTES":
        return _split_bytes(name, data, count)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(data) != count * dtype.itemsize:
        raise InvalidInputError(
            f"input {name!r}: {len(data)} raw bytes for {count} {datatype} elements "
            f"({count * dtype.itemsize} expected)", fix="match the data to shape and datatype")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


def _split_bytes(name: str, data: bytes, count: int) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if len(items) == count or offset + 4 > len(data):
            break
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            break
        items.append(data[offset:offset + length])
        offset += length
    if len(items) != count or offset != len(data):
        raise InvalidInputError(
            f"input {name!r}: raw BYTES data does not hold exactly {count} length-prefixed "
            "elements", fix="prefix each element with its 4-byte little-endian length")
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


def _from_contents(name: str, datatype: str, dtype: Any, tensor: Any, count: int) -> np.ndarray:
    field = CONTENTS.get(datatype)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {datatype} has no typed contents field",
                                fix="send it in raw_input_contents")
    contents = tensor.contents
    others = [f for f in ALL_CONTENTS if f != field and len(getattr(contents, f))]
    if others:
        raise InvalidInputError(
            f"input {name!r} is {datatype} but carries {others[0]}",
            fix=f"put {datatype} data in {field}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: {len(values)} values in {field} for shape {list(tensor.shape)} "
            f"({count} expected)", fix="match the data to the shape")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array
    try:
        return np.array(list(values), dtype=dtype)
    except OverflowError:
        raise InvalidInputError(f"input {name!r} holds values out of {datatype}'s range",
                                fix=f"send values that fit {datatype}") from None
