"""The prompt session of an int4 package on CPU: the same graph, its 4-bit MatMuls in float32.

llmopt's int4 packages run MatMulNBits at ``accuracy_level=4``: ONNX Runtime quantizes each
row of activations to int8 and takes integer dot products with the 4-bit codes. That is the
fastest kernel for a decode step, one row per weight, where the step is bound by reading the
weights. A prompt is the other case: a hundred rows or more per weight, bound by arithmetic,
and there ONNX Runtime's float32 kernel for the same codes (``accuracy_level=1``: dequantize a
block, then SGEMM) is faster, and exact to the weights (no int8 rounding of the activations).
Measured on SmolLM2-135M int4, 2 threads: TTFT 219 -> 153 ms at
108 prompt tokens, 1058 -> 846 ms at 512 (``bench/results/prompt_session/``). The 8-bit
kernel has no float32 path (ONNX Runtime dequantizes the whole matrix per call instead), so
int8 packages keep one session.

:func:`prompt_model` returns the package graph with only that attribute changed; the runtime
opens it as a second session (:attr:`llmopt.runtime.kv.DecoderModel.prompt_session`) that runs
every prompt step on the same KV cache as the decode session. Its weights stay in the package's
weights file (int4 packages are saved with ``model.onnx.data``), the embedding table is one
read-only map both sessions share, and its threads do not spin. Cost: peak RSS 472 MB
instead of 342 MB (the float kernel packs its own copy of the 4-bit weights), and a fraction
of a second of loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.package import float_prompt_nodes

# ONNX Runtime's session config key for the folder of external initializers of a model given
# as bytes (the package folder)
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
FLOAT_COMPUTE = 1  # MatMulNBits accuracy_level: float32 activations


@dataclass
class PromptGraph:
    """The prompt session's graph (``model``, serialized, its weights left in the package's
    weights file) and the tables both sessions read as stored (``shared``: the embedding, as a
    read-only map of the weights file), handed to each session as one OrtValue so they are held
    once."""

    model: bytes
    shared: dict[str, np.ndarray]

    def values(self) -> dict[str, Any]:
        """OrtValues over :attr:`shared` (no copy; the arrays must outlive the sessions)."""
        import onnxruntime as ort

        return {name: ort.OrtValue.ortvalue_from_numpy(array)
                for name, array in self.shared.items()}


def prompt_model(model_path: str | Path) -> PromptGraph | None:
    """The graph at ``model_path`` with its 4-bit int8-compute MatMulNBits computing in float32;
    None when it has none (fp32, int8 and int8-dynamic packages) or keeps its weights inside
    ``model.onnx`` (packages quantized before llmopt stored int4 weights beside the graph:
    reading and re-serializing them would cost more memory at load than the session saves)."""
    import onnx

    path = Path(model_path)
    proto = onnx.load(str(path), load_external_data=False)
    nodes = float_prompt_nodes(proto)
    if not nodes or not any(t.data_location == onnx.TensorProto.EXTERNAL
                            for t in proto.graph.initializer):
        return None
    for node in nodes:
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = FLOAT_COMPUTE
    # tables that Gather reads are used as stored (no prepacking): one map for both sessions
    gathered = {node.input[0] for node in proto.graph.node if node.op_type == "Gather"}
    shared = {t.name: _mapped(t, path.parent) for t in proto.graph.initializer
              if t.name in gathered and t.data_location == onnx.TensorProto.EXTERNAL}
    return PromptGraph(proto.SerializeToString(), shared)


def _mapped(tensor: Any, folder: Path) -> np.ndarray:
    """An external initializer as a read-only map of its bytes in the weights file."""
    from onnx import helper

    where = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    return np.memmap(folder / where["location"], dtype=dtype, mode="r",
                     offset=int(where.get("offset", 0)), shape=tuple(tensor.dims))
