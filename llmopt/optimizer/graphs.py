"""Graph rewrites behind ``optimize``: re-emission in fused form, ONNX Runtime's basic passes."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import UnsupportedError
from llmopt.package import Package, save_model

# fusion -> the op types that show it fired
FUSED_OPS = {
    "norm": ("RMSNormalization", "SimplifiedLayerNormalization"),  # LayerNorm is always 1 op
    "skip_norm": ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization"),
    "attention": ("Attention", "RotaryEmbedding", "MultiHeadAttention", "GroupQueryAttention"),
    "activation": ("FastGelu", "Gelu", "BiasGelu", "QuickGelu"),
    "moe": ("MoE", "QMoE"),
}


def initializers(package: Package) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(package.model_path))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def reemit(package: Package, fusions: frozenset[str], dtype: str,
           gqa: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """The package's graph emitted again from its own weights, with ``fusions`` applied
    (``gqa``: the decoder's fused attention op, see ``build_decoder``)."""
    tensors = initializers(package)
    if package.is_decoder:
        proto, notes = _reemit_decoder(package, tensors, fusions, dtype, gqa)
    else:
        from llmopt.exporter.encoder import reemit_encoder

        proto, notes = reemit_encoder(package, tensors, fusions, dtype)
    if not any(name.endswith(".moe.router.weight") for name in tensors):
        notes.setdefault("moe", "not applicable: no mixture-of-experts layers")
    return proto, {"fusions": fusion_report(proto, fusions, notes, "no matching pattern")}


def fusion_report(proto: Any, fusions: frozenset[str], notes: dict[str, str],
                  default_reason: str) -> dict[str, Any]:
    """For each requested fusion, the fused ops it left in ``proto``, or why it did not fire
    (``notes``, else ``default_reason``)."""
    counts = Counter(node.op_type for node in proto.graph.node)
    report: dict[str, Any] = {}
    for fusion in sorted(fusions):
        fired = {op: counts[op] for op in FUSED_OPS[fusion] if counts[op]}
        report[fusion] = {"fired": True, "ops": fired} if fired else {
            "fired": False, "reason": notes.get(fusion, default_reason)}
        if fired and fusion in notes:  # fired, but not everywhere it would elsewhere
            report[fusion]["note"] = notes[fusion]
    return report


def _reemit_decoder(package: Package, tensors: dict[str, np.ndarray], fusions: frozenset[str],
                    dtype: str, gqa: bool | None) -> tuple[Any, dict[str, str]]:
    from transformers import AutoConfig

    from llmopt.exporter import registry
    from llmopt.exporter.decoder import read_dims, weights_from_onnx
    from llmopt.exporter.decoder_graph import build_decoder

    kv = package.kv_cache
    arch: Any = registry.find(package.manifest.model_type, "text-generation")
    weights = weights_from_onnx(tensors, int(kv["num_layers"]))
    config = AutoConfig.from_pretrained(str(package.path))
    dims = read_dims(arch, config, weights.inv_freq,
                     float(kv.get("rope_attention_scaling") or 1.0),
                     float(kv.get("rope_local_attention_scaling") or 1.0))
    notes = {}
    if weights.inv_freq is None and "attention" in fusions:
        notes["rotary"] = "not applicable: learned absolute positions"
    if arch.norm == "layer" and "norm" in fusions:
        notes["norm"] = "not applicable: LayerNormalization is already one op"
    if "skip_norm" in fusions and dims.parallel_residual:
        notes["skip_norm"] = ("parallel attention + MLP: one residual Add + norm a layer to "
                              "fuse; attention and MLP outputs are summed by a plain Add")
    if "activation" in fusions and not dims.activation.startswith("gelu"):
        notes["activation"] = (f"not applicable: {dims.activation} (ONNX Runtime fuses "
                               "Sigmoid*Mul itself)")
    if dims.num_experts and dims.activation != "silu":
        notes["moe"] = f"ONNX Runtime's MoE takes SwiGLU experts, not {dims.activation}"
    elif dims.num_experts and not dims.normalize_top_k:
        notes["moe"] = "not fused: unnormalized top-k routing (ONNX Runtime 1.31 disagrees)"
    return build_decoder(dims, weights, arch.norm, np.dtype(dtype), fusions, gqa), notes


def ort_fusions(proto: Any, fusions: frozenset[str]) -> tuple[Any, dict[str, Any]]:
    """A traced graph with ONNX Runtime's extended (fusing) optimizations saved offline, and which
    of the requested fusions fired."""
    import onnxruntime as ort

    fused = ort_basic(proto, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    report = fusion_report(fused, fusions, {},
                           "ONNX Runtime found no matching pattern in the traced graph")
    return fused, {"fusions": report, "fused_by": "onnxruntime (extended level)"}


def ort_basic(proto: Any, level: Any = None) -> Any:
    """ONNX Runtime's provider-independent basic optimizations (or ``level``), saved offline."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        large = save_model(proto, src)
        options = ort.SessionOptions()
        options.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(dst)
        options.log_severity_level = 3
        if large:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "out.onnx.data")
        try:
            ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001  (onnxruntime's exception types are private)
            raise UnsupportedError(f"ONNX Runtime could not optimize the graph: {exc}",
                                   fix="use --level 0, or report the model") from None
        return onnx.load(str(dst))
