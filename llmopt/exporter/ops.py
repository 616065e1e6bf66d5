"""Weight helpers and small op sequences shared by the decoder and encoder graph emitters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from llmopt.errors import UnsupportedError
from llmopt.exporter.graph import GraphBuilder

F32 = np.float32


@dataclass
class Linear:
    weight: np.ndarray  # [in, out], ready for MatMul
    bias: np.ndarray | None


class Initializers:
    """A graph's named weights, read back by their stable names to re-emit the graph."""

    def __init__(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray | None:
        value = self.tensors.get(name)
        return None if value is None else value.astype(F32, copy=False)

    def need(self, name: str) -> np.ndarray:
        value = self.get(name)
        if value is None:
            raise UnsupportedError(f"the graph has no initializer {name!r}",
                                   fix="re-export the package with this llmopt version")
        return value

    def linear(self, name: str) -> Linear:
        return Linear(self.need(f"{name}.weight"), self.get(f"{name}.bias"))


def to_numpy(tensor: Any) -> np.ndarray:
    """A float32 numpy copy of a torch tensor (or numpy array)."""
    if isinstance(tensor, np.ndarray):
        return tensor.astype(F32, copy=False)
    return tensor.detach().float().cpu().numpy()


def state_linear(state: Mapping[str, Any], prefix: str, transposed: bool) -> Linear:
    """``prefix.weight`` (+ ``prefix.bias``) from a state dict; torch Linear stores [out, in]."""
    weight = to_numpy(state[f"{prefix}.weight"])
    bias = state.get(f"{prefix}.bias")
    return Linear(weight if transposed else weight.T, None if bias is None else to_numpy(bias))


def concat_linear(parts: list[Linear]) -> Linear:
    """Several projections of the same input as one wider MatMul."""
    weight = np.concatenate([p.weight for p in parts], axis=1)
    if all(p.bias is None for p in parts):
        return Linear(weight, None)
    biases = [p.bias if p.bias is not None else np.zeros(p.weight.shape[1], F32) for p in parts]
    return Linear(weight, np.concatenate(biases))


def activation(b: GraphBuilder, x: str, kind: str, dt: np.dtype) -> str:
    """The activation transformers calls ``kind``, from primitive ops."""

    def c(value: float) -> str:
        return b.const(value, dt)

    with b.scope(kind):
        if kind == "silu":
            return b.op("Mul", x, b.op("Sigmoid", x))
        if kind == "relu":
            return b.op("Relu", x)
        if kind in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cube = b.op("Mul", b.op("Mul", x, x), x)
            inner = b.op("Add", x, b.op("Mul", cube, c(0.044715)))
            t = b.op("Tanh", b.op("Mul", inner, c(math.sqrt(2.0 / math.pi))))
            return b.op("Mul", b.op("Mul", x, c(0.5)), b.op("Add", t, c(1.0)))
        if kind == "gelu":
            erf = b.op("Erf", b.op("Mul", x, c(1.0 / math.sqrt(2.0))))
            return b.op("Mul", b.op("Mul", x, c(0.5)), b.op("Add", erf, c(1.0)))
    raise UnsupportedError(
        f"activation {kind!r} is not supported",
        fix="supported activations: silu, relu, gelu, gelu_new, gelu_pytorch_tanh",
    )


def rms_norm(b: GraphBuilder, x: str, weight: str, eps: float, dt: np.dtype) -> str:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 as transformers does."""
    if dt != np.dtype(F32):
        x = b.op("Cast", x, to=onnx.TensorProto.FLOAT)
    mean_sq = b.op("ReduceMean", b.op("Mul", x, x), b.const([-1]), keepdims=1)
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean_sq, b.const(eps, F32))))
    y = b.op("Mul", x, inv)
    if dt != np.dtype(F32):
        y = b.op("Cast", y, to=onnx.TensorProto.FLOAT16)
    return b.op("Mul", y, weight)
