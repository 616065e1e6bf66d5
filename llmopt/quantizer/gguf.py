"""int4 packages that reuse a GGUF file's 4-bit blocks exactly (no second rounding).

GGUF Q4_0 stores blocks of 32 weights as ``w = d * (q - 8)`` and Q4_1 as ``w = d * q + m``;
ONNX Runtime's ``MatMulNBits`` computes ``w = (q - zero_point) * scale`` per block of 32 along
the input axis. Q4_0 maps with zero point 8, Q4_1 with a float zero point ``-m / d``. Both
keep the very 4-bit codes llama.cpp uses, so the int4 package computes what the dequantized
float package computes (checked weight by weight before anything is written).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError, UnsupportedError
from llmopt.package import Package, graph_signature, now_iso, write_derived

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
                       evaluate: bool = True) -> Package:
    import onnx
    from gguf import GGUFReader

    source = parent.manifest.get("source") or {}
    if source.get("kind") != "gguf":
        raise InvalidInputError("this package was not exported from a GGUF file",
                                fix="use QuantizeOptions.int4() to quantize its float weights")
    path = Path(source["reference"]).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"the GGUF source {path} is gone",
                                fix="put the file back or quantize with QuantizeOptions.int4()")
    started = time.perf_counter()
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    proto = onnx.load(str(parent.model_path))
    weights = {t.name: t for t in proto.graph.initializer}
    kv = parent.kv_cache
    permute = parent.manifest.get("model_type") in PERMUTED
    replaced: dict[str, str] = {}
    kept: dict[str, str] = {}
    nodes = []
    for node in proto.graph.node:
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
        codes, scales, zeros = _stack(parts, target[2], kv, permute)
        float_weight = onnx.numpy_helper.to_array(weights[node.input[1]])
        _check_exact(codes, scales, zeros, float_weight, node.input[1])
        nodes.append(_matmul_nbits(node, codes, scales, zeros, proto, accuracy_level))
        replaced[node.input[1]] = "/".join(sorted(kinds))
    if not replaced:
        raise UnsupportedError(f"{path.name} has no Q4_0/Q4_1 layer weights to reuse",
                               fix="use QuantizeOptions.int4() instead")
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {i for n in proto.graph.node for i in n.input}
    kept_inits = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept_inits)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    manifest = dict(parent.manifest)
    manifest["signature"] = graph_signature(proto)
    manifest["steps"] = [*parent.manifest.get("steps", []), {
        "stage": "quantize", "time": now_iso(), "method": "int4_gguf", "source": str(path),
        "options": {"accuracy_level": accuracy_level, "block_size": BLOCK},
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


def _blocks(tensor: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes [rows, nblocks, 32] uint8, scales and zero points [rows, nblocks] float32."""
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    kind = tensor.tensor_type.name
    size = 20 if kind == "Q4_1" else 18
    blocks = raw.reshape(rows, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., size - 16:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j, then j + 16
    if kind == "Q4_0":
        return codes, d, np.full_like(d, 8.0)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    zero = np.divide(-m, d, out=np.zeros_like(d), where=d != 0)
    flat = d == 0  # a constant block (w = m): code 1, scale m, zero point 0
    codes = np.where(flat[..., None], 1, codes).astype(np.uint8)
    return codes, np.where(flat, m, d), zero


def _stack(parts: list[Any], names: tuple[str, ...], kv: dict[str, Any],
           permute: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = []
    for part, name in zip(parts, names, strict=True):
        codes, scales, zeros = _blocks(part)
        if permute and name in ("attn_q", "attn_k"):
            heads = kv["num_attention_heads"] if name == "attn_q" else kv["num_kv_heads"]
            order = _unpermute_rows(codes.shape[0], heads)
            codes, scales, zeros = codes[order], scales[order], zeros[order]
        out.append((codes, scales, zeros))
    return tuple(np.concatenate([o[i] for o in out]) for i in range(3))  # type: ignore[return-value]


def _unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order transformers' GGUF loader applies to q/k (inverse of llama.cpp's)."""
    index = np.arange(rows)
    return index.reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)


def _check_exact(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                 weight: np.ndarray, name: str) -> None:
    """The blocks must reproduce the package's float weight ([K, N]) to float rounding."""
    values = ((codes.astype(np.float32) - zeros[..., None]) * scales[..., None])
    values = values.reshape(codes.shape[0], -1).T
    if values.shape != weight.shape:
        raise UnsupportedError(f"GGUF blocks for {name} have shape {values.shape}, the package "
                               f"{weight.shape}", fix="export the package from this GGUF file")
    diff = float(np.max(np.abs(values - weight)))
    scale = float(np.max(np.abs(weight))) or 1.0
    if diff > 1e-3 * scale:
        raise UnsupportedError(f"GGUF blocks do not reproduce {name} (max diff {diff:.3g})",
                               fix="export the package from this GGUF file, then quantize")


def _matmul_nbits(node: Any, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                  proto: Any, accuracy_level: int) -> Any:
    from onnx import helper, numpy_helper

    n, blocks, _ = codes.shape
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    base = node.input[1].removesuffix(".weight")
    inits = [numpy_helper.from_array(packed, f"{base}.q4"),
             numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{base}.scales")]
    integral = np.all(zeros == 8.0)
    if not integral:
        inits.append(numpy_helper.from_array(zeros.reshape(-1).astype(np.float32),
                                             f"{base}.zero_points"))
    proto.graph.initializer.extend(inits)
    return helper.make_node(
        "MatMulNBits", [node.input[0], *(i.name for i in inits)], list(node.output),
        name=node.name.replace("/MatMul", "/MatMulNBits"), domain="com.microsoft",
        K=blocks * BLOCK, N=n, bits=4, block_size=BLOCK, accuracy_level=accuracy_level)
