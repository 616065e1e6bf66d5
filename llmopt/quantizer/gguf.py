"""int4 packages that reuse a GGUF file's 4-bit blocks exactly (no second rounding).

GGUF Q4_0 stores blocks of 32 weights as ``w = d * (q - 8)`` and Q4_1 as ``w = d * q + m``;
ONNX Runtime's ``MatMulNBits`` computes ``w = (q - zero_point) * scale`` per block of 32 along
the input axis. Q4_0 maps with zero point 8, Q4_1 with a float zero point ``-m / d``, which
llmopt moves into a small correction beside the symmetric kernel (``blockwise.correction``) so
the fast int8-compute path still runs. A Q8_0 token embedding (``w = d * q``) that the model
ties to its LM head becomes an exact 8-bit LM head. All keep the very codes llama.cpp uses, so
the package computes what the dequantized float package computes (checked weight by weight
before anything is written).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError, UnsupportedError
from llmopt.package import Package, graph_signature, now_iso, write_derived
from llmopt.quantizer import blockwise

log = logging.getLogger("llmopt.quantize")
BLOCK = 32
# llmopt initializer -> GGUF tensors whose rows it stacks (in order)
LAYER_TENSORS = {
    "attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "attn.o_proj": ("attn_output",),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
    "mlp.fc_out": ("ffn_down",),
}
PERMUTED = ("llama", "mistral")  # llama.cpp reorders q/k rows for these; undo it


def quantize_from_gguf(parent: Package, out_dir: Any, accuracy_level: int = 4,
                       evaluate: bool = True, lm_head_bits: int | None = 8) -> Package:
    import onnx

    from llmopt.exporter.sources import gguf_reader

    source = parent.manifest.get("source") or {}
    if source.get("kind") != "gguf":
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
    permute = parent.manifest.get("model_type") in PERMUTED
    replaced: dict[str, str] = {}
    kept: dict[str, str] = {}
    nodes: list[Any] = []
    added: list[Any] = []
    for node in proto.graph.node:
        if lm_head_bits and blockwise.is_lm_head(node, weights):
            weight = onnx.numpy_helper.to_array(weights[node.input[1]])
            head = _lm_head_blocks(tensors.get("output.weight") or
                                   tensors.get("token_embd.weight")) if lm_head_bits == 8 else None
            if head is not None:
                _check_exact(head, weight, node.input[1])
                replaced[node.input[1]] = "Q8_0"
            else:
                head = blockwise.quantize(weight, bits=lm_head_bits, symmetric=True)
                kept[node.input[1]] = f"requantized to {lm_head_bits} bits"
            more, inits = blockwise.replace_matmul(node, head, accuracy_level)
            nodes += more
            added += inits
            continue
        target = _target(node, weights)
        if target is None:
            nodes.append(node)
            continue
        parts = [tensors.get(f"blk.{target[0]}.{name}.weight") for name in target[2]]
        kinds = {p.tensor_type.name if p is not None else "missing" for p in parts}
        if not kinds <= {"Q4_0", "Q4_1"}:
            kept[node.input[1]] = "/".join(sorted(kinds))
            nodes.append(node)
            continue
        blocks = _stack(parts, target[2], kv, permute)
        _check_exact(blocks, onnx.numpy_helper.to_array(weights[node.input[1]]), node.input[1])
        more, inits = blockwise.replace_matmul(node, blocks, accuracy_level)
        nodes += more
        added += inits
        replaced[node.input[1]] = "/".join(sorted(kinds))
    if not replaced:
        raise UnsupportedError(f"{path.name} has no Q4_0/Q4_1 layer weights to reuse",
                               fix="use QuantizeOptions.int4() instead")
    blockwise.set_nodes(proto, nodes, added)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    manifest = dict(parent.manifest)
    manifest["signature"] = graph_signature(proto)
    manifest["steps"] = [*parent.manifest.get("steps", []), {
        "stage": "quantize", "time": now_iso(), "method": "int4_gguf", "source": str(path),
        "options": {"accuracy_level": accuracy_level, "block_size": BLOCK,
                    "lm_head_bits": lm_head_bits},
        "algorithm_used": "gguf", "bits": 4, "lm_head_bits": lm_head_bits,
        "zero_point_corrections": sum(n.op_type == "Add" and n.name.endswith("/AddCorrection")
                                      for n in proto.graph.node),
        "parent": str(parent.path), "reused": replaced, "kept_float": kept,
    }]
    manifest["validation"] = manifest["fidelity"] = None
    result = write_derived(parent, out_dir, proto, manifest)
    step = result.manifest["steps"][-1]
    step["size_bytes"] = {"before": parent.size_bytes(), "after": result.size_bytes()}
    if evaluate:
        from llmopt.evaluate import evaluate as measure

        result.manifest["fidelity"] = measure(result, parent)
    step["seconds"] = round(time.perf_counter() - started, 2)
    result.write_manifest()
    return result


def _target(node: Any, weights: dict[str, Any]) -> tuple[int, str, tuple[str, ...]] | None:
    """(layer, llmopt name, GGUF names) for a weight MatMul of a decoder layer."""
    if node.op_type != "MatMul" or node.input[1] not in weights:
        return None
    name = node.input[1]
    if not name.startswith("model.layers.") or not name.endswith(".weight"):
        return None
    layer, _, rest = name.removeprefix("model.layers.").partition(".")
    key = rest.removesuffix(".weight")
    return (int(layer), key, LAYER_TENSORS[key]) if key in LAYER_TENSORS else None


def reusable(path: Path) -> bool:
    """Whether every layer weight llmopt maps (see LAYER_TENSORS) is Q4_0 or Q4_1 in ``path``."""
    from llmopt.exporter.sources import gguf_reader

    try:
        reader = gguf_reader(path)
    except (OSError, ValueError):
        return False
    wanted = {name for names in LAYER_TENSORS.values() for name in names}
    kinds = {t.tensor_type.name for t in reader.tensors
             if t.name.startswith("blk.") and t.name.split(".")[2] in wanted}
    return bool(kinds) and kinds <= {"Q4_0", "Q4_1"}


def _lm_head_blocks(tensor: Any) -> blockwise.Blocks | None:
    """A Q8_0 tensor ([N, K] rows of blocks ``w = d * q``, q int8) as 8-bit blocks with the
    implicit zero point 128; None for any other type."""
    if tensor is None or tensor.tensor_type.name != "Q8_0":
        return None
    raw = np.asarray(tensor.data, dtype=np.uint8)
    blocks = raw.reshape(raw.shape[0], -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return blockwise.Blocks(codes, d, None, bits=8)


def _blocks(tensor: Any) -> blockwise.Blocks:
    """A Q4_0/Q4_1 tensor as blocks: codes [rows, nblocks, 32], float zero points."""
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
    zero = np.divide(-m, d, out=np.zeros_like(d), where=d != 0)
    flat = d == 0  # a constant block (w = m): code 1, scale m, zero point 0
    codes = np.where(flat[..., None], 1, codes).astype(np.uint8)
    return blockwise.Blocks(codes, np.where(flat, m, d), zero.astype(np.float32), bits=4)


def _stack(parts: list[Any], names: tuple[str, ...], kv: dict[str, Any],
           permute: bool) -> blockwise.Blocks:
    out = []
    for part, name in zip(parts, names, strict=True):
        blocks = _blocks(part)
        if permute and name in ("attn_q", "attn_k"):
            heads = kv["num_attention_heads"] if name == "attn_q" else kv["num_kv_heads"]
            order = _unpermute_rows(blocks.codes.shape[0], heads)
            blocks = blockwise.Blocks(blocks.codes[order], blocks.scales[order],
                                      None if blocks.zeros is None else blocks.zeros[order], 4)
        out.append(blocks)
    if any(b.zeros is None for b in out) and any(b.zeros is not None for b in out):
        out = [b if b.zeros is not None else  # Q4_0 beside Q4_1: give it its zero point 8
               blockwise.Blocks(b.codes, b.scales, np.full(b.scales.shape, 8.0, np.float32), 4)
               for b in out]
    zeros = None if out[0].zeros is None else np.concatenate([b.zeros for b in out])
    return blockwise.Blocks(np.concatenate([b.codes for b in out]),
                            np.concatenate([b.scales for b in out]), zeros, 4)


def _unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order transformers' GGUF loader applies to q/k (inverse of llama.cpp's)."""
    index = np.arange(rows)
    return index.reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)


def _check_exact(blocks: blockwise.Blocks, weight: np.ndarray, name: str) -> None:
    """The blocks must reproduce the package's float weight ([K, N]) to float rounding."""
    values = blocks.dequantize()
    if values.shape != weight.shape:
        raise UnsupportedError(f"GGUF blocks for {name} have shape {values.shape}, the package "
                               f"{weight.shape}", fix="export the package from this GGUF file")
    diff = float(np.max(np.abs(values - weight)))
    scale = float(np.max(np.abs(weight))) or 1.0
    if diff > 1e-3 * scale:
        raise UnsupportedError(f"GGUF blocks do not reproduce {name} (max diff {diff:.3g})",
                               fix="export the package from this GGUF file, then quantize")
