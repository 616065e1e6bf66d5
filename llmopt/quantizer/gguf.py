"""int4 packages that reuse a GGUF file's 4-bit blocks exactly (no second rounding).

ONNX Runtime's ``MatMulNBits`` computes ``w = (q - zero_point) * scale`` per block of 32 along
the input axis. GGUF's 4-bit types all fit that form:

- Q4_0, blocks of 32: ``w = d * (q - 8)``: scale ``d``, zero point 8 (MatMulNBits' default).
- Q4_1, blocks of 32: ``w = d * q + m``: scale ``d``, float zero point ``-m / d``.
- Q4_K, super-blocks of 256 = eight 32-weight sub-blocks ``j``, each with a 6-bit scale
  ``sc_j`` and min ``m_j`` under the super-block's fp16 ``d`` and ``dmin``:
  ``w = d * sc_j * q - dmin * m_j``: scale ``d * sc_j``, float zero point
  ``dmin * m_j / (d * sc_j)``.

MatMulNBits also takes float zero points as an input, but on ONNX Runtime's slow dequantizing
path; llmopt moves them into a small correction beside the symmetric kernel
(``blockwise.correction``) so the fast int8-compute path still runs. A Q8_0 token embedding
(``w = d * q``) that the model ties to its LM head becomes an exact 8-bit LM head. All keep the
very codes llama.cpp uses, so the package computes what the dequantized float package computes
(checked weight by weight before anything is written). Layer weights in any other type (the
Q6_K/Q5_K halves of a Q4_K_M file, F16, ...), or that the builder changed (a folded scale),
are requantized from the package's float weight and listed in the step's ``requantized``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError, UnsupportedError
from llmopt.package import Package
from llmopt.quantizer import blockwise

log = logging.getLogger("llmopt.quantize")
BLOCK = 32
REUSED = ("Q4_0", "Q4_1", "Q4_K")  # GGUF types whose blocks MatMulNBits holds exactly
# llmopt initializer -> the GGUF tensors whose rows it stacks (in order), one tuple per layout
# llama.cpp uses (separate q/k/v, or fused as in Phi-3 and GPT-2)
LAYER_TENSORS = {
    "attn.qkv_proj": (("attn_q", "attn_k", "attn_v"), ("attn_qkv",)),
    "attn.o_proj": (("attn_output",),),
    "mlp.gate_up_proj": (("ffn_gate", "ffn_up"), ("ffn_up",)),
    "mlp.fc_in": (("ffn_up",),),
    "mlp.fc_out": (("ffn_down",),),
}
PERMUTED = ("llama", "mistral")  # llama.cpp reorders q/k rows for these; undo it


# Long on purpose: one pass over the graph's nodes, then the derived package's bookkeeping, which
# Package.derive (issue #14) is to take over
def quantize_from_gguf(parent: Package, out_dir: Any, accuracy_level: int = 4,  # noqa: PLR0915
                       evaluate: bool = True, lm_head_bits: int | None = 8) -> Package:
    import onnx

    from llmopt.exporter.sources import gguf_reader

    source = parent.manifest.source
    if source["kind"] != "gguf":
        raise InvalidInputError("this package was not exported from a GGUF file",
                                fix="use QuantizeOptions.int4() to quantize its float weights")
    path = Path(source["reference"]).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"the GGUF source {path} is gone",
                                fix="put the file back or quantize with QuantizeOptions.int4()")
    started = time.perf_counter()
    reader = gguf_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    proto = onnx.load(str(parent.model_path))
    weights = {t.name: t for t in proto.graph.initializer}
    kv = parent.kv_cache
    permute = parent.manifest.model_type in PERMUTED
    replaced: dict[str, str] = {}
    requantized: dict[str, str] = {}
    kept: dict[str, str] = {}
    nodes: list[Any] = []
    added: list[Any] = []
    for node in proto.graph.node:
        if lm_head_bits and blockwise.is_lm_head(node, weights):
            weight = onnx.numpy_helper.to_array(weights[node.input[1]])
            head = _lm_head_blocks(tensors.get("output.weight") or
                                   tensors.get("token_embd.weight")) if lm_head_bits == 8 else None
            if head is not None and _reproduces(head, weight, node.input[1]):
                replaced[node.input[1]] = (tensors.get("output.weight") or
                                           tensors["token_embd.weight"]).tensor_type.name
            else:
                head = blockwise.quantize(weight, bits=lm_head_bits, symmetric=True)
                kept[node.input[1]] = f"requantized to {lm_head_bits} bits"
            more, inits = blockwise.replace_matmul(node, head, accuracy_level)
            nodes += more
            added += inits
            continue
        target = _target(node, weights, tensors)
        if target is None:
            nodes.append(node)
            continue
        weight = onnx.numpy_helper.to_array(weights[node.input[1]])
        blocks, reused, redone = _weight_blocks(target, tensors, weight, kv, permute,
                                                node.input[1])
        more, inits = blockwise.replace_matmul(node, blocks, accuracy_level)
        nodes += more
        added += inits
        if reused:
            replaced[node.input[1]] = "/".join(sorted(set(reused)))
        if redone:
            requantized[node.input[1]] = ", ".join(redone)
    if not set(replaced) - {n for n in weights if n.endswith("lm_head.weight")}:
        raise UnsupportedError(f"{path.name} has no {'/'.join(REUSED)} layer weights to reuse",
                               fix="use QuantizeOptions.int4() instead")
    blockwise.set_nodes(proto, nodes, added)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    result = Package.derive(
        parent, out_dir, "quantize", proto, method="int4_gguf", source=str(path),
        options={"accuracy_level": accuracy_level, "block_size": BLOCK,
                 "lm_head_bits": lm_head_bits},
        algorithm_used="gguf", bits=4, lm_head_bits=lm_head_bits,
        zero_point_corrections=sum(n.op_type == "Add" and n.name.endswith("/AddCorrection")
                                   for n in proto.graph.node),
        reused=replaced, requantized=requantized, kept_float=kept)
    result.manifest.update_step(size_bytes={"before": parent.size_bytes(),
                                            "after": result.size_bytes()})
    if evaluate:
        from llmopt.evaluate import evaluate as measure

        result.manifest.fidelity = measure(result, parent)
    result.update_step(seconds=round(time.perf_counter() - started, 2))
    return result


def _weight_blocks(target: tuple[int, str, tuple[str, ...]], tensors: dict[str, Any],
                   weight: np.ndarray, kv: dict[str, Any], permute: bool, name: str
                   ) -> tuple[blockwise.Blocks, list[str], list[str]]:
    """The 4-bit blocks of one stacked weight ([K, N]): each GGUF part of a reusable type as
    its own blocks (checked exact against its columns), any other part requantized from the
    package's float columns. Also returns the reused types and the requantized parts."""
    layer, _, names = target
    if not names:  # a layout llama.cpp does not write this way
        return blockwise.quantize(weight, bits=4, block=BLOCK, method="mse"), [], [
            "no GGUF tensor"]
    parts: list[blockwise.Blocks] = []
    reused: list[str] = []
    redone: list[str] = []
    column = 0
    for gguf_name in names:
        tensor = tensors[f"blk.{layer}.{gguf_name}.weight"]
        rows = int(np.asarray(tensor.data).shape[0])
        columns = weight[:, column:column + rows]
        kind = tensor.tensor_type.name
        if kind in REUSED:
            blocks = _blocks(tensor)
            if permute and gguf_name in ("attn_q", "attn_k"):
                heads = kv["num_attention_heads"] if gguf_name == "attn_q" else kv["num_kv_heads"]
                order = _unpermute_rows(blocks.codes.shape[0], heads)
                blocks = blockwise.Blocks(blocks.codes[order], blocks.scales[order],
                                          None if blocks.zeros is None else blocks.zeros[order],
                                          4)
        if kind in REUSED and _reproduces(blocks, columns, f"{name} ({gguf_name})"):
            reused.append(kind)
        else:
            blocks = blockwise.quantize(columns, bits=4, block=BLOCK, method="mse")
            redone.append(f"{gguf_name} {kind}" + (" (not the package's weight)"
                                                   if kind in REUSED else ""))
        parts.append(blocks)
        column += rows
    if column != weight.shape[1]:
        raise UnsupportedError(f"GGUF tensors {', '.join(names)} of layer {layer} have {column} "
                               f"rows, {name} {weight.shape[1]} columns",
                               fix="export the package from this GGUF file, then quantize")
    return _stack(parts), reused, redone


def _stack(parts: list[blockwise.Blocks]) -> blockwise.Blocks:
    """Blocks of consecutive output rows as one: zero points in the widest form any part needs
    (none for all-Q4_0, uint8 beside requantized parts, float beside Q4_1/Q4_K)."""
    if all(b.zeros is None for b in parts):
        zeros = None
    else:
        dtype = np.float32 if any(b.zeros is not None and b.zeros.dtype != np.uint8
                                  for b in parts) else np.uint8
        zeros = np.concatenate([np.full(b.scales.shape, 8, dtype) if b.zeros is None
                                else b.zeros.astype(dtype) for b in parts])
    return blockwise.Blocks(np.concatenate([b.codes for b in parts]),
                            np.concatenate([b.scales for b in parts]), zeros, 4)


def _target(node: Any, weights: dict[str, Any], tensors: dict[str, Any]
            ) -> tuple[int, str, tuple[str, ...]] | None:
    """(layer, llmopt name, GGUF names) for a weight MatMul of a decoder layer: the GGUF
    tensors of the first layout of LAYER_TENSORS all in the file, or none."""
    if node.op_type != "MatMul" or node.input[1] not in weights:
        return None
    name = node.input[1]
    if not name.startswith("model.layers.") or not name.endswith(".weight"):
        return None
    layer, _, rest = name.removeprefix("model.layers.").partition(".")
    key = rest.removesuffix(".weight")
    if key not in LAYER_TENSORS:
        return None
    for names in LAYER_TENSORS[key]:
        if all(f"blk.{layer}.{n}.weight" in tensors for n in names):
            return int(layer), key, names
    return int(layer), key, ()


def reusable(path: Path) -> bool:
    """Whether ``path`` holds layer weights (see LAYER_TENSORS) in a type whose blocks int4
    reuses (REUSED); the others are requantized beside them."""
    from llmopt.exporter.sources import gguf_reader

    try:
        reader = gguf_reader(path)
    except (OSError, ValueError):
        return False
    wanted = {n for layouts in LAYER_TENSORS.values() for names in layouts for n in names}
    return any(t.tensor_type.name in REUSED for t in reader.tensors
               if t.name.startswith("blk.") and t.name.split(".")[2] in wanted)


def _lm_head_blocks(tensor: Any) -> blockwise.Blocks | None:
    """The LM head's GGUF tensor ([N, K] rows of blocks) as exact 8-bit blocks: Q8_0 (``w = d *
    q``, q int8) with the implicit zero point 128; a 4-bit type widened (codes + 120, zero
    point + 120: same ``(q - z) * scale``); None for any other type."""
    if tensor is None:
        return None
    kind = tensor.tensor_type.name
    if kind in REUSED:
        four = _blocks(tensor)
        zeros = None if four.zeros is None else four.zeros + np.float32(120)
        return blockwise.Blocks((four.codes + 120).astype(np.uint8), four.scales, zeros, bits=8)
    if kind != "Q8_0":
        return None
    raw = np.asarray(tensor.data, dtype=np.uint8)
    blocks = raw.reshape(raw.shape[0], -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return blockwise.Blocks(codes, d, None, bits=8)


def _blocks(tensor: Any) -> blockwise.Blocks:
    """A Q4_0/Q4_1/Q4_K tensor as blocks of 32: codes [rows, nblocks, 32], scales, zero
    points (none for Q4_0: MatMulNBits' default 8 is its own)."""
    if tensor.tensor_type.name == "Q4_K":
        return _q4_k_blocks(tensor)
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    kind = tensor.tensor_type.name
    size = 20 if kind == "Q4_1" else 18
    blocks = raw.reshape(rows, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., size - 16:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j, then j + 16
    if kind == "Q4_0":
        return blockwise.Blocks(codes, d, None, bits=4)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return _affine(codes, d, m)


def _q4_k_blocks(tensor: Any) -> blockwise.Blocks:
    """Q4_K super-blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins,
    128 bytes of codes) as blocks of 32: ``w = (d * sc_j) * q - dmin * m_j``.

    The 12 scale bytes (after gguf-py's ``Q4_K.get_scale_min``), sub-blocks 0-3 in the low
    6 bits of bytes 0-7, sub-blocks 4-7 split over bytes 8-11 and the top 2 bits::

        byte  0-3   hh aaaaaa    sc[0..3], top bits of sc[4..7]
        byte  4-7   hh bbbbbb    m[0..3],  top bits of m[4..7]
        byte  8-11  mmmm ssss    low 4 bits of m[4..7] | sc[4..7]

    The codes come in 4 chunks of 32 bytes: sub-block 2i in the low nibbles, 2i+1 in the high.
    """
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 144)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:16]
    low, high, split = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 0x3F, (split & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([high & 0x3F, (split >> 4) | ((high >> 2) & 0x30)], axis=-1)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, -1, 32)
    scale = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)
    offset = (dmin[..., None] * mins.astype(np.float32)).reshape(rows, -1)
    return _affine(codes, scale, -offset)


def _affine(codes: np.ndarray, scale: np.ndarray, low: np.ndarray) -> blockwise.Blocks:
    """Blocks of ``w = scale * q + low`` with the float zero point ``-low / scale``; a block
    with scale 0 is the constant ``low``: code 1, scale ``low``, zero point 0."""
    zero = np.divide(-low, scale, out=np.zeros_like(scale), where=scale != 0)
    flat = scale == 0
    codes = np.where(flat[..., None], 1, codes).astype(np.uint8)
    return blockwise.Blocks(codes, np.where(flat, low, scale).astype(np.float32),
                            zero.astype(np.float32), bits=4)


def _unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order transformers' GGUF loader applies to q/k (inverse of llama.cpp's)."""
    index = np.arange(rows)
    return index.reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)


def _reproduces(blocks: blockwise.Blocks, weight: np.ndarray, name: str) -> bool:
    """Whether the blocks reproduce the package's float weight ([K, N]) to float rounding.
    A weight the builder changed (a scale folded in) is not an error: the caller requantizes
    it; a shape that differs means another file."""
    values = blocks.dequantize()
    if values.shape != weight.shape:
        raise UnsupportedError(f"GGUF blocks for {name} have shape {values.shape}, the package "
                               f"{weight.shape}", fix="export the package from this GGUF file")
    diff = float(np.max(np.abs(values - weight)))
    scale = float(np.max(np.abs(weight))) or 1.0
    if diff > 1e-3 * scale:
        log.warning("GGUF blocks do not reproduce %s (max diff %.3g): requantizing it", name,
                    diff)
        return False
    return True
