"""llmopt's own CPU kernels for ONNX Runtime: ``MatMulQ`` and ``MatMulF``
(``llmopt/kernels/cpu_kernels.cc``).

ONNX Runtime's MatMulNBits takes its fast int8-activation path only for integer zero points,
so the float zero points of GGUF Q4_1 (and HQQ) blocks ran as a symmetric MatMulNBits with
block-sum columns plus three correction nodes (Split, MatMul, Add;
:func:`llmopt.quantizer.blockwise.summed_correction`), and every int4 MatMul of a decode step
read its activations, wrote its block sums, and launched four kernels. ``MatMulQ`` computes
``x @ w`` for affine blocks ``w = s * q + m`` in one pass over the weights: 4- or 8-bit codes in
blocks of 32, ``s`` and ``m`` beside them (float16 where that holds them exactly, as GGUF's do,
else float32: :func:`scale_bits`), activations rounded to int8 per block as
MatMulNBits rounds them at accuracy level 4 (``INT8_COMPUTE``), integer dot products (AVX-512
VNNI, or AVX2), the session's own thread pool.

``MatMulF`` is the float32 product for a few rows (a decode step), the weights in tiles of 16
columns read once per pass of up to 8 rows; ONNX Runtime's MatMul reads them at a lower rate
there (SmolLM2-135M fused, 2 threads: decode 39.6 -> 49.2 tokens/s in the Generator).

The package keeps its portable graph. On CPU, :func:`kernel_model` rewrites the graph in memory
when the session opens: every int8-compute MatMulNBits in blocks of 32, with its correction
nodes when it has them, becomes one ``MatMulQ`` over the same codes (same weights, same
activation rounding), every MatMul by a float32 weight one ``MatMulF``. Both compute each row
on its own, in the same order whatever the batch (the serving engine's batch invariance holds).
The library is compiled from its one source file on first use with the system C++ compiler and
cached (``~/.cache/llmopt/kernels``), for the best instruction set this CPU has (:data:`ISAS`:
AVX-512 with VNNI, else AVX2 with FMA and F16C; the two builds compute the same floats);
where there is no compiler, neither instruction set or an ONNX Runtime older than 1.17, the
package runs as before and :func:`unavailable` says why. ``LLMOPT_KERNELS_ISA=avx2`` picks the
AVX2 build on a CPU that has both (to compare them), ``none`` turns the kernels off in every
session of the process (to measure ONNX Runtime's own).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llmopt.package import INT8_COMPUTE

log = logging.getLogger("llmopt.runtime")

SOURCE = Path(__file__).resolve().parents[1] / "kernels" / "cpu_kernels.cc"
DOMAIN = "ai.llmopt"
OP = "MatMulQ"
FLOAT_OP = "MatMulF"
ATTENTION_OP = "GroupAttention"
NONE, SILU_MUL, GELU = 0, 1, 2  # the kernels' ``activation``: what follows the product
FLOAT = 1  # onnx.TensorProto.FLOAT
BLOCK, TILE = 32, 16
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
# The builds of the library, best first: each one's compiler flags and the CPU flags
# (/proc/cpuinfo's names) it needs. AVX2 runs each 16-lane vector as two halves and has no VNNI
# (Zen 3, 2 threads: SmolLM2's int4 decode step 9.9 ms against 15.5 on ONNX Runtime's kernels
# and 11.2 for GenAI's int4 graph; bench/results/int4_step_zen3.md).
ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"),
               ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")),
    "avx2": (("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
}
ISA_ENV = "LLMOPT_KERNELS_ISA"
BUILD_TIMEOUT_S = 300


def cache_dir() -> Path:
    root = os.environ.get("LLMOPT_CACHE")
    if root:
        return Path(root) / "kernels"
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path("~/.cache").expanduser()) / "llmopt" / "kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _compile(cxx: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Build the library into ``target``; None, or what went wrong (an unwritable cache
    included: set LLMOPT_CACHE to a writable folder)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run([cxx, *flags, "-o", str(out), str(SOURCE)],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                                  check=False)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["?"])[0]
                return f"building {SOURCE.name} with {cxx} failed: {first}"
            out.replace(target)  # atomic: a concurrent build finds a whole file or none
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"building {SOURCE.name} in {target.parent} failed: {exc}"
    return None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as /proc/cpuinfo names them, or None where it does not say."""
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def plausible(isa: str) -> bool:
    """Whether this CPU may run the ``isa`` build: it has the flags, or does not say."""
    flags = cpu_flags()
    return flags is None or set(ISAS[isa][1]) <= flags


def _candidates() -> tuple[list[str], str | None]:
    """The builds to try, best first, or (nothing, why) when LLMOPT_KERNELS_ISA names none."""
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if wanted == "none":
        return [], f"{ISA_ENV}=none turns them off"
    if wanted and wanted not in ISAS:
        return [], f"{ISA_ENV}={wanted!r} is not one of {', '.join(ISAS)} or none"
    if wanted:
        return [wanted], None
    names = [name for name in ISAS if plausible(name)]  # not built where it could not run
    if not names:
        return [], "this CPU has neither build's instructions (" + "; ".join(
            f"{name}: {', '.join(needs)}" for name, (_, needs) in ISAS.items()) + ")"
    return names, None


class Built(NamedTuple):
    library: Path | None  # None: it cannot run here, and `why` says why
    isa: str | None
    why: str | None


def build(isa: str) -> Built:
    """The library built for ``isa`` (a key of :data:`ISAS`), cached, and whether this CPU runs
    it."""
    cxx = compiler()
    if cxx is None:
        return Built(None, None, "no C++ compiler found (set CXX, or install g++)")
    flags = FLAGS + ISAS[isa][0]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cxx, *flags)).encode())
    target = cache_dir() / digest.hexdigest()[:16] / "libllmopt_kernels.so"
    failed = None if target.is_file() else _compile(cxx, flags, target)
    if failed:
        return Built(None, None, failed)
    try:
        supported = ctypes.CDLL(str(target)).llmopt_kernels_supported()
    except OSError as exc:
        return Built(None, None, f"loading {target} failed: {exc}")
    if not supported:
        return Built(None, None, f"this CPU cannot run the {isa} build (it needs "
                                 f"{', '.join(ISAS[isa][1])})")
    return Built(target, isa, None)


@functools.lru_cache(maxsize=1)
def _built() -> Built:
    """The best build this CPU runs (or the one LLMOPT_KERNELS_ISA names)."""
    import onnxruntime as ort

    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if version < (1, 17):
        return Built(None, None,
                     f"onnxruntime {ort.__version__} is older than 1.17 (no ParallelFor)")
    names, wrong = _candidates()
    why = [wrong] if wrong else []
    for isa in names:
        built = build(isa)
        if built.library is not None:
            return built
        why.append(str(built.why))
    return Built(None, None, "; ".join(why))


def usable_cpus() -> int:
    """CPUs this process may run on (all of them where the OS does not say)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def library() -> Path | None:
    """The built kernel library, or None where it cannot run (see :func:`unavailable`)."""
    return _built().library


def isa() -> str | None:
    """The instruction set the library was built for ("avx512" or "avx2"), or None where it
    cannot run."""
    return _built().isa


def unavailable() -> str | None:
    """Why the kernel library cannot run here, or None when it can."""
    return _built().why


def status() -> str:
    """The build this process runs ("avx512", "avx2"), or "off: " and why (no compiler, no
    AVX2, LLMOPT_KERNELS_ISA=none): what the bench fingerprint and ``llmopt doctor`` report."""
    return isa() or f"off: {unavailable()}"


# -- weights ---------------------------------------------------------------------------------------

def scale_bits(scales: np.ndarray, offsets: np.ndarray) -> int:
    """16 where float16 holds the blocks: every scale exactly (GGUF stores them so) and every
    offset within 1e-4 of its block's step (GGUF's offsets, recomputed in float32 from its
    zero points, round back to its float16 ones); else 32, so the kernel computes the
    package's own weights."""
    half = scales.astype(np.float16).astype(np.float32)
    if not np.array_equal(half, scales):
        return 32
    error = np.abs(offsets.astype(np.float16).astype(np.float32) - offsets)
    return 16 if bool(np.all(error <= 1e-4 * np.abs(scales))) else 32


def symmetric_zero_point(scales: np.ndarray, offsets: np.ndarray, bits: int) -> int:
    """``2^(bits-1)`` where every offset is ``-2^(bits-1) * scale`` (symmetric blocks, such as
    int8's and GGUF Q8_0's: MatMulQ then stores no offsets and derives them), else 0."""
    middle = 1 << (bits - 1)
    return middle if np.array_equal(offsets, np.float32(-middle) * scales) else 0


def pack(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, bits: int,
         scale_bits: int = 16) -> np.ndarray:
    """Affine blocks ``w[n, b*32 + i] = scales[n, b] * codes[n, b, i] + offsets[n, b]`` in
    MatMulQ's layout: uint8 [ceil(N/16), K/32, stride] (see cpu_kernels.cc), scales and offsets
    in float16 or float32 (``scale_bits``); ``offsets`` None for symmetric blocks (the kernel's
    ``zero_point``)."""
    n, nblocks, block = codes.shape
    if block != BLOCK or bits not in (4, 8):
        raise ValueError(f"MatMulQ takes blocks of {BLOCK} with 4 or 8 bits")
    tiles = -(-n // TILE)
    pad = tiles * TILE - n
    if pad:
        codes = np.concatenate([codes, np.zeros((pad, nblocks, block), codes.dtype)])
        scales = np.concatenate([scales, np.zeros((pad, nblocks), scales.dtype)])
        if offsets is not None:
            offsets = np.concatenate([offsets, np.zeros((pad, nblocks), offsets.dtype)])
    c = codes.astype(np.uint8).reshape(tiles, TILE, nblocks, BLOCK).transpose(0, 2, 3, 1)
    # c: [tile, block, k, col]
    if bits == 4:  # chunk c: k = 8c + j low nibble, 8c + 4 + j high, byte 4 * col + j
        c = c.reshape(tiles, nblocks, 4, 2, 4, TILE).transpose(0, 1, 2, 3, 5, 4)
        body = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(tiles, nblocks, -1)
    else:  # chunk g: k = 4g + j, byte 4 * col + j
        body = c.reshape(tiles, nblocks, 8, 4, TILE).transpose(0, 1, 2, 4, 3)
        body = body.reshape(tiles, nblocks, -1)
    dtype = np.float16 if scale_bits == 16 else np.float32
    parts = [a.astype(dtype).reshape(tiles, TILE, nblocks).transpose(0, 2, 1)
             for a in (scales, offsets) if a is not None]
    tail = np.ascontiguousarray(np.concatenate(parts, axis=2)).view(np.uint8)
    return np.ascontiguousarray(np.concatenate([body, tail], axis=2))


def pack_float(weight: np.ndarray) -> np.ndarray:
    """A float32 [K, N] weight in MatMulF's layout: [ceil(N/16), K, 16]."""
    k, n = weight.shape
    tiles = -(-n // TILE)
    padded = np.zeros((k, tiles * TILE), np.float32)
    padded[:, :n] = weight
    return np.ascontiguousarray(padded.reshape(k, tiles, TILE).transpose(1, 0, 2))


def pack_bias(bias: np.ndarray) -> np.ndarray:
    """A [N] bias as the kernels read it: float32, zero-padded to whole tiles of 16."""
    n = bias.shape[0]
    out = np.zeros(-(-n // TILE) * TILE, np.float32)
    out[:n] = bias
    return out


def unpack_codes(packed: np.ndarray, n: int, nblocks: int, bits: int) -> np.ndarray:
    """MatMulNBits' stored codes (two 4-bit codes per byte, low nibble first) as [N, nblocks,
    32] uint8."""
    packed = packed.reshape(n, nblocks, -1)
    if bits == 8:
        return packed
    out = np.empty((n, nblocks, packed.shape[2] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _zero_points(stored: np.ndarray | None, n: int, nblocks: int, bits: int) -> np.ndarray:
    if stored is None:
        return np.full((n, nblocks), 1 << (bits - 1), np.float32)
    if stored.dtype != np.uint8:
        return stored.astype(np.float32).reshape(n, nblocks)
    if bits == 8:
        return stored.reshape(n, nblocks).astype(np.float32)
    per_row = stored.reshape(n, -1)
    both = np.stack([per_row & 0x0F, per_row >> 4], axis=2).reshape(n, -1)
    return both[:, :nblocks].astype(np.float32)


# -- the graph rewrite -----------------------------------------------------------------------------

def kernel_model(proto: Any, folder: str | Path, threads: int, float_weights: bool = True,
                 blobs: dict[str, np.ndarray] | None = None, attention: bool = True) -> int:
    """Rewrite ``proto`` (a graph whose external weights live in ``folder``) in place:
    each int8-compute MatMulNBits in blocks of 32 (with its float-zero-point correction where it
    has one) becomes one MatMulQ; with ``float_weights``, each MatMul by a float32 [K, N] weight
    one MatMulF; a bias Add, GELU or SwiGLU after either (:class:`_Epilogue`) goes into the
    kernel's epilogue, and a Split of its output into equal runs (:func:`_split`) into its
    outputs; with ``attention``, each GroupQueryAttention of the kind llmopt's exporter
    writes (:func:`_plain_attention`) one GroupAttention. The products
    split their output columns into ``threads`` runs (the session's intra-op
    threads: one contiguous run each measured faster than finer work items, 5.7 against 6.2 ms
    per SmolLM2 int4 step on 2 threads). Returns how many nodes were rewritten.

    With ``blobs``, the new weights are not put in the graph: they land in ``blobs`` by name,
    and the graph names them as external data for the session to take from memory
    (:meth:`KernelGraph.values`), so opening it costs no serialized copy of them."""
    from onnx import helper

    graph = proto.graph
    weights = _Weights(proto, folder)
    # GroupAttention computes in float32: its past key must be a float32 graph input
    float_caches = {i.name for i in graph.input if i.type.tensor_type.elem_type == FLOAT}
    dropped: set[int] = set()
    replaced: dict[int, Any] = {}
    added: list[Any] = []
    used: set[str] = set()
    for node in graph.node:  # in topological order: a correction follows its MatMulNBits
        if id(node) in dropped:
            continue
        if float_weights and _float_weight(node, weights.inits):
            made = _matmul_f(node, weights, threads)
        elif _quantized(node, weights.inits):
            made = _matmul_q(node, weights, threads)
        elif attention and _plain_attention(node) and node.input[3] in float_caches:
            made = _attention(node, weights, threads)
        else:
            continue
        replaced[id(node)], made_weights, chain, names = made
        added.extend(_initializer(name, blob, blobs) for name, blob in made_weights)
        used.update(names)
        dropped.update(id(x) for x in chain)
        gone = {id(node), *(id(x) for x in chain)}
        for read in names:  # weights inside the graph: their bytes go now, not at the end
            if all(id(x) in gone for x in weights.readers.get(read, [])):
                weights.inits[read].ClearField("raw_data")
    if not replaced:
        return 0
    nodes = [replaced.get(id(x), x) for x in graph.node if id(x) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {name for x in nodes for name in x.input}
    keep = [t for t in graph.initializer if t.name not in used or t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(replaced)


class _Weights:
    """A graph's initializers (their data read on demand from ``folder``) and who reads each
    value."""

    def __init__(self, proto: Any, folder: str | Path) -> None:
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.outputs = {o.name for o in proto.graph.output}
        self.folder = str(folder)
        self.readers: dict[str, list[Any]] = {}
        self.producers: dict[str, Any] = {}
        for node in proto.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
            for name in node.output:
                self.producers[name] = node

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name], base_dir=self.folder)


# node, its new initializers (name, array), nodes it replaces, initializers it read
_Made = tuple[Any, list[tuple[str, np.ndarray]], tuple[Any, ...], set[str]]
# Where the graph says the kernels' weights are: ONNX Runtime checks that an external data file
# exists before it looks at the initializers a session is given (KernelGraph.values), which
# replace these unread. The package's graph file is the one file every package has.
MEMORY_LOCATION = "model.onnx"


def _initializer(name: str, array: np.ndarray, blobs: dict[str, np.ndarray] | None) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    if blobs is None:
        return numpy_helper.from_array(array, name)
    blobs[name] = array
    tensor = TensorProto(name=name, dims=array.shape,
                         data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", MEMORY_LOCATION
    return tensor





def _float_weight(node: Any, inits: dict[str, Any]) -> bool:
    weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 \
        else None
    return node.domain in ("", "ai.onnx") and weight is not None \
        and weight.data_type == FLOAT and len(weight.dims) == 2


def _quantized(node: Any, inits: dict[str, Any]) -> bool:
    attrs = {a.name: a.i for a in node.attribute}
    return node.op_type == "MatMulNBits" and attrs.get("accuracy_level") == INT8_COMPUTE \
        and attrs.get("block_size") == BLOCK and attrs.get("bits") in (4, 8) \
        and not any(node.input[4:]) and node.input[1] in inits and node.input[2] in inits


def _matmul_f(node: Any, weights: _Weights, threads: int) -> _Made:
    from onnx import helper

    k, n = (int(d) for d in weights.inits[node.input[1]].dims)
    weight = weights.array(node.input[1])
    tail = _Epilogue.after(node.output[0], n, weights)
    if tail.activation == SILU_MUL:
        weight = weight[:, gate_up_order(n)]
    name = f"{node.input[1]}.matmul_f"
    outputs, absorbed, reads = _outputs(tail, n, weights)
    made = helper.make_node(FLOAT_OP, [node.input[0], name, *tail.inputs(name)], outputs,
                            name=f"{node.name}/MatMulF", domain=DOMAIN, K=k, N=n,
                            activation=tail.activation, bias=int(tail.bias is not None),
                            parts=len(outputs), threads=threads)
    return made, [(name, pack_float(weight)), *tail.blobs(name)], absorbed, {node.input[1], *reads}


def _matmul_q(node: Any, weights: _Weights, threads: int) -> _Made:
    from onnx import helper

    attrs = {a.name: a.i for a in node.attribute}
    k, n, bits = attrs["K"], attrs["N"], attrs["bits"]
    nblocks = k // BLOCK
    zp = weights.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    scales = weights.array(node.input[2]).astype(np.float32).reshape(n, nblocks)
    offsets = -_zero_points(zp, n, nblocks, bits) * scales
    codes = unpack_codes(weights.array(node.input[1]), n, nblocks, bits)
    output, chain = node.output[0], _correction(node, weights.readers, weights.inits, nblocks)
    reads = set(node.input[1:4])
    if chain is not None:
        split, matmul, add = chain
        n -= nblocks
        codes, scales = codes[:n], scales[:n]
        offsets = offsets[:n] + weights.array(matmul.input[1]).T  # correction: [nblocks, N]
        output = add.output[0]
        reads.update((split.input[1], matmul.input[1]))
    tail = _Epilogue.after(output, n, weights)
    if tail.activation == SILU_MUL:
        order = gate_up_order(n)
        codes, scales, offsets = codes[order], scales[order], offsets[order]
    precision = scale_bits(scales, offsets)
    zero_point = symmetric_zero_point(scales, offsets, bits)
    name = f"{node.input[1]}.matmul_q"
    blob = name, pack(codes, scales, None if zero_point else offsets, bits, precision)
    outputs, absorbed, tail_reads = _outputs(tail, n, weights)
    made = helper.make_node(OP, [node.input[0], name, *tail.inputs(name)], outputs,
                            name=f"{node.name}/MatMulQ", domain=DOMAIN, K=k, N=n, bits=bits,
                            scale_bits=precision, zero_point=zero_point,
                            activation=tail.activation, bias=int(tail.bias is not None),
                            parts=len(outputs), threads=threads)
    return made, [blob, *tail.blobs(name)], (*(chain or ()), *absorbed), reads | tail_reads


@dataclass
class _Epilogue:
    """What a product's output goes through that the kernels do in their epilogue: a bias
    ``Add`` of a [N] float32 weight, then GELU (``BiasGelu``, or ``Gelu`` after the Add) or a
    SwiGLU (:func:`_swiglu`; its bias, where it has one, reordered as its columns are)."""

    output: str  # the value the kernel writes: the last absorbed node's output
    nodes: tuple[Any, ...] = ()
    bias: np.ndarray | None = None
    activation: int = NONE
    reads: frozenset[str] = frozenset()

    @classmethod
    def after(cls, output: str, n: int, weights: _Weights) -> _Epilogue:
        tail = cls(output)
        found = _bias(output, n, weights)
        if found is not None:
            node, name = found
            tail = cls(node.output[0], (node,), weights.array(name).astype(np.float32),
                       GELU if node.op_type == "BiasGelu" else NONE, frozenset({name}))
            gelu = _only_reader(node.output[0], weights)
            if tail.activation == NONE and gelu is not None and _exact_gelu(gelu):
                tail = cls(gelu.output[0], (node, gelu), tail.bias, GELU, tail.reads)
        if tail.activation != NONE:
            return tail
        swiglu = _swiglu(tail.output, n, weights)
        if swiglu is None:
            return tail
        bias = tail.bias[gate_up_order(n)] if tail.bias is not None else None
        return cls(swiglu[-1].output[0], (*tail.nodes, *swiglu), bias, SILU_MUL,
                   tail.reads | set(swiglu[0].input[1:]))

    def inputs(self, weight: str) -> list[str]:
        return [] if self.bias is None else [f"{weight}.bias"]

    def blobs(self, weight: str) -> list[tuple[str, np.ndarray]]:
        return [] if self.bias is None else [(f"{weight}.bias", pack_bias(self.bias))]


MAX_PARTS = 3  # MatMulQ / MatMulF outputs: y, or up to 3 equal runs of its columns


def _split(tail: _Epilogue, n: int, weights: _Weights) -> Any:
    """The Split that is the only reader of a product's output, when it cuts the last axis into
    2 or 3 equal runs of whole tiles (an encoder's packed query/key/value): the kernel then
    writes each run to its own output and the Split's copy goes. Else None."""
    node = _only_reader(tail.output, weights)
    if node is None or tail.activation != NONE or (node.op_type, node.domain) not in (
            ("Split", ""), ("Split", "ai.onnx")):
        return None
    attrs = {a.name: a for a in node.attribute}
    axis = attrs["axis"].i if "axis" in attrs else 0
    parts = len(node.output)
    if axis != -1 or not 2 <= parts <= MAX_PARTS or any(not o for o in node.output) \
            or n % (parts * TILE):
        return None
    # a decoder's packed query/key/value Split goes into GroupAttention (:func:`_attention`)
    if any(r.op_type in ("GroupQueryAttention", "RotaryEmbedding")
           for o in node.output for r in weights.readers.get(o, [])):
        return None
    return node if _equal_parts(node, n, parts, weights) else None


def _outputs(tail: _Epilogue, n: int, weights: _Weights
             ) -> tuple[list[str], tuple[Any, ...], set[str]]:
    """A product's outputs after its epilogue ``tail``, the nodes it takes in, and the weights
    they read: the Split's outputs where :func:`_split` finds one, else the epilogue's."""
    split = _split(tail, n, weights)
    if split is None:
        return [tail.output], tail.nodes, set(tail.reads)
    sizes = {split.input[1]} if len(split.input) > 1 and split.input[1] else set()
    return list(split.output), (*tail.nodes, split), {*tail.reads, *sizes}


def _equal_parts(split: Any, n: int, parts: int, weights: _Weights) -> bool:
    """Whether ``split``'s sizes (its second input, its ``split`` attribute, or equal parts for
    opset 18's ``num_outputs``) cut ``n`` columns into ``parts`` equal runs."""
    attrs = {a.name: a for a in split.attribute}
    if len(split.input) > 1 and split.input[1]:
        if split.input[1] not in weights.inits:
            return False
        sizes = [int(v) for v in weights.array(split.input[1]).reshape(-1)]
    elif "split" in attrs:
        sizes = list(attrs["split"].ints)
    else:
        sizes = [n // parts] * parts
    return sizes == [n // parts] * parts


def _only_reader(name: str, weights: _Weights) -> Any:
    """The one node that reads ``name``, or None (several, none, or a graph output)."""
    found = weights.readers.get(name, [])
    return found[0] if len(found) == 1 and name not in weights.outputs else None


def _bias(output: str, n: int, weights: _Weights) -> tuple[Any, str] | None:
    """``output``'s only reader when it adds a float32 [n] weight to it (``Add``, or
    ``BiasGelu``), with that weight's name; else None."""
    node = _only_reader(output, weights)
    if node is None or (node.op_type, node.domain) not in (
            ("Add", ""), ("Add", "ai.onnx"), ("BiasGelu", "com.microsoft")):
        return None
    other = [x for x in node.input if x != output]
    if len(node.input) != 2 or len(other) != 1 or other[0] not in weights.inits:
        return None
    bias = weights.inits[other[0]]
    if bias.data_type != FLOAT or list(bias.dims) != [n]:
        return None
    return node, other[0]


def _exact_gelu(node: Any) -> bool:
    """An erf GELU: ``com.microsoft`` Gelu, or ONNX Gelu without the tanh approximation."""
    if node.op_type != "Gelu":
        return False
    if node.domain == "com.microsoft":
        return True
    approximate = next((a.s for a in node.attribute if a.name == "approximate"), b"none")
    return node.domain in ("", "ai.onnx") and approximate == b"none"


# GroupQueryAttention's attributes and their values GroupAttention computes (any other value, or
# an attribute not listed, keeps ONNX Runtime's kernel)
_PLAIN_ATTENTION = {"do_rotary": 0, "local_window_size": -1, "softcap": 0.0,
                    "smooth_softmax": (-1, 0), "qk_output": 0, "k_quant_type": b"NONE",
                    "v_quant_type": b"NONE", "rotary_interleaved": 0, "kv_cache_bit_width": 0,
                    "sliding_window_cache": 0, "causal": 1}
# qk_norm_epsilon only matters with the norm weights (inputs past the bias: refused)
_KEPT_ATTRIBUTES = ("num_heads", "kv_num_heads", "scale", "qk_norm_epsilon")


def _plain_attention(node: Any) -> bool:
    """A GroupQueryAttention GroupAttention computes: rotary outside it, no sliding window,
    softcap, smooth softmax or quantized cache, separate query/key/value, and no inputs past the
    attention bias (cos/sin caches, position ids, head sinks)."""
    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
        return False
    from onnx import helper

    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if a.name in _PLAIN_ATTENTION:
            allowed = _PLAIN_ATTENTION[a.name]
            if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                return False
        elif a.name not in _KEPT_ATTRIBUTES:
            return False
    inputs = list(node.input) + [""] * (11 - len(node.input))
    return len(node.input) <= 11 and all(inputs[:7]) and not any(inputs[7:10])


def _attention(node: Any, weights: _Weights, threads: int) -> _Made:
    """GroupAttention for a plain GroupQueryAttention, with the Split of its packed query, key
    and value and the RotaryEmbedding of each inside where the exporter wrote them so
    (:func:`_packed_rotary`): 3 nodes fewer per layer, and the keys rotated as they are
    cached."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input[:7])
    bias = node.input[10] if len(node.input) > 10 else ""
    rotary = _packed_rotary(node, attrs["num_heads"], attrs["kv_num_heads"], weights)
    chain: tuple[Any, ...] = ()
    rotary_dim = interleaved = 0
    if rotary is None:
        inputs += [bias] if bias else []
    else:
        split, rot_q, rot_k, rotary_dim, interleaved = rotary
        inputs[:3] = [split.input[0], "", ""]
        inputs += [bias, rot_q.input[1], rot_q.input[2]]
        chain = (split, rot_q, rot_k)
    made = helper.make_node(ATTENTION_OP, inputs, list(node.output),
                            name=f"{node.name}/GroupAttention", domain=DOMAIN,
                            num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"],
                            scale=float(attrs.get("scale", 0.0)), rotary_dim=rotary_dim,
                            interleaved=interleaved, threads=threads)
    return made, [], chain, set()


def _packed_rotary(node: Any, heads: int, kv_heads: int, weights: _Weights
                   ) -> tuple[Any, Any, Any, int, int] | None:
    """``(split, rotary_q, rotary_k, rotary_dim, interleaved)`` where the attention's query and
    key are ONNX ``RotaryEmbedding`` s (over computed [B, S, rotary_dim / 2] tables, the same
    for both) of a ``Split`` of one packed [.., (heads + 2 kv_heads) * dim] product whose third
    part is the value, each value read by the next node only; else None (a QK norm between
    them, a graph output, other split sizes)."""
    from onnx import helper

    rot_q, rot_k = (weights.producers.get(name) for name in node.input[:2])
    if rot_q is None or rot_k is None or any(
            r.op_type != "RotaryEmbedding" or r.domain not in ("", "ai.onnx") or
            len(r.input) != 3 or _only_reader(r.output[0], weights) is not node
            for r in (rot_q, rot_k)) or list(rot_q.input[1:]) != list(rot_k.input[1:]):
        return None
    split = weights.producers.get(rot_q.input[0])
    if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx") or \
            list(split.output) != [rot_q.input[0], rot_k.input[0], node.input[2]] or \
            len(split.input) != 2 or split.input[1] not in weights.inits or \
            any(_only_reader(o, weights) is None for o in split.output):
        return None
    q_attrs, k_attrs, split_attrs = ({a.name: helper.get_attribute_value(a) for a in n.attribute}
                                     for n in (rot_q, rot_k, split))
    sizes = [int(x) for x in weights.array(split.input[1])]
    if split_attrs.get("axis", 0) != -1 or len(sizes) != 3 or sizes[0] % heads:
        return None
    dim = sizes[0] // heads
    rotary = {q_attrs.get("rotary_embedding_dim", 0), k_attrs.get("rotary_embedding_dim", 0)}
    interleaved = {q_attrs.get("interleaved", 0), k_attrs.get("interleaved", 0)}
    if sizes[1:] != [kv_heads * dim] * 2 or q_attrs.get("num_heads") != heads or \
            k_attrs.get("num_heads") != kv_heads or len(rotary) != 1 or len(interleaved) != 1:
        return None
    rotary_dim = rotary.pop() or dim
    if rotary_dim > dim or rotary_dim % 2:
        return None
    return split, rot_q, rot_k, rotary_dim, interleaved.pop()


def gate_up_order(n: int) -> np.ndarray:
    """Columns of a [.., gate | up] product reordered so that each pair of 16-column tiles is
    (gate tile j, up tile j): the kernels' SiLU epilogue computes output tile j from them."""
    half = n // 2
    gate = np.arange(half).reshape(-1, TILE)
    return np.stack([gate, gate + half], axis=1).reshape(-1)


def _swiglu(output: str, n: int, weights: _Weights) -> tuple[Any, ...] | None:
    """The nodes of ``silu(gate) * up`` over a product's two halves (a SwiGLU MLP)::

        y ─Split(n/2, n/2)─┬ gate ─Sigmoid─Mul(gate, .)─┐
                           └ up ─────────────────────────Mul ─▶ out

    as (Split, Sigmoid, Mul, Mul), or None; the halves must be whole pairs of tiles."""
    def only(name: str, op: str) -> Any:
        found = _only_reader(name, weights)
        return found if found is not None and found.op_type == op else None

    split = only(output, "Split")
    if split is None or n % (2 * TILE) or len(split.output) != 2 \
            or not _halves(split, n, weights):
        return None
    gate, up = split.output
    readers = weights.readers.get(gate, [])
    sigmoid = next((x for x in readers if x.op_type == "Sigmoid"), None)
    silu = next((x for x in readers if x.op_type == "Mul"), None)
    if len(readers) != 2 or sigmoid is None or silu is None \
            or set(silu.input) != {gate, sigmoid.output[0]} \
            or weights.readers.get(sigmoid.output[0]) != [silu]:
        return None
    product = only(silu.output[0], "Mul")
    if product is None or set(product.input) != {silu.output[0], up} \
            or weights.readers.get(up) != [product]:
        return None
    return split, sigmoid, silu, product


def _halves(split: Any, n: int, weights: _Weights) -> bool:
    """Whether ``split`` cuts its input's last axis into two equal halves."""
    attrs = {a.name: a for a in split.attribute}
    if "axis" not in attrs or attrs["axis"].i not in (-1, 2):
        return False
    return _equal_parts(split, n, 2, weights)


def _correction(node: Any, readers: dict[str, list[Any]], inits: dict[str, Any],
                nblocks: int) -> tuple[Any, Any, Any] | None:
    """The Split -> MatMul -> Add that corrects ``node`` for float zero points
    (``summed_correction``), or None."""
    after = readers.get(node.output[0], [])
    if len(after) != 1 or after[0].op_type != "Split" or len(after[0].output) != 2:
        return None
    split = after[0]
    sums, symmetric = readers.get(split.output[1], []), readers.get(split.output[0], [])
    if len(sums) != 1 or sums[0].op_type != "MatMul" or sums[0].input[1] not in inits:
        return None
    matmul = sums[0]
    adds = readers.get(matmul.output[0], [])
    if len(adds) != 1 or adds[0].op_type != "Add" or len(symmetric) != 1 \
            or symmetric[0] is not adds[0]:
        return None
    if list(inits[matmul.input[1]].dims)[:1] != [nblocks]:
        return None
    return split, matmul, adds[0]


@dataclass
class KernelGraph:
    """A package's graph on llmopt's kernels: the serialized graph, how many nodes moved to
    them, and their weights (:func:`kernel_model`'s ``blobs``) for the session to use in
    place."""

    model: bytes
    kernels: int
    blobs: dict[str, np.ndarray]

    def values(self) -> dict[str, Any]:
        """OrtValues over :attr:`blobs` for ``SessionOptions.add_initializer``: the session
        computes on these arrays, uncopied, so they must outlive it. (ONNX Runtime's
        ``add_external_initializers`` copies them: 1.39 GB instead of 0.87 GB after opening
        SmolLM2 fused.)"""
        import onnxruntime as ort

        return {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in self.blobs.items()}


def kernel_graph(package: Any, options: Any) -> KernelGraph | None:
    """``package``'s graph (a decoder's or an encoder's) with its int8-compute MatMulNBits on
    MatMulQ and its float32 MatMuls on MatMulF, their bias and activation in the kernels'
    epilogue (its other weights stay where the package keeps them), or None: not on CPU
    (``options`` None), ``CPUOptions(kernels=False)``, nothing to rewrite, or the kernels
    cannot run here (then ``kernels=True`` raises :class:`~llmopt.errors.ProviderError`
    instead)."""
    import onnx

    from llmopt.errors import ProviderError

    if options is None or options.kernels is False:
        return None
    if library() is None:
        if options.kernels:
            raise ProviderError(f"llmopt's CPU kernels cannot run here: {unavailable()}",
                                fix="install a C++ compiler (g++) on a CPU with AVX-512 VNNI or "
                                "AVX2, or "
                                "pass CPUOptions(kernels=False) to run on ONNX Runtime's "
                                "kernels only")
        log.info("llmopt CPU kernels off: %s", unavailable())
        return None
    proto = onnx.load(str(package.model_path), load_external_data=False)
    threads = options.intra_op_threads or usable_cpus()
    blobs: dict[str, np.ndarray] = HugePageStore() if options.huge_pages else {}
    rewritten = kernel_model(proto, package.path, threads, blobs=blobs)
    if not rewritten:
        return None
    log.info("%d MatMuls on llmopt's CPU kernels", rewritten)
    return KernelGraph(proto.SerializeToString(), rewritten, blobs)


HUGE_PAGE = 2 << 20
CHUNK = 64 << 20


class HugePageStore(dict[str, np.ndarray]):
    """A dict of arrays that keeps a copy of each array it is given in private anonymous
    mappings Linux is asked to back with 2 MiB pages (``MADV_HUGEPAGE``; transparent huge pages
    are "madvise" on most distributions, so ONNX Runtime's and numpy's allocations get 4 KiB
    pages). A decode step streams every kernel weight once, and on 4 KiB pages that is a TLB
    miss every 64 cache lines (docs/cpu-kernels.md has what it measured). Arrays are copied as
    they are stored, so the caller's original can go at once: loading holds no second copy of
    the weights. Mappings are taken ``CHUNK`` bytes at a time (a larger array gets its own); pages
    never written are never resident. Where the platform has no ``madvise``, the copies sit on
    ordinary pages."""

    def __init__(self) -> None:
        super().__init__()
        self._chunk: np.ndarray | None = None  # the mapping arrays are copied into, as bytes
        self._used = 0

    def __setitem__(self, name: str, array: np.ndarray) -> None:
        size = -(-array.nbytes // 64) * 64  # each array cache-line aligned
        if size > CHUNK:
            place = _huge_page_mapping(size)
        else:
            if self._chunk is None or self._used + size > self._chunk.size:
                self._chunk, self._used = _huge_page_mapping(CHUNK), 0
            place = self._chunk[self._used:self._used + size]
            self._used += size
        view = place[:array.nbytes].view(array.dtype).reshape(array.shape)
        view[...] = array
        super().__setitem__(name, view)


def _huge_page_mapping(size: int) -> np.ndarray:
    """``size`` bytes of a fresh private anonymous mapping, starting on a 2 MiB boundary and
    advised for huge pages; the array keeps the mapping alive."""
    import mmap

    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: an ordinary buffer, aligned the same way
        whole = np.empty(size + HUGE_PAGE, np.uint8)
        start = -whole.ctypes.data % HUGE_PAGE
        return whole[start:start + size]
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(region, np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE  # a multiple of the 4 KiB page the mapping starts on
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE, start, size)
        except OSError as exc:  # a kernel without transparent huge pages: 4 KiB pages it is
            log.debug("no huge pages for the kernels' weights: %s", exc)
    return whole[start:start + size]
