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

Which kernel is faster for prompts depends on the CPU: on a Sapphire Rapids (AMX) the float32
kernel took TTFT from 219 to 153 ms, on a Zen 4 it went the other way (153 ms with the
int8-compute kernel, 172 ms with the float32 one; 771 and 880 ms at 512 prompt tokens;
``bench/results/prompt_session*``). So unless
``CPUOptions(float_prompts=...)`` says, :func:`float_kernel_pays` times one prompt-shaped
MatMulNBits in both compute types once per process (about 50 ms) and the second session is
opened only where the float32 kernel wins by :data:`FLOAT_MARGIN`. Where llmopt's own CPU
kernels run (:mod:`llmopt.runtime.kernels`), their MatMulQ takes the prompts (SmolLM2 int4 on
Zen 4: TTFT about 70 ms), and neither the probe nor the second session happens unless
``float_prompts=True`` asks for it.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.package import INT8_COMPUTE, float_prompt_nodes

# ONNX Runtime's session config key for the folder of external initializers of a model given
# as bytes (the package folder)
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
FLOAT_COMPUTE = 1  # MatMulNBits accuracy_level: float32 activations
# The float32 kernel must be this much faster to pay for the second session (its own packed
# copy of the 4-bit weights: about 130 MB of RSS on SmolLM2-135M) and to stay chosen through
# timing noise.
FLOAT_MARGIN = 1.1
# The probe: a prompt of 128 rows through a 1024 x 1024 4-bit weight in blocks of 32 (the
# shapes of a small decoder's projections; on both CPUs measured the kernel ratio matched the
# whole prompt's)
PROBE_ROWS, PROBE_K, PROBE_N, PROBE_BLOCK = 128, 1024, 1024, 32

log = logging.getLogger("llmopt.runtime")


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


def float_kernel_pays(threads: int | None) -> bool:
    """Whether int4 prompts should run on the float32 kernel on this machine: ONNX Runtime's
    float32 4-bit kernel at least :data:`FLOAT_MARGIN` times faster than its int8-compute
    kernel on a prompt-shaped MatMulNBits (:func:`kernel_timings`, measured once per thread
    count and process)."""
    timings = kernel_timings(threads)
    pays = timings[FLOAT_COMPUTE] * FLOAT_MARGIN <= timings[INT8_COMPUTE]
    log.info("int4 prompts on the %s kernel: a %dx%d 4-bit MatMul of %d rows took %.2f ms in "
             "float32, %.2f ms with int8 activations (%s threads)",
             "float32" if pays else "int8-compute", PROBE_K, PROBE_N, PROBE_ROWS,
             timings[FLOAT_COMPUTE] * 1e3, timings[INT8_COMPUTE] * 1e3, threads or "default")
    return pays


@functools.lru_cache(maxsize=8)
def kernel_timings(threads: int | None, rounds: int = 9) -> dict[int, float]:
    """Seconds per run of one MatMulNBits (:data:`PROBE_ROWS` rows, ``PROBE_K x PROBE_N``
    4-bit weight) at each accuracy level, the best of ``rounds`` interleaved runs on
    ``threads`` intra-op threads (None: ONNX Runtime's default)."""
    import onnxruntime as ort

    from llmopt.runtime.providers import CPUOptions

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # threads that spin after a run would share the cores with the other kernel's next run
    CPUOptions(intra_op_threads=threads or None, spin=False).apply(options)
    sessions = {level: ort.InferenceSession(_probe_model(level), options,
                                            providers=["CPUExecutionProvider"])
                for level in (FLOAT_COMPUTE, INT8_COMPUTE)}
    x = np.random.default_rng(0).standard_normal((PROBE_ROWS, PROBE_K)).astype(np.float32)
    best = {level: float("inf") for level in sessions}
    for round_ in range(rounds + 1):
        for level, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {"x": x})
            if round_:  # the first run of each packs its weights
                best[level] = min(best[level], time.perf_counter() - started)
    return best


def _probe_model(accuracy_level: int) -> bytes:
    """One MatMulNBits ``x [rows, K] @ W`` with random 4-bit codes, symmetric blocks."""
    from onnx import TensorProto, helper, numpy_helper

    blocks = PROBE_K // PROBE_BLOCK
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (PROBE_N, blocks, PROBE_BLOCK // 2), dtype=np.uint8)
    scales = (rng.random(PROBE_N * blocks) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["y"],
                            domain="com.microsoft", K=PROBE_K, N=PROBE_N, bits=4,
                            block_size=PROBE_BLOCK, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", PROBE_K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", PROBE_N])],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # what every supported ONNX Runtime reads
    return bytes(model.SerializeToString())
