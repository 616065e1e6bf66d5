"""Block-wise weight quantization with integer zero points, and the MatMulNBits nodes for it.

ONNX Runtime's fast MatMulNBits CPU kernels (int8 compute, ``accuracy_level=4``) take 4- or
8-bit codes with *integer* zero points; a float zero point sends every call down a path that
dequantizes the whole matrix first (measured 20-40x slower per MatMul; ONNX Runtime skips
prepacking for them). Everything here therefore keeps zero points integral, or, where an
algorithm needs float ones, moves them into a small correction term next to a symmetric kernel
(:func:`summed_correction`, or :func:`correction` for graphs of any rank):

- ``rtn``: round to nearest on each block's [min, max] range.
- ``mse``: per block, search clipping ranges and refine the scale by least squares for the
  codes it picked, keeping the candidate with the lowest (optionally activation-weighted)
  squared error. Costs a few seconds per model, no data needed.

A weight ``w`` of shape [K, N] (the MatMul's second input) is cut into blocks of ``block``
consecutive input rows per output column: ``w[k, n] ~ scale[n, b] * (code[n, b, j] - zero[n, b])``
with ``k = b * block + j``, the layout MatMulNBits reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Fractions of each block's [min, max] range tried by the ``mse`` search: wider ranges never
# help (the refit can grow the scale), clipping outliers often does.
CLIP_GRID = tuple(float(c) for c in np.linspace(1.0, 0.55, 10))


@dataclass
class Blocks:
    """Codes [N, nblocks, block] (uint8), scales [N, nblocks] (float32) and zero points
    [N, nblocks]: uint8 for integer ones, float32 for float ones (HQQ, GGUF Q4_1; emitted with
    a correction, see :func:`correction`), None for symmetric (MatMulNBits then uses
    2^(bits-1))."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bits: int

    @property
    def block(self) -> int:
        return int(self.codes.shape[2])

    def dequantize(self) -> np.ndarray:
        """The weight these blocks stand for, [K, N] float32."""
        zero = self.zeros if self.zeros is not None else np.full(
            self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)
        values = ((self.codes.astype(np.float32) - zero[..., None].astype(np.float32))
                  * self.scales[..., None])
        return values.reshape(values.shape[0], -1).T.copy()


def quantize(weight: np.ndarray, *, bits: int = 4, block: int = 32, symmetric: bool = False,
             method: str = "mse", importance: np.ndarray | None = None) -> Blocks:
    """Quantize a [K, N] weight. ``importance`` ([K], e.g. the mean squared activation of each
    input channel) weights the ``mse`` objective; without it every element counts the same."""
    k, n = weight.shape
    if k % block:
        raise ValueError(f"block size {block} does not divide K={k}")
    w = np.ascontiguousarray(weight.T, dtype=np.float32).reshape(n, k // block, block)
    a = (np.ones((1, 1, block), np.float32) if importance is None else
         np.asarray(importance, np.float32).reshape(1, k // block, block))
    top = (1 << bits) - 1
    candidates = CLIP_GRID if method == "mse" else (1.0,)
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    best_err = None
    for clip in candidates:
        scale, zero = _range_params(w, clip, bits, symmetric)
        codes = _codes(w, scale, zero, top)
        if method == "mse":
            scale = _refit_scale(w, a, codes, zero, scale)
            codes = _codes(w, scale, zero, top)
        err = np.sum(a * np.square(w - scale[..., None] * (codes - zero[..., None])), axis=-1)
        if best is None or best_err is None:
            best, best_err = (codes, scale, zero), err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (np.where(better[..., None], codes, best[0]), np.where(better, scale, best[1]),
                np.where(better, zero, best[2]))
    assert best is not None
    codes, scale, zero = best
    if symmetric and _half_holds(scale):
        # scales a float16 holds: llmopt's CPU kernels store them in 2 bytes instead of 4
        # (int8 blocks of 32: 1.0625 bytes per weight instead of 1.125); the codes follow
        scale = scale.astype(np.float16).astype(np.float32)
        codes = _codes(w, scale, zero, top)
    return Blocks(codes.astype(np.uint8), scale.astype(np.float32),
                  None if symmetric else zero.astype(np.uint8), bits)


def _range_params(w: np.ndarray, clip: float, bits: int, symmetric: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    top = (1 << bits) - 1
    if symmetric:
        # codes 0..top around 2^(bits-1): the negative side has one more step
        half = 1 << (bits - 1)
        scale = np.max(np.abs(w), axis=-1) * clip / half
        return _nonzero(scale), np.full(scale.shape, float(half), np.float32)
    lo = np.minimum(np.min(w, axis=-1), 0.0) * clip
    hi = np.maximum(np.max(w, axis=-1), 0.0) * clip
    scale = _nonzero((hi - lo) / top)
    zero = np.clip(np.round(-lo / scale), 0, top)
    return scale, zero.astype(np.float32)


def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int) -> np.ndarray:
    return np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, top).astype(np.float32)


def _refit_scale(w: np.ndarray, a: np.ndarray, codes: np.ndarray, zero: np.ndarray,
                 scale: np.ndarray) -> np.ndarray:
    """Least-squares scale for fixed codes and zero point: sum(a w c) / sum(a c c)."""
    c = codes - zero[..., None]
    den = np.sum(a * c * c, axis=-1)
    fit = np.sum(a * w * c, axis=-1) / np.where(den > 0, den, 1.0)
    return np.where((den > 0) & (fit > 0), fit, scale).astype(np.float32)


def _half_holds(scale: np.ndarray) -> bool:
    """Whether every scale lies in float16's normal range, where rounding to float16 changes
    it by at most 2^-11 of itself (1/16 of the int8 code step's rounding error)."""
    half = np.finfo(np.float16)
    return bool(scale.size) and float(scale.min()) >= float(half.tiny) and \
        float(scale.max()) <= float(half.max)


def _nonzero(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def matmul_nbits(node_name: str, inputs: tuple[str, str], base: str, blocks: Blocks,
                 accuracy_level: int) -> tuple[list[Any], list[Any]]:
    """Nodes computing ``inputs[0] @ blocks`` into ``inputs[1]``, and their initializers (named
    after ``base``): one MatMulNBits, plus the zero-point correction when ``blocks`` has float
    zero points (see :func:`correction`)."""
    from onnx import helper, numpy_helper

    n, nblocks, block = blocks.codes.shape
    zeros = blocks.zeros
    corrected = zeros is not None and zeros.dtype != np.uint8
    # float zero points: the symmetric kernel also computes x's block sums (see summed_correction)
    codes = np.concatenate([blocks.codes, block_sum_rows(nblocks, block, blocks.bits).codes]) \
        if corrected else blocks.codes
    scales = np.concatenate([blocks.scales, np.ones((nblocks, nblocks), np.float32)]) \
        if corrected else blocks.scales
    inits = [numpy_helper.from_array(pack_codes(codes, blocks.bits), f"{base}.q{blocks.bits}"),
             numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{base}.scales")]
    if zeros is not None and zeros.dtype == np.uint8:
        if blocks.bits == 4:
            if nblocks % 2:
                zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
            zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(zeros, np.uint8).reshape(-1),
                                             f"{base}.zero_points"))
    output = f"{base}/with_block_sums" if corrected else inputs[1]
    nodes = [helper.make_node(
        "MatMulNBits", [inputs[0], *(i.name for i in inits)], [output], name=node_name,
        domain="com.microsoft", K=nblocks * block, N=codes.shape[0], bits=blocks.bits,
        block_size=block, accuracy_level=accuracy_level)]
    if corrected:
        assert zeros is not None
        more_nodes, more_inits = summed_correction(output, inputs[1], base, blocks.scales,
                                                   zeros.astype(np.float32), blocks.bits)
        nodes += more_nodes
        inits += more_inits
    return nodes, inits


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, nblocks, block] codes as MatMulNBits stores them (two 4-bit codes per byte)."""
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(codes, np.uint8)


def block_sum_rows(nblocks: int, block: int, bits: int) -> Blocks:
    """``nblocks`` extra output columns for a symmetric MatMulNBits: column ``b`` weighs the
    inputs of block ``b`` by 1 and every other input by 0 (code ``2^(bits-1) + 1`` and scale 1,
    exact in any precision), so the kernel's last ``nblocks`` outputs are x's block sums."""
    middle = 1 << (bits - 1)
    codes = np.full((nblocks, nblocks, block), middle, np.uint8)
    codes[np.arange(nblocks), np.arange(nblocks)] = middle + 1
    return Blocks(codes, np.ones((nblocks, nblocks), np.float32), None, bits)


def summed_correction(with_sums: str, y: str, base: str, scales: np.ndarray,
                      zeros: np.ndarray, bits: int) -> tuple[list[Any], list[Any]]:
    r"""Float zero points on the fast kernel: ``y = symmetric + blocksum(x) @ C``, for a
    symmetric MatMulNBits extended by :func:`block_sum_rows` (output ``with_sums``).

    A block with a float zero point ``z`` computes ``s * (q - z) = s * (q - m) + s * (m - z)``
    with ``m = 2^(bits-1)``, the zero point MatMulNBits assumes when none is given. The first
    term is a symmetric MatMulNBits on the same codes; the second is constant per block and
    output column, so its product with ``x`` is the per-block sums of ``x`` ([..., K/block])
    times ``C[b, n] = s[n, b] * (m - z[n, b])`` ([K/block, N]): exact up to float rounding,
    costing 1/8 of the 4-bit weight's bytes. The block sums are ``nblocks`` more output
    columns of the kernel, which reads ``x`` anyway::

        x ─MatMulNBits(N + nblocks)─Split─┬ symmetric [.., N] ─────────────────────┐
                                          └ block sums [.., nblocks] ─MatMul(C)─Add─▶ y

    Three small nodes per MatMul where a Reshape and ReduceSum over ``x`` made four (an int4
    SmolLM2 step runs 120 of them; bench/results/decode_cpu.md), for ``x`` of any rank and
    any number of rows (routed experts often get none). The sums come from the same (at
    accuracy level 4: int8-rounded) activations as the product itself.
    """
    from onnx import helper, numpy_helper

    n, nblocks = scales.shape
    middle = float(1 << (bits - 1))
    c = (scales * (middle - zeros)).T.astype(np.float32)  # [nblocks, N]
    inits = [numpy_helper.from_array(np.array([n, nblocks], np.int64), f"{base}.sum_split"),
             numpy_helper.from_array(c, f"{base}.zero_point_correction")]
    nodes = [
        helper.make_node("Split", [with_sums, inits[0].name],
                         [f"{base}/symmetric", f"{base}/block_sums"], name=f"{base}/BlockSums",
                         axis=-1),
        helper.make_node("MatMul", [f"{base}/block_sums", inits[1].name],
                         [f"{base}/correction"], name=f"{base}/ZeroPointCorrection"),
        helper.make_node("Add", [f"{base}/symmetric", f"{base}/correction"], [y],
                         name=f"{base}/AddCorrection"),
    ]
    return nodes, inits


def correct_float_zero_points(proto: Any) -> int:
    """Rewrite every MatMulNBits with float zero points (HQQ, GPTQ, GGUF Q4_1) into the
    symmetric kernel with block-sum columns plus :func:`summed_correction`; returns how many
    were rewritten."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    nodes: list[Any] = []
    added: list[Any] = []
    rewritten = 0
    for node in proto.graph.node:
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and \
            len(node.input) > 3 else None
        if zp is None or zp.data_type == TensorProto.UINT8:
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        if k % block:
            raise ValueError(f"block size {block} does not divide K={k}")
        nblocks = k // block
        stored_scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, nblocks)
        scales = stored_scales.astype(np.float32)
        zeros = numpy_helper.to_array(zp).astype(np.float32).reshape(n, nblocks)
        base = node.input[1].rsplit(".", 1)[0] if "." in node.input[1] else node.input[1]
        del node.input[3:]
        y = node.output[0]
        node.output[0] = f"{base}/with_block_sums"
        sums = block_sum_rows(nblocks, block, bits)
        codes = numpy_helper.to_array(inits[node.input[1]]).reshape(n, nblocks, -1)
        extended = [
            numpy_helper.from_array(np.concatenate([codes, pack_codes(sums.codes, bits)]),
                                    f"{base}.q{bits}_with_block_sums"),
            numpy_helper.from_array(  # in the stored scales' type (float16 graphs)
                np.concatenate([stored_scales, sums.scales.astype(stored_scales.dtype)])
                .reshape(-1), f"{base}.scales_with_block_sums")]
        node.input[1], node.input[2] = extended[0].name, extended[1].name
        for attribute in node.attribute:
            if attribute.name == "N":
                attribute.i = n + nblocks
        more_nodes, more_inits = summed_correction(node.output[0], y, base, scales, zeros, bits)
        nodes.append(node)
        nodes += more_nodes
        added += more_inits + extended
        rewritten += 1
    set_nodes(proto, nodes, added)
    return rewritten


def is_lm_head(node: Any, weights: Any) -> bool:
    """The decoder's LM head: the MatMul reading llmopt's ``...lm_head.weight`` initializer
    (``weights``: the graph's initializer names)."""
    return node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in weights \
        and node.input[1].endswith("lm_head.weight")


def replace_matmul(node: Any, blocks: Blocks, accuracy_level: int) -> tuple[list[Any], list[Any]]:
    """:func:`matmul_nbits` for a weight MatMul ``node``: same input and output, named after
    the node and its weight."""
    return matmul_nbits(node.name.replace("/MatMul", "/MatMulNBits"),
                        (node.input[0], node.output[0]), node.input[1].removesuffix(".weight"),
                        blocks, accuracy_level)


def set_nodes(proto: Any, nodes: list[Any], added: list[Any]) -> None:
    """Make ``nodes`` the graph's nodes, add the ``added`` initializers and drop the ones no
    node reads any more (the float weights that were quantized)."""
    used = {i for node in nodes for i in node.input}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + [t for t in added if t.name in used])
