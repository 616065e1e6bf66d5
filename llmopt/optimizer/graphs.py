"""Graph rewrites behind ``optimize``: re-emission in fused form, ONNX Runtime's basic passes."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import UnsupportedError
from llmopt.exporter import registry
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
    (``gqa``: the decoder's fused attention op, see ``build_decoder``). The package's
    architecture description re-emits it: each kind (decoder, encoder) has one entry."""
    tensors = initializers(package)
    arch = registry.find(package.manifest.model_type, package.task)
    proto, notes = arch.reemit(package, tensors, fusions, dtype, gqa)
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
