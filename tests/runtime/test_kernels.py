"""llmopt's CPU kernels (MatMulQ and MatMulF, llmopt/kernels/cpu_kernels.cc): their layouts and
arithmetic (epilogues included) against numpy, the graph rewrite on fp32, int4 (integer and
float zero points) and int8 decoder packages and on encoder packages, and the runtime's choice to
use them."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import llmopt
from llmopt.errors import ProviderError
from llmopt.exporter import export
from llmopt.optimizer import optimize
from llmopt.quantizer import QuantizeOptions, quantize
from llmopt.runtime import CPUOptions, kernels
from llmopt.runtime.generator import Generator
from tests import tiny_decoders
from tests.exporter.test_encoders import build as build_encoder

needs_kernels = pytest.mark.skipif(kernels.library() is None,
                                   reason=f"llmopt's CPU kernels: {kernels.unavailable()}")
PROMPT = [5, 9, 13, 2, 44, 7, 31, 8, 17, 3]


def int8_rounded(x: np.ndarray) -> np.ndarray:
    """x as the kernel sees it: rounded to int8 per block of 32 (scale max|x| / 127)."""
    blocks = x.reshape(*x.shape[:-1], -1, kernels.BLOCK)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    codes = np.round(blocks / np.where(scale == 0, 1, scale))
    return (codes * scale).reshape(x.shape)


def pointer(a: np.ndarray | None) -> ctypes.c_void_p | None:
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def out_columns(n: int, activation: int) -> int:
    return n // 2 if activation == kernels.SILU_MUL else n


def reference(entry: str, x: np.ndarray, blob: np.ndarray, n: int, activation: int,
              bias: np.ndarray | None, *attributes: int, library: Path | None = None
              ) -> np.ndarray:
    """y from the library's one-thread reference ``entry``: (x, rows, K, weights, N,
    *attributes, bias, y), the attributes as C ints; the library this CPU's runtime uses unless
    ``library`` names another build."""
    lib = ctypes.CDLL(str(library or kernels.library()))
    x = np.ascontiguousarray(x, np.float32)
    rows, k = x.shape
    y = np.zeros((rows, out_columns(n, activation)), np.float32)
    rc = getattr(lib, entry)(pointer(x), ctypes.c_int64(rows), ctypes.c_int64(k), pointer(blob),
                             ctypes.c_int64(n), *(ctypes.c_int(a) for a in attributes),
                             pointer(bias), pointer(y))
    assert rc == 0
    return y


def reference_call(x: np.ndarray, blob: np.ndarray, n: int, bits: int, scale_bits: int,
                   activation: int = kernels.NONE, zero_point: int = 0,
                   bias: np.ndarray | None = None, library: Path | None = None) -> np.ndarray:
    return reference("llmopt_matmul_q", x, blob, n, activation, bias, bits, scale_bits,
                     activation, zero_point, library=library)


def reference_float(x: np.ndarray, blob: np.ndarray, n: int, activation: int = kernels.NONE,
                    bias: np.ndarray | None = None, library: Path | None = None) -> np.ndarray:
    return reference("llmopt_matmul_f", x, blob, n, activation, bias, activation,
                     library=library)


@needs_kernels
@pytest.mark.parametrize(("bits", "precision"), [(4, 16), (8, 16), (4, 32), (8, 32)])
@pytest.mark.parametrize(("rows", "k", "n"), [(1, 64, 16), (3, 96, 33), (9, 128, 40),
                                              (17, 64, 7)])
def test_the_kernel_computes_the_affine_blocks_on_int8_activations(
        bits: int, precision: int, rows: int, k: int, n: int) -> None:
    """Row counts across the 8-row passes, column counts off the 16-column tiles: every output
    is the product of the blocks with the int8-rounded input."""
    rng = np.random.default_rng(bits * 100 + rows)
    nblocks = k // kernels.BLOCK
    codes = rng.integers(0, 1 << bits, (n, nblocks, kernels.BLOCK)).astype(np.uint8)
    scales = (rng.random((n, nblocks)) * 0.05).astype(np.float32)
    offsets = (rng.standard_normal((n, nblocks)) * 0.1).astype(np.float32)
    if precision == 16:
        scales, offsets = (a.astype(np.float16).astype(np.float32) for a in (scales, offsets))
    assert kernels.scale_bits(scales, offsets) == precision
    weight = (codes * scales[..., None] + offsets[..., None]).reshape(n, k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :kernels.BLOCK] = 0  # an all-zero block: scale 0, no division by it
    blob = kernels.pack(codes, scales, offsets, bits, precision)
    got = reference_call(x, blob, n, bits, precision)
    want = int8_rounded(x) @ weight.T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    # symmetric blocks: no offsets stored, the kernel derives -2^(bits-1) * scale
    middle = 1 << (bits - 1)
    symmetric = np.float32(-middle) * scales
    assert kernels.symmetric_zero_point(scales, symmetric, bits) == middle
    assert kernels.symmetric_zero_point(scales, offsets, bits) == 0
    lean = kernels.pack(codes, scales, None, bits, precision)
    assert lean.shape[2] == blob.shape[2] - 16 * precision // 8
    got = reference_call(x, lean, n, bits, precision, zero_point=middle)
    want = int8_rounded(x) @ (codes * scales[..., None] + symmetric[..., None]).reshape(n, k).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@needs_kernels
@pytest.mark.parametrize(("rows", "k", "n"), [(1, 64, 16), (3, 97, 33), (9, 128, 40),
                                              (17, 5, 7)])
def test_the_float_kernel_computes_the_product(rows: int, k: int, n: int) -> None:
    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    blob = kernels.pack_float(weight)
    assert blob.shape == (-(-n // 16), k, 16)
    y = reference_float(x, blob, n)
    np.testing.assert_allclose(y, x.astype(np.float64) @ weight, rtol=1e-5, atol=1e-5)
    # a row's result does not depend on the rows computed beside it
    np.testing.assert_array_equal(reference_float(x[-1:], blob, n)[0], y[-1])


@pytest.fixture(scope="module")
def builds() -> dict[str, Path]:
    """Every build of the library this CPU runs: AVX2 on every x86 CPU with the kernels, AVX-512
    beside it where the CPU has VNNI."""
    if kernels.library() is None:
        pytest.skip(f"llmopt's CPU kernels: {kernels.unavailable()}")
    runs = {isa: kernels.build(isa).library for isa in kernels.ISAS if kernels.plausible(isa)}
    return {isa: library for isa, library in runs.items() if library is not None}


@pytest.mark.parametrize("activation", [kernels.NONE, kernels.SILU_MUL, kernels.GELU])
def test_every_build_this_cpu_runs_computes_the_same_floats(builds: dict[str, Path],
                                                            activation: int) -> None:
    """The AVX2 build runs each 16-lane vector as two halves, its int8 dot products without
    VNNI (8-bit codes as two nibbles, so no int16 pair saturates): each build is the product
    of the blocks with the rounded input, and where the CPU runs both they agree to the bit
    (same integer sums, same float operations in the same order), rows across the 8-row and
    4-row passes, codes across their whole range, a bias and each epilogue."""
    assert "avx2" in builds  # every CPU with the AVX-512 build has AVX2 too
    rng = np.random.default_rng(activation)
    k, n = 96, 64
    nblocks = k // kernels.BLOCK
    x = rng.standard_normal((13, k)).astype(np.float32) * 3
    x[2, :kernels.BLOCK] = 0
    x[3], x[4] = 2.5, -2.5  # every activation rounded to 127 (-127): the largest sums of a block
    bias = kernels.pack_bias(rng.standard_normal(n).astype(np.float32))
    weight = rng.standard_normal((k, n)).astype(np.float32) * 0.3
    blobs = []  # (packed blocks, bits, scale bits, zero point, the blocks as floats)
    for bits in (4, 8):
        codes = rng.integers(0, 1 << bits, (n, nblocks, kernels.BLOCK)).astype(np.uint8)
        codes[0, 0] = (1 << bits) - 1  # the largest code against each block's largest input
        codes[1] = (1 << bits) - 1  # and a column of nothing else, against rows 3 and 4
        scales = (rng.random((n, nblocks)) * 0.05).astype(np.float16).astype(np.float32)
        offsets = (rng.standard_normal((n, nblocks)) * 0.1).astype(np.float16).astype(np.float32)
        middle = 1 << (bits - 1)
        blobs += [
            (kernels.pack(codes, scales, offsets, bits, 16), bits, 16, 0,
             (codes * scales[..., None] + offsets[..., None]).reshape(n, k)),
            (kernels.pack(codes, scales, None, bits, 32), bits, 32, middle,
             ((codes.astype(np.float32) - middle) * scales[..., None]).reshape(n, k)),
        ]
    results = {}
    for isa, library in builds.items():
        ys = [reference_float(x, kernels.pack_float(weight), n, activation, bias,
                              library=library)]
        ys += [reference_call(x, blob, n, bits, precision, activation, zero_point, bias,
                              library=library)
               for blob, bits, precision, zero_point, _ in blobs]
        results[isa] = ys
        if activation == kernels.NONE:
            np.testing.assert_allclose(ys[0], x.astype(np.float64) @ weight + bias[:n],
                                       rtol=1e-5, atol=1e-5)
            for y, (_, _, _, _, blocks) in zip(ys[1:], blobs, strict=True):
                want = int8_rounded(x) @ blocks.T + bias[:n]
                np.testing.assert_allclose(y, want, rtol=1e-4,
                                           atol=1e-4 * float(np.abs(want).max()))
    for isa, ys in results.items():
        for mine, theirs in zip(ys, results["avx2"], strict=True):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"{isa} against avx2")


def test_the_kernels_build_for_the_instruction_set_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMOPT_KERNELS_ISA picks a build (the AVX2 one on a CPU that has both) or none; a name
    that is no build is a reason, naming the choices, not a crash."""
    if kernels.library() is None:
        pytest.skip(f"llmopt's CPU kernels: {kernels.unavailable()}")
    kernels._built.cache_clear()
    try:
        monkeypatch.setenv(kernels.ISA_ENV, "avx2")
        assert kernels.isa() == "avx2" and kernels.library() is not None
        lib = ctypes.CDLL(str(kernels.library()))
        lib.llmopt_kernels_isa.restype = ctypes.c_char_p
        assert lib.llmopt_kernels_isa() == b"avx2"
        kernels._built.cache_clear()
        monkeypatch.setenv(kernels.ISA_ENV, "sse")
        assert kernels.library() is None and kernels.isa() is None
        assert "'sse' is not one of avx512, avx2 or none" in str(kernels.unavailable())
        kernels._built.cache_clear()
        monkeypatch.setenv(kernels.ISA_ENV, "none")
        assert kernels.library() is None and "none turns them off" in str(kernels.unavailable())
    finally:
        monkeypatch.delenv(kernels.ISA_ENV)
        kernels._built.cache_clear()


def silu_mul(y: np.ndarray) -> np.ndarray:
    gate, up = np.split(y.astype(np.float64), 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 11])
def test_the_swiglu_epilogue_computes_silu_gate_times_up(rows: int) -> None:
    """Both kernels with activation=1: the product's halves in (gate, up) tile pairs
    (gate_up_order), out come silu(gate) * up, half as many columns."""
    rng = np.random.default_rng(rows)
    k, n = 64, 96
    order = kernels.gate_up_order(n)
    assert sorted(order) == list(range(n)) and list(order[16:32]) == list(range(48, 64))
    x = rng.standard_normal((rows, k)).astype(np.float32)
    weight = rng.standard_normal((k, n)).astype(np.float32) * 0.3
    y = reference_float(x, kernels.pack_float(weight[:, order]), n, kernels.SILU_MUL)
    np.testing.assert_allclose(y, silu_mul(x.astype(np.float64) @ weight), rtol=1e-5,
                               atol=1e-5)
    nblocks = k // kernels.BLOCK
    codes = rng.integers(0, 16, (n, nblocks, kernels.BLOCK)).astype(np.uint8)
    scales = (rng.random((n, nblocks)) * 0.05).astype(np.float16).astype(np.float32)
    offsets = (rng.standard_normal((n, nblocks)) * 0.1).astype(np.float16).astype(np.float32)
    blocks = (codes * scales[..., None] + offsets[..., None]).reshape(n, k)
    blob = kernels.pack(codes[order], scales[order], offsets[order], 4)
    got = reference_call(x, blob, n, 4, 16, kernels.SILU_MUL)
    np.testing.assert_allclose(got, silu_mul(int8_rounded(x) @ blocks.T), rtol=1e-4, atol=1e-4)


def gelu(y: np.ndarray) -> np.ndarray:
    import torch

    return torch.nn.functional.gelu(torch.from_numpy(y.astype(np.float64))).numpy()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 9, 70, 150])
def test_the_epilogue_adds_the_bias_then_gelu(rows: int) -> None:
    """activation=2 with a bias, in both kernels: gelu(x @ w + b), erf's GELU (BiasGelu's),
    on row counts across the 8-row passes and the 64-row chunks, columns off the tiles."""
    rng = np.random.default_rng(rows)
    k, n = 64, 40
    x = rng.standard_normal((rows, k)).astype(np.float32)
    weight = rng.standard_normal((k, n)).astype(np.float32) * 0.3
    bias = rng.standard_normal(n).astype(np.float32)
    packed_bias = kernels.pack_bias(bias)
    assert packed_bias.shape == (48,) and not packed_bias[n:].any()
    y = reference_float(x, kernels.pack_float(weight), n, kernels.GELU, packed_bias)
    np.testing.assert_allclose(y, gelu(x.astype(np.float64) @ weight + bias), rtol=1e-5,
                               atol=2e-6)
    plain = reference_float(x, kernels.pack_float(weight), n, kernels.NONE, packed_bias)
    np.testing.assert_allclose(plain, x.astype(np.float64) @ weight + bias, rtol=1e-5,
                               atol=1e-5)
    nblocks = k // kernels.BLOCK
    codes = rng.integers(0, 256, (n, nblocks, kernels.BLOCK)).astype(np.uint8)
    scales = (rng.random((n, nblocks)) * 0.01).astype(np.float32)
    blocks = (codes * scales[..., None] - 128 * scales[..., None]).reshape(n, k)
    blob = kernels.pack(codes, scales, None, 8, 32)
    got = reference_call(x, blob, n, 8, 32, kernels.GELU, zero_point=128, bias=packed_bias)
    np.testing.assert_allclose(got, gelu(int8_rounded(x) @ blocks.T + bias), rtol=1e-4,
                               atol=1e-4)
    # each row the same whatever rows, passes and chunks it is computed with
    np.testing.assert_array_equal(
        reference_call(x[-1:], blob, n, 8, 32, kernels.GELU, 128, packed_bias)[0], got[-1])


@needs_kernels
def test_a_swiglu_with_a_bias_adds_it_before_the_activation() -> None:
    rng = np.random.default_rng(3)
    k, n, rows = 64, 64, 5
    order = kernels.gate_up_order(n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    weight = rng.standard_normal((k, n)).astype(np.float32) * 0.3
    bias = rng.standard_normal(n).astype(np.float32)
    y = reference_float(x, kernels.pack_float(weight[:, order]), n, kernels.SILU_MUL,
                        kernels.pack_bias(bias[order]))
    np.testing.assert_allclose(y, silu_mul(x.astype(np.float64) @ weight + bias), rtol=1e-5,
                               atol=1e-5)


def test_pack_lays_out_tiles_of_16_columns() -> None:
    n, nblocks = 20, 2
    codes = (np.arange(n * nblocks * 32) % 16).astype(np.uint8).reshape(n, nblocks, 32)
    scales = np.full((n, nblocks), 0.5, np.float32)
    blob = kernels.pack(codes, scales, -scales, 4)
    assert blob.shape == (2, nblocks, 256 + 64) and blob.dtype == np.uint8
    # tile 0, block 1, chunk 0: byte 4 * col + j holds k = j (low) and k = 4 + j (high)
    col, j = 3, 2
    byte = blob[0, 1, 4 * col + j]
    assert byte & 0x0F == codes[col, 1, j] and byte >> 4 == codes[col, 1, 4 + j]
    tail = blob[0, 1, 256:].view(np.float16)
    assert list(tail[:16]) == [0.5] * 16 and list(tail[16:]) == [-0.5] * 16
    assert not blob[1, :, 256:].view(np.float16)[:, 4:16].any()  # padded columns weigh 0


# -- packages --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Any) -> dict[str, Path]:
    """int4 with integer zero points (round to nearest) and symmetric int8 of a float model;
    int4 with the float zero points of GGUF Q4_K blocks (their correction nodes)."""
    root = tmp_path_factory.mktemp("kernels")
    fused = optimize(export(tiny_decoders.build("llama", root / "source", hidden_size=64,
                                                intermediate_size=128),
                            root / "package"), root / "fused")
    quiet = {"evaluate": False}
    _, gguf_fp32 = tiny_gguf("Q4_K")
    gguf_fused = optimize(gguf_fp32, root / "gguf-fused")
    return {
        "fused": fused.path,
        "int4": quantize(fused, root / "int4",
                         QuantizeOptions.int4(algorithm="rtn").with_(**quiet)).path,
        "int8": quantize(fused, root / "int8", QuantizeOptions.int8().with_(**quiet)).path,
        "int4_gguf": quantize(gguf_fused, root / "int4-gguf",
                              QuantizeOptions.int4().with_(**quiet)).path,
    }


def load(path: Path, **cpu: Any) -> Generator:
    runner = llmopt.load(path, provider_options={"cpu": CPUOptions(float_prompts=False, **cpu)})
    assert isinstance(runner, Generator)
    return runner


@needs_kernels
@pytest.mark.parametrize("name", ["int4", "int8", "int4_gguf"])
def test_the_rewrite_replaces_every_int8_compute_matmul(packages: dict[str, Path],
                                                        name: str) -> None:
    path = packages[name] / "model.onnx"
    shipped = onnx.load(str(path), load_external_data=False)
    proto = onnx.load(str(path), load_external_data=False)
    rewritten = kernels.kernel_model(proto, path.parent, threads=2, float_weights=False)
    matmuls = [n for n in shipped.graph.node if n.op_type == "MatMulNBits"]
    attentions = [n for n in shipped.graph.node if n.op_type == "GroupQueryAttention"]
    assert rewritten == len(matmuls) + len(attentions) and matmuls and attentions
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulNBits" not in ops and ops.count(kernels.OP) == len(matmuls)
    assert "GroupQueryAttention" not in ops
    assert ops.count(kernels.ATTENTION_OP) == len(attentions)
    corrections = sum(n.op_type == "Split" and n.name.endswith("/BlockSums")
                      for n in shipped.graph.node)
    assert (corrections > 0) == (name == "int4_gguf")
    zero_points = [shipped_init for shipped_init in shipped.graph.initializer
                   if shipped_init.name.endswith(".zero_points")]
    assert (len(zero_points) > 0) == (name == "int4")
    # the correction's three nodes go with it, and a SwiGLU's Split, Sigmoid, Mul and Mul
    # with its gate_up product; their weights are not kept beside the blobs
    swiglus = sum(n.op_type == "Sigmoid" for n in shipped.graph.node)
    fused = [a.i for n in proto.graph.node for a in n.attribute if a.name == "activation"]
    assert swiglus > 0 and fused.count(kernels.SILU_MUL) == swiglus
    # and each attention's Split of the packed product and its two RotaryEmbeddings
    rotary = [a.i for n in proto.graph.node for a in n.attribute if a.name == "rotary_dim"]
    assert len(rotary) == len(attentions) and all(r > 0 for r in rotary)
    assert not any(n.op_type == "RotaryEmbedding" for n in proto.graph.node)
    assert len(proto.graph.node) == (len(shipped.graph.node) - 3 * corrections - 4 * swiglus
                                     - 3 * len(attentions))
    names = {t.name for t in proto.graph.initializer}
    assert not any(n.endswith((".zero_point_correction", ".sum_split")) for n in names)


@needs_kernels
@pytest.mark.parametrize("name", ["int4", "int8", "int4_gguf"])
def test_the_kernel_decodes_what_onnx_runtime_decodes(packages: dict[str, Path],
                                                      name: str) -> None:
    """The same weights and the same int8 rounding of activations: the same greedy tokens."""
    ours, theirs = load(packages[name]), load(packages[name], kernels=False)
    assert ours.session_info.kernels > 0 and theirs.session_info.kernels == 0
    a = ours.generate(PROMPT, max_new_tokens=12, temperature=0)
    b = theirs.generate(PROMPT, max_new_tokens=12, temperature=0)
    assert a.token_ids == b.token_ids


@needs_kernels
@needs_kernels
def test_fp32_packages_run_their_matmuls_on_the_float_kernel(packages: dict[str, Path]) -> None:
    """Every MatMul by a weight; the same logits up to float summation order."""
    path = packages["fused"] / "model.onnx"
    shipped = onnx.load(str(path), load_external_data=False)
    proto = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in shipped.graph.initializer}
    matmuls = [n for n in shipped.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    attentions = sum(n.op_type == "GroupQueryAttention" for n in shipped.graph.node)
    rewritten = kernels.kernel_model(proto, path.parent, threads=2)
    assert rewritten == len(matmuls) + attentions and matmuls and attentions
    assert [n.op_type for n in proto.graph.node].count(kernels.FLOAT_OP) == len(matmuls)
    ours, theirs = load(packages["fused"]), load(packages["fused"], kernels=False)
    assert ours.session_info.kernels == rewritten
    a = ours.generate(PROMPT, max_new_tokens=12, temperature=0, logprobs=0)
    b = theirs.generate(PROMPT, max_new_tokens=12, temperature=0, logprobs=0)
    assert a.token_ids == b.token_ids
    assert a.logprobs is not None and b.logprobs is not None
    np.testing.assert_allclose([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs],
                               atol=1e-4)


def test_rows_of_a_batch_do_not_change_each_other(packages: dict[str, Path]) -> None:
    """Each row is rounded and summed on its own, in the same order whatever the batch: a
    prompt's tokens beside others equal its tokens alone, bit for bit in its logits."""
    runner = load(packages["int4_gguf"])
    alone = runner.generate(PROMPT, max_new_tokens=8, temperature=0)
    batch = runner.generate_batch([PROMPT, PROMPT[:4], list(reversed(PROMPT))],
                                  max_new_tokens=8, temperature=0)
    assert batch[0].token_ids == alone.token_ids


def test_kernels_false_keeps_onnx_runtimes_kernels(packages: dict[str, Path]) -> None:
    assert load(packages["int4"], kernels=False).session_info.kernels == 0


def mapping(address: int) -> tuple[int, int, list[str]]:
    """The start, end and ``VmFlags`` of this process's mapping that holds ``address``
    (Linux)."""
    inside, start, end = False, 0, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return start, end, line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def mapping_flags(address: int) -> list[str]:
    return mapping(address)[2]


@needs_kernels
@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc")
def test_the_kernels_weights_are_moved_to_huge_pages_and_compute_the_same(
        packages: dict[str, Path]) -> None:
    """Every kernel weight sits in one mapping advised for 2 MiB pages ("hg" in its VmFlags),
    cache-line aligned; with ``huge_pages=False`` they stay in numpy's heap, outside those
    mappings (not "not advised": numpy itself advises its large allocations, and heap memory
    they once held keeps the flag). The same tokens and bit-identical logprobs either way."""
    huge, plain = load(packages["int4_gguf"]), load(packages["int4_gguf"], huge_pages=False)
    addresses = [value.data_ptr() for value in huge.initializers.values()]
    assert addresses and all(address % 64 == 0 for address in addresses)
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        assert all("hg" in mapping_flags(address) for address in addresses)
    ours = {mapping(address)[:2] for address in addresses}
    assert not any(start <= value.data_ptr() < end for value in plain.initializers.values()
                   for start, end in ours)
    a = huge.generate(PROMPT, max_new_tokens=8, temperature=0, logprobs=0)
    b = plain.generate(PROMPT, max_new_tokens=8, temperature=0, logprobs=0)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


@needs_kernels
def test_the_session_keeps_the_kernels_weights_alive(packages: dict[str, Path]) -> None:
    """ONNX Runtime reads the kernels' weights where they lie, unowned: whoever keeps only the
    session (not the Generator) still runs on live memory, not freed pages."""
    import gc

    ids = np.arange(3, 9, dtype=np.int64)[None]
    positions = np.arange(ids.shape[1])[None]
    model = load(packages["int4_gguf"]).model  # the Generator that made it is dropped
    gc.collect()
    garbage = [np.full(1 << 16, 7.0) for _ in range(64)]  # reuse of any freed pages
    logits = model.step(ids, np.ones_like(ids), positions, model.copying_cache(1))
    kept = load(packages["int4_gguf"])
    expected = kept.model.step(ids, np.ones_like(ids), positions, kept.model.copying_cache(1))
    assert np.array_equal(logits, expected)
    del garbage


def test_the_huge_page_store_keeps_copies_of_the_arrays_it_is_given() -> None:
    store = kernels.HugePageStore()
    arrays = {"a": np.arange(37, dtype=np.float32).reshape(37, 1),
              "b": np.arange(kernels.CHUNK + 5, dtype=np.uint8),  # a mapping of its own
              "c": np.ones((3, 4), np.float16), "d": np.arange(10, dtype=np.int64)}
    for name, array in arrays.items():
        store[name] = array
    for name, array in arrays.items():
        np.add(array, 1, out=array)  # a copy: the originals can go
        stored = store[name]
        assert stored.dtype == array.dtype and stored.flags.c_contiguous
        np.testing.assert_array_equal(stored, array - 1)
        assert stored.ctypes.data % 64 == 0
    assert store["c"].ctypes.data - store["a"].ctypes.data == 192  # packed after "a"


def test_the_huge_page_store_works_without_private_mappings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where mmap has no MAP_PRIVATE (Windows), ordinary aligned buffers."""
    import mmap

    monkeypatch.delattr(mmap, "MAP_PRIVATE")
    store = kernels.HugePageStore()
    store["w"] = np.arange(100, dtype=np.float32)
    np.testing.assert_array_equal(store["w"], np.arange(100, dtype=np.float32))
    assert store["w"].ctypes.data % kernels.HUGE_PAGE == 0


def test_required_kernels_that_cannot_run_are_an_error(packages: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_built",
                        lambda: kernels.Built(None, None, "no C++ compiler found"))
    with pytest.raises(ProviderError, match=r"no C\+\+ compiler found") as raised:
        load(packages["int4"], kernels=True)
    assert "kernels=False" in str(raised.value.fix)
    # not required: the package runs on ONNX Runtime's kernels
    assert load(packages["int4"]).session_info.kernels == 0


def test_a_cpu_without_either_instruction_set_builds_nothing_and_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse4_2", "avx"})
    monkeypatch.setattr(kernels, "build", lambda isa: pytest.fail(f"built {isa}"))
    kernels._built.cache_clear()
    try:
        assert kernels.library() is None
        assert "neither build's instructions (avx512: avx512f" in str(kernels.unavailable())
        assert "avx2: avx2, fma, f16c" in str(kernels.unavailable())
    finally:
        kernels._built.cache_clear()


def test_a_failed_build_says_what_the_compiler_said(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    monkeypatch.setattr(kernels, "compiler", lambda: "false")
    kernels._built.cache_clear()
    try:
        path, _, reason = kernels._built()
        assert path is None and reason is not None and "failed" in reason
    finally:
        kernels._built.cache_clear()


def test_an_unwritable_cache_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder would go
    monkeypatch.setenv("LLMOPT_CACHE", str(blocked))
    kernels._built.cache_clear()
    try:
        path, _, reason = kernels._built()
        assert path is None and reason is not None and str(blocked) in reason
    finally:
        kernels._built.cache_clear()


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_linked_weights_file_is_refused_with_the_fix(packages: dict[str, Path], tmp_path: Path,
                                                       link: str) -> None:
    """ONNX Runtime and onnx refuse external weights behind a symbolic link or with several
    hard links (a repository built by linking package files): the error says to copy them, and
    a link to the package folder itself works."""
    import os
    import shutil

    from llmopt.errors import PackageError

    linked = tmp_path / "linked"
    shutil.copytree(packages["int4"], linked)
    data = linked / "model.onnx.data"
    data.unlink()
    if link == "symbolic":
        data.symlink_to(packages["int4"] / "model.onnx.data")
    else:
        os.link(packages["int4"] / "model.onnx.data", data)
    with pytest.raises(PackageError, match="is a link") as raised:
        load(linked)
    assert "copy the package's files" in str(raised.value.fix)
    data.unlink()  # the package's own file is single again
    folder = tmp_path / "folder-link"
    folder.symlink_to(packages["int4"], target_is_directory=True)
    assert load(folder).generate(PROMPT, max_new_tokens=2).token_ids


# -- attention -------------------------------------------------------------------------------------

HEADS, KV_HEADS = 6, 2


def attention_model(op: str, domain: str, scale: float, bias: bool, **attrs: Any) -> bytes:
    """One GroupQueryAttention (or GroupAttention) node over graph inputs, as the exporter
    wires it: query/key/value, past key/value, seqlens_k, total length, attention bias."""
    from onnx import TensorProto, helper

    names = ["q", "k", "v", "past_k", "past_v", "seqlens", "total"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names[:5]]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in names[5:]]
    if bias:
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, None))
        names += (["", "", "", "bias"] if op == "GroupQueryAttention" else ["bias"])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("out", "present_k", "present_v")]
    node = helper.make_node(op, names, ["out", "present_k", "present_v"], domain=domain,
                            num_heads=HEADS, kv_num_heads=KV_HEADS, scale=scale, **attrs)
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid(domain, 1)], ir_version=10)
    return model.SerializeToString()


def run_attention(model: bytes, feeds: dict[str, np.ndarray], past: tuple[np.ndarray, ...],
                  shared: bool, custom: bool) -> tuple[np.ndarray, ...]:
    """(output, present key, present value); ``shared``: one buffer bound as past and
    present, as the runtime binds its cache."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if custom:
        options.register_custom_ops_library(str(kernels.library()))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    keys, values = (a.copy() for a in past)
    if not shared:
        out = session.run(None, {**feeds, "past_k": keys, "past_v": values})
        return tuple(out)
    batch, seq = feeds["q"].shape[:2]
    out = np.zeros((batch, seq, feeds["q"].shape[2]), np.float32)
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    cache = [ort.OrtValue.ortvalue_from_numpy(a) for a in (keys, values)]
    binding.bind_ortvalue_input("past_k", cache[0])
    binding.bind_ortvalue_input("past_v", cache[1])
    binding.bind_ortvalue_output("present_k", cache[0])
    binding.bind_ortvalue_output("present_v", cache[1])
    binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy(out))
    session.run_with_iobinding(binding)
    return out, keys, values  # written in place


@needs_kernels
@pytest.mark.parametrize(("batch", "seq", "capacity", "lengths", "total", "scale", "dim",
                          "shared"), [
    (1, 1, 64, [40], 41, 0.125, 64, True),            # a decode step in place
    (1, 1, 64, [40], 41, 0.3, 64, True),              # the scale attribute
    (3, 1, 64, [30, 20, 9], 31, 0.125, 64, True),     # ragged rows of a serving batch
    (2, 12, 64, [11, 11], 12, 0.125, 32, True),       # a left-padded prompt (the bias masks)
    (2, 12, 64, [11, 7], 12, 0.125, 64, True),        # a ragged prompt
    (1, 5, 64, [20], 21, 0.125, 64, True),            # a chunk after a cached part
    (1, 5, 64, [12], 21, 0.125, 64, True),            # a chunk of a shorter row
    (8, 1, 96, [80] * 4 + [40] * 4, 81, 0.125, 128, True),
    (1, 3, 64, [40], 41, 0.2, 24, True),              # a head size off the 16-wide vectors
    (1, 1, 20, [20], 21, 0.125, 64, False),           # a past of its own: copied
])
def test_group_attention_computes_what_group_query_attention_computes(
        batch: int, seq: int, capacity: int, lengths: list[int], total: int, scale: float,
        dim: int, shared: bool) -> None:
    rng = np.random.default_rng(batch * 100 + seq)
    feeds = {"q": rng.standard_normal((batch, seq, HEADS * dim)).astype(np.float32),
             "k": rng.standard_normal((batch, seq, KV_HEADS * dim)).astype(np.float32),
             "v": rng.standard_normal((batch, seq, KV_HEADS * dim)).astype(np.float32),
             "seqlens": np.array(lengths, np.int32), "total": np.array(total, np.int32)}
    bias = np.where(rng.random((batch, 1, seq, total)) < 0.2, np.finfo(np.float32).min, 0)
    bias[..., -1] = 0  # every query sees at least its own position
    if seq > 1:  # but one that sees nothing (a left-padded prompt's pad): zeros in both
        bias[-1, 0, 0, :] = np.finfo(np.float32).min
    feeds["bias"] = bias.astype(np.float32)
    past = tuple(rng.standard_normal((batch, KV_HEADS, capacity, dim)).astype(np.float32)
                 for _ in range(2))
    want = run_attention(attention_model("GroupQueryAttention", "com.microsoft", scale, True),
                         feeds, past, shared, custom=False)
    got = run_attention(attention_model(kernels.ATTENTION_OP, kernels.DOMAIN, scale, True,
                                        threads=2, rotary_dim=0, interleaved=0), feeds, past,
                       shared, custom=True)
    for ours, theirs in zip(got, want, strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-6)


def rotary_attention_model(dim: int, rotary_dim: int, interleaved: int) -> Any:
    """The exporter's attention block: a Split of the packed query/key/value, an ONNX
    RotaryEmbedding of the query and of the key over computed cos/sin tables, and a
    GroupQueryAttention with an attention bias."""
    from onnx import TensorProto, helper, numpy_helper

    floats = ["qkv", "past_k", "past_v", "bias", "cos", "sin"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in floats]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT32, None)
               for n in ("seqlens", "total")]
    sizes = numpy_helper.from_array(np.array([HEADS * dim, KV_HEADS * dim, KV_HEADS * dim]),
                                    "sizes")
    rot = {"rotary_embedding_dim": rotary_dim if rotary_dim < dim else 0,
           "interleaved": interleaved}
    nodes = [helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1),
             helper.make_node("RotaryEmbedding", ["q", "cos", "sin"], ["rq"], num_heads=HEADS,
                              **rot),
             helper.make_node("RotaryEmbedding", ["k", "cos", "sin"], ["rk"],
                              num_heads=KV_HEADS, **rot),
             helper.make_node("GroupQueryAttention",
                              ["rq", "rk", "v", "past_k", "past_v", "seqlens", "total", "", "",
                               "", "bias"], ["out", "present_k", "present_v"],
                              domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("out", "present_k", "present_v")]
    return helper.make_model(helper.make_graph(nodes, "rotary", inputs, outputs, [sizes]),
                             opset_imports=[helper.make_opsetid("", 23),
                                            helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


@needs_kernels
@pytest.mark.parametrize(("batch", "seq", "lengths", "total", "dim", "rotary_dim",
                          "interleaved"), [
    (1, 1, [40], 41, 64, 64, 0),                # a decode step
    (3, 1, [30, 20, 9], 31, 64, 64, 0),         # ragged rows of a serving batch
    (2, 12, [11, 7], 12, 64, 64, 0),            # a ragged prompt
    (1, 5, [20], 21, 64, 32, 0),                # partial rotary (GPT-NeoX, Phi), a chunk
    (1, 2, [40], 41, 64, 64, 1),                # interleaved pairs
    (1, 3, [40], 41, 24, 24, 0),                # a head size off the 16-wide vectors
    (2, 1, [30, 20], 31, 128, 128, 0),         # head size 128
])
def test_group_attention_takes_in_the_split_and_rotary_of_the_packed_product(
        tmp_path: Path, batch: int, seq: int, lengths: list[int], total: int, dim: int,
        rotary_dim: int, interleaved: int) -> None:
    """The rewrite folds the Split and both RotaryEmbeddings into GroupAttention (packed
    input, keys rotated as they are cached); the outputs equal ONNX Runtime's graph's, the
    cache bit for bit."""
    import onnxruntime as ort

    reference = rotary_attention_model(dim, rotary_dim, interleaved)
    proto = rotary_attention_model(dim, rotary_dim, interleaved)
    assert kernels.kernel_model(proto, tmp_path, threads=2) == 1
    assert [n.op_type for n in proto.graph.node] == [kernels.ATTENTION_OP]
    rng = np.random.default_rng(dim + seq)
    width = (HEADS + 2 * KV_HEADS) * dim
    angles = rng.uniform(0, 40, (batch, seq, rotary_dim // 2))
    bias = np.zeros((batch, 1, seq, total), np.float32)
    for row, length in enumerate(lengths):
        bias[row, 0, :, length + 1:] = np.finfo(np.float32).min
    feeds = {"qkv": rng.standard_normal((batch, seq, width)).astype(np.float32),
             "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
             "seqlens": np.array(lengths, np.int32), "total": np.array(total, np.int32),
             "bias": bias,
             **{n: rng.standard_normal((batch, KV_HEADS, 64, dim)).astype(np.float32)
                for n in ("past_k", "past_v")}}
    results = []
    for model, custom in ((reference, False), (proto, True)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        if custom:
            options.register_custom_ops_library(str(kernels.library()))
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        results.append(session.run(None, feeds))
    for ours, theirs in zip(results[1], results[0], strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-6)
    # the keys are rotated as ONNX Runtime rounds them: the cache is its own to the bit
    np.testing.assert_array_equal(results[1][1], results[0][1])
    np.testing.assert_array_equal(results[1][2], results[0][2])


def split_model(sizes: list[int], axis: int) -> Any:
    """x @ w + b, then a Split of the product by ``sizes`` along ``axis``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    n = sum(sizes)
    inits = [numpy_helper.from_array(rng.standard_normal((64, n)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(sizes, np.int64), "sizes")]
    outputs = [f"y{i}" for i in range(len(sizes))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]),
             helper.make_node("Add", ["p", "b"], ["pb"]),
             helper.make_node("Split", ["pb", "sizes"], outputs, axis=axis)]
    graph = helper.make_graph(
        nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 64])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@needs_kernels
@pytest.mark.parametrize(("sizes", "axis", "parts"), [
    ([48, 48, 48], -1, 3),   # a packed query/key/value: three outputs, no Split
    ([32, 32], -1, 2),
    ([16, 32], -1, 1),       # unequal parts: the Split stays
    ([40, 40], -1, 1),       # parts that are not whole tiles of 16
    ([48, 48, 48], 2, 1),    # an axis named by its index: the rank is not checked, so it stays
])
def test_a_split_product_writes_its_parts(tmp_path: Path, sizes: list[int], axis: int,
                                          parts: int) -> None:
    import onnxruntime as ort

    reference, proto = split_model(sizes, axis), split_model(sizes, axis)
    assert kernels.kernel_model(proto, tmp_path, threads=2) == 1
    product = next(n for n in proto.graph.node if n.domain == kernels.DOMAIN)
    assert {a.name: a.i for a in product.attribute}["parts"] == parts
    assert ("Split" in [n.op_type for n in proto.graph.node]) == (parts == 1)
    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32)
    results = []
    for model, custom in ((reference, False), (proto, True)):
        options = ort.SessionOptions()
        if custom:
            options.register_custom_ops_library(str(kernels.library()))
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        results.append(session.run(None, {"x": x}))
    for ours, theirs in zip(results[1], results[0], strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_only_plain_group_query_attention_is_rewritten() -> None:
    from onnx import helper

    def gqa(**attrs: Any) -> Any:
        inputs = ["q", "k", "v", "pk", "pv", "seqlens", "total", "", "", "", "bias"]
        return helper.make_node("GroupQueryAttention", inputs, ["o", "pk2", "pv2"],
                                domain="com.microsoft", num_heads=6, kv_num_heads=2, **attrs)

    assert kernels._plain_attention(gqa())
    assert kernels._plain_attention(gqa(scale=0.1, smooth_softmax=-1, local_window_size=-1))
    assert not kernels._plain_attention(gqa(local_window_size=4096))  # a sliding window
    assert not kernels._plain_attention(gqa(softcap=30.0))
    assert not kernels._plain_attention(gqa(do_rotary=1))
    assert not kernels._plain_attention(gqa(some_future_attribute=1))
    rotary_inputs = gqa()
    rotary_inputs.input[7] = "cos_cache"
    assert not kernels._plain_attention(rotary_inputs)


# -- encoders --------------------------------------------------------------------------------------

ENCODER_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world!",
                 "What is the capital of France? Paris, 2 3 4.", "sea"] * 3


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT's fp32, fused (BiasGelu) and int8 (MatMulNBits, int8 compute) packages."""
    root = tmp_path_factory.mktemp("kernel-encoders")
    source = build_encoder("bert", "feature-extraction", root / "source")
    fp32 = export(source, root / "fp32")
    fused = optimize(fp32, root / "fused")
    int8 = quantize(fused, root / "int8", QuantizeOptions.int8().with_(evaluate=False))
    return {"fp32": fp32.path, "fused": fused.path, "int8": int8.path}


@needs_kernels
@pytest.mark.parametrize("name", ["fp32", "fused", "int8"])
def test_encoders_run_on_the_kernels_with_bias_and_gelu_inside(encoders: dict[str, Path],
                                                               name: str) -> None:
    """Every weight MatMul of an encoder moves to the kernels, its bias Add (and BiasGelu) into
    the epilogue; the embeddings are ONNX Runtime's up to float summation order (int8: the
    same weights and the same int8 rounding of activations)."""
    path = encoders[name] / "model.onnx"
    shipped = onnx.load(str(path), load_external_data=False)
    proto = onnx.load(str(path), load_external_data=False)
    rewritten = kernels.kernel_model(proto, path.parent, threads=2)
    products = [n for n in shipped.graph.node if n.op_type in ("MatMul", "MatMulNBits")
                and n.input[1] in {t.name for t in shipped.graph.initializer}]
    assert rewritten == len(products) > 0
    ops = [n.op_type for n in proto.graph.node]
    attrs = [{a.name: a.i for a in n.attribute} for n in proto.graph.node
             if n.domain == kernels.DOMAIN]
    assert all(a["bias"] == 1 for a in attrs)  # BERT: every product has a bias
    gelus = sum(n.op_type == "BiasGelu" for n in shipped.graph.node)
    assert [a["activation"] for a in attrs].count(kernels.GELU) == gelus
    assert (gelus > 0) == (name != "fp32") and "BiasGelu" not in ops
    # the packed query/key/value product writes its three parts: the Split's copy goes
    splits = sum(n.op_type == "Split" for n in shipped.graph.node)
    assert splits > 0 and "Split" not in ops
    assert [a["parts"] for a in attrs].count(3) == splits
    assert len(ops) == len(shipped.graph.node) - len(products) - splits  # each bias Add too
    ours = llmopt.load(encoders[name])
    theirs = llmopt.load(encoders[name], provider_options={"cpu": CPUOptions(kernels=False)})
    assert ours.session_info.kernels == rewritten and theirs.session_info.kernels == 0
    a, b = ours.embed(ENCODER_TEXTS), theirs.embed(ENCODER_TEXTS)
    np.testing.assert_allclose(a, b, atol=1e-3 if name == "int8" else 1e-5)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.9999
