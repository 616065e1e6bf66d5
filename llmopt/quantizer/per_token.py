"""Dynamic int8 with one activation scale per token and one weight scale per output channel.

ONNX Runtime's dynamic int8 (``DynamicQuantizeMatMul``) quantizes a whole activation tensor
with one scale, so a few tokens with large values (BERT's [CLS]/[SEP] and punctuation rows)
set the step for every other token: all-MiniLM-L6-v2 loses cosine 0.92 (per-tensor weights)
or 0.984 (per-channel weights). A scale per token (per row of the activation) keeps each
token's own resolution; the GEMM stays integer (``MatMulIntegerToFloat``, u8 x u8: see
:func:`unsigned_codes`). The row scale is applied to the float output, where it commutes with
the product::

    x ─┬─ Abs ─ ReduceMax(last axis) ─ Max(eps) ─┬─ Div(127, ·) ─┐
       │                                          └─ Div(·, 127) ─┼────────────┐
       └──────────────────────────────── Mul ─────────────────────┘            │
                                          │                                    │
                     QuantizeLinear(scale 1, zero point 128)  (u8, symmetric)  │
                                          │                                    │
    MatMulIntegerToFloat(W per column, u8 with zp 128, w_scale, zp 128) ─ Mul ───┘ ─ y

The zero point 128 is shared by every row, so ONNX Runtime's scalar-zero-point kernels apply.

Split activations (:func:`replace_matmul_split`) trade a second integer GEMM for the
activation's rounding error: one per-tensor dynamic code (``DynamicQuantizeLinear``, scale s)
and one code of what it rounded away, at scale s/254, both against the same int8 weights::

    x ─┬─ DynamicQuantizeLinear ─ q, s, z ─ MatMulIntegerToFloat(W) ─────────────────┐
       │                          └ DequantizeLinear ─┐                               Add ─ y
       └──────────────────────────────────────────── Sub ─ QuantizeLinear(s/254, 128) ┘
                                                                 └ MatMulIntegerToFloat(W)

so the activation is carried at about 16 bits (its residual's step is 1/64770 of the range)
and only the weights' int8 rounding is left: all-MiniLM-L6-v2 cosine min 0.9992, as the same
weights with float activations (bench/results/encoder_int8.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-8  # an all-zero row gets this amax: its codes are 0 and its output 0


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: ``(codes [K, N] int8, scales [N] float32)``."""
    amax = np.abs(weight).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return codes, scale


def unsigned_codes(codes: np.ndarray) -> np.ndarray:
    """Symmetric int8 codes as ONNX Runtime's integer GEMMs take them exactly on every x86 CPU:
    uint8 with zero point 128. Signed weights against unsigned activations run on
    ``vpmaddubsw``, which sums pairs of products into a saturating int16, wherever the CPU
    has no VNNI (AVX2 machines: Zen 2 and 3, Intel client cores): 2 x 255 x 127 does not fit,
    and a 64 x 48 product came out 19% off (Zen 3). Unsigned weights take ONNX Runtime's
    u8 x u8 kernels, exact there and as fast (all-MiniLM-L6-v2's shapes at batch 32, Zen 3:
    97.8 against 99.5 ms; int8 activations against int8 weights were exact too, at 358 ms)."""
    return (codes.astype(np.int16) + 128).astype(np.uint8)


def smoothing(activation_amax: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factors ``s``: ``x / s`` and ``s * W`` have the same
    product, with the activation's outlier channels moved into the weight by ``alpha``."""
    weight_amax = np.abs(weight).max(axis=1)
    s = np.power(np.maximum(activation_amax, 1e-5), alpha) / \
        np.power(np.maximum(weight_amax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)


def replace_matmul(node: Any, weight: np.ndarray, smooth: np.ndarray | None = None,
                   opset: int = 18) -> tuple[list[Any], list[Any]]:
    """The per-token int8 subgraph (above) for a weight MatMul ``node``: same input and
    output, names under the node's own. ``smooth`` (per input channel, see :func:`smoothing`)
    divides the activation and multiplies the weight first. Returns (nodes, new
    initializers). ``opset``: the graph's ONNX opset (ReduceMax takes its axes as an input
    from 18 on, as an attribute before)."""
    from onnx import helper, numpy_helper

    base = node.name.removesuffix("/MatMul") or node.name
    x, y = node.input[0], node.output[0]

    def name(what: str) -> str:
        return f"{base}/per_token/{what}"

    pre, smooth_init = _smoothing(x, weight, smooth, name)
    if smooth is not None:
        weight, x = weight * smooth[:, None], name("smoothed")
    codes, scale = quantize_columns(weight)

    inits = [
        *smooth_init,
        numpy_helper.from_array(unsigned_codes(codes), name("weight_codes")),
        numpy_helper.from_array(scale, name("weight_scale")),
        numpy_helper.from_array(np.array([-1], np.int64), name("last_axis")),
        numpy_helper.from_array(np.array(EPS, np.float32), name("eps")),
        numpy_helper.from_array(np.array(127.0, np.float32), name("qmax")),
        numpy_helper.from_array(np.array(1.0, np.float32), name("unit")),
        numpy_helper.from_array(np.array(128, np.uint8), name("zero_point")),
        numpy_helper.from_array(np.array(128, np.uint8), name("weight_zero_point")),
    ]
    nodes = [
        *pre,
        helper.make_node("Abs", [x], [name("abs")], name("Abs")),
        helper.make_node("ReduceMax", [name("abs"), name("last_axis")], [name("amax_raw")],
                         name("ReduceMax"), keepdims=1) if opset >= 18 else
        helper.make_node("ReduceMax", [name("abs")], [name("amax_raw")], name("ReduceMax"),
                         keepdims=1, axes=[-1]),
        helper.make_node("Max", [name("amax_raw"), name("eps")], [name("amax")], name("Max")),
        helper.make_node("Div", [name("qmax"), name("amax")], [name("inv_step")],
                         name("InvStep")),
        helper.make_node("Div", [name("amax"), name("qmax")], [name("step")], name("Step")),
        helper.make_node("Mul", [x, name("inv_step")], [name("scaled")], name("Scale")),
        helper.make_node("QuantizeLinear", [name("scaled"), name("unit"), name("zero_point")],
                         [name("codes")], name("QuantizeLinear")),
        helper.make_node("MatMulIntegerToFloat",
                         [name("codes"), name("weight_codes"), name("unit"), name("weight_scale"),
                          name("zero_point"), name("weight_zero_point")],
                         [name("product")], name("MatMulIntegerToFloat"), domain="com.microsoft"),
        helper.make_node("Mul", [name("product"), name("step")], [y], name("Rescale")),
    ]
    return nodes, inits


def replace_matmul_split(node: Any, weight: np.ndarray, smooth: np.ndarray | None = None,
                         opset: int = 18) -> tuple[list[Any], list[Any]]:
    """The split-activation int8 subgraph (module docstring) for a weight MatMul ``node``;
    arguments and result as :func:`replace_matmul`."""
    from onnx import helper, numpy_helper

    del opset  # every op used here has one form from opset 13 on
    base = node.name.removesuffix("/MatMul") or node.name
    x, y = node.input[0], node.output[0]

    def name(what: str) -> str:
        return f"{base}/split/{what}"

    pre, inits = _smoothing(x, weight, smooth, name)
    if smooth is not None:
        weight, x = weight * smooth[:, None], name("smoothed")
    codes, scale = quantize_columns(weight)
    inits += [
        numpy_helper.from_array(unsigned_codes(codes), name("weight_codes")),
        numpy_helper.from_array(scale, name("weight_scale")),
        numpy_helper.from_array(np.array(128, np.uint8), name("weight_zero_point")),
        numpy_helper.from_array(np.array(1.0 / 254.0, np.float32), name("residual_step")),
        numpy_helper.from_array(np.array(128, np.uint8), name("residual_zero_point")),
    ]

    def gemm(codes_: str, scale_: str, zero: str, out: str, what: str) -> Any:
        args = [codes_, name("weight_codes"), scale_, name("weight_scale"), zero,
                name("weight_zero_point")]
        return helper.make_node("MatMulIntegerToFloat", args, [out], name(what),
                                domain="com.microsoft")

    nodes = [
        *pre,
        helper.make_node("DynamicQuantizeLinear", [x], [name("codes"), name("step"),
                                                         name("zero_point")], name("Quantize")),
        gemm(name("codes"), name("step"), name("zero_point"), name("product"),
             "MatMulIntegerToFloat"),
        helper.make_node("DequantizeLinear", [name("codes"), name("step"), name("zero_point")],
                         [name("rounded")], name("Dequantize")),
        helper.make_node("Sub", [x, name("rounded")], [name("residual")], name("Residual")),
        helper.make_node("Mul", [name("step"), name("residual_step")], [name("fine_step")],
                         name("FineStep")),
        helper.make_node("QuantizeLinear", [name("residual"), name("fine_step"),
                                            name("residual_zero_point")],
                         [name("residual_codes")], name("QuantizeResidual")),
        gemm(name("residual_codes"), name("fine_step"), name("residual_zero_point"),
             name("residual_product"), "ResidualMatMulIntegerToFloat"),
        helper.make_node("Add", [name("product"), name("residual_product")], [y], name("Sum")),
    ]
    return nodes, inits


def _smoothing(x: str, weight: np.ndarray, smooth: np.ndarray | None,
               name: Any) -> tuple[list[Any], list[Any]]:
    """The Mul dividing ``x`` by SmoothQuant's factors (none without ``smooth``)."""
    from onnx import helper, numpy_helper

    del weight
    if smooth is None:
        return [], []
    inv = numpy_helper.from_array((1.0 / smooth).astype(np.float32), name("inv_smooth"))
    return [helper.make_node("Mul", [x, name("inv_smooth")], [name("smoothed")],
                             name("Smooth"))], [inv]
