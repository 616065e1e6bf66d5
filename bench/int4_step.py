"""llmopt's int4 decode step against GenAI's: one graph change at a time, and on llmopt's kernel.

    python bench/int4_step.py --package build/bench/smollm2-int4-fused \\
        --genai .cache/genai/smollm2-135m-int4-cpu [--rounds 9] [--threads 2] [--out NAME]

Takes the shipped int4 package (GGUF Q4_1 blocks reused exactly, float zero points moved into
a block-sum correction, 8-bit LM head, attention bias for left padding, RotaryEmbedding outside
GroupQueryAttention) and builds variants of its graph that each drop one of those choices:

- ``integer zero points``: the block-sum columns and the Split/MatMul/Add correction removed,
  each block's float zero point rounded to the nearest integer (ONNX Runtime's fast path takes
  those). Timing only: that rounding is what the correction avoids (it costs +29.4% perplexity
  on llmopt's evaluation text, against +0.52% for the shipped graph: ``drop_correction`` on a
  copy of the package, then ``llmopt eval COPY --against FUSED``). A first version of this
  script dropped the correction outright: the activations went out of range and
  GroupQueryAttention ran 1.8x slower on them, which hid the gain.
- ``no attention bias``: GroupQueryAttention without the bias input that masks left padding
  (right for unpadded rows only).
- ``4-bit LM head``: the 8-bit head re-quantized to 4-bit symmetric (timing; ``llmopt quantize
  --lm-head int4``'s clipping search costs +12.7% perplexity on this model, see the .md).
- ``rotary in attention``: GroupQueryAttention's ``do_rotary`` with cos/sin caches instead of
  the Split and two RotaryEmbedding nodes (positions from seqlens_k: unpadded rows only).
- ``all four``, and GenAI's int4 graph of the same model.
- ``MatMulQ kernel``: the shipped graph as llmopt's runtime opens it on CPU, every MatMulNBits
  and its correction on llmopt's own kernel (``llmopt.runtime.kernels``; same weights), with
  ONNX Runtime's GroupQueryAttention.
- ``MatMulQ + GroupAttention``: the graph exactly as llmopt's runtime opens it on CPU, its
  attention on llmopt's GroupAttention too.

Every graph runs one decode step (batch 1, 120 cached positions) in plain ONNX Runtime with the
same session options, interleaved over --rounds rounds of 100 steps; the median ms per step is
reported, and ONNX Runtime's profiler splits one run of each into time per op type. Writes
bench/results/<out>.md and .json. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ort_builds import PAST, feeds  # this folder's: the same decode-step inputs as there

from llmopt.quantizer.blockwise import pack_codes, set_nodes

ROOT = Path(__file__).resolve().parents[1]


# -- variants (graph surgery on a loaded ModelProto) ----------------------------------------------

def drop_correction(model: Any) -> None:
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    dropped: set[int] = set()
    added = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or not node.output[0].endswith("/with_block_sums"):
            continue
        split = readers[node.output[0]][0]
        correction = readers[split.output[1]][0]
        add = readers[correction.output[0]][0]
        attrs = {a.name: a for a in node.attribute}
        nblocks = attrs["K"].i // attrs["block_size"].i
        n = attrs["N"].i - nblocks
        codes = numpy_helper.to_array(inits[node.input[1]])
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n + nblocks, nblocks)
        # integer zero points nearest the float ones: the weights stay close (RTN-like error),
        # so the activations stay in range and the kernels time what they would on real data
        shift = numpy_helper.to_array(inits[correction.input[1]]).T  # s * (8 - z), [n, nblocks]
        zeros = np.clip(np.round(8 - shift / np.where(scales[:n] == 0, 1, scales[:n])), 0, 15)
        zeros = zeros.astype(np.uint8)
        if nblocks % 2:
            zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
        added += [numpy_helper.from_array(np.ascontiguousarray(codes[:n]), node.input[1] + ".n"),
                  numpy_helper.from_array(scales[:n].reshape(-1).copy(), node.input[2] + ".n"),
                  numpy_helper.from_array((zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1),
                                          node.input[2] + ".zero_points")]
        node.input[1], node.input[2] = added[-3].name, added[-2].name
        node.input.append(added[-1].name)
        attrs["N"].i = n
        node.output[0] = add.output[0]
        dropped |= {id(split), id(correction), id(add)}
    set_nodes(model, [n for n in graph.node if id(n) not in dropped], added)


def drop_attention_bias(model: Any) -> None:
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 10:
            node.input[10] = ""


def head_4bit(model: Any) -> None:
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    added = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or "lm_head" not in node.input[1]:
            continue
        attrs = {a.name: a for a in node.attribute}
        k, n, block, bits = (attrs[a].i for a in ("K", "N", "block_size", "bits"))
        if bits != 8:
            continue
        codes = numpy_helper.to_array(inits[node.input[1]]).reshape(n, k // block, block)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, k // block)
        weight = (codes.astype(np.float32) - 128) * scales[..., None]
        scale4 = np.abs(weight).max(-1) / 7 + 1e-12
        q = np.clip(np.round(weight / scale4[..., None]) + 8, 0, 15).astype(np.uint8)
        added += [numpy_helper.from_array(pack_codes(q, 4), node.input[1] + ".4bit"),
                  numpy_helper.from_array(scale4.astype(np.float32).reshape(-1),
                                          node.input[2] + ".4bit")]
        node.input[1], node.input[2] = added[-2].name, added[-1].name
        del node.input[3:]
        attrs["bits"].i = 4
    set_nodes(model, list(graph.node), added)


def rotary_in_attention(model: Any) -> None:
    from onnx import helper, numpy_helper

    graph = model.graph
    made = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    inv_freq = numpy_helper.to_array(inits["model.rotary.inv_freq"]).astype(np.float32)
    angles = np.arange(8192, dtype=np.float32)[:, None] * inv_freq[None, :]
    added = [numpy_helper.from_array(np.cos(angles), "bench.cos_cache"),
             numpy_helper.from_array(np.sin(angles), "bench.sin_cache")]
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        rq, rk = made[node.input[0]], made[node.input[1]]
        split = made[rq.input[0]]
        dropped |= {id(rq), id(rk), id(split)}
        inputs = [split.input[0], "", "", *node.input[3:7], "bench.cos_cache", "bench.sin_cache",
                  "", node.input[10] if len(node.input) > 10 else ""]
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("do_rotary", 1),
                               helper.make_attribute("rotary_interleaved", 0)])
    set_nodes(model, [n for n in graph.node if id(n) not in dropped], added)


PACKAGE: list[Path] = []  # the package folder (its weights file), set by main
THREADS: list[int] = []


def kernel_graph(model: Any) -> None:
    from llmopt.runtime import kernels

    kernels.kernel_model(model, PACKAGE[0], THREADS[0], attention=False)


def all_kernels(model: Any) -> None:
    from llmopt.runtime import kernels

    kernels.kernel_model(model, PACKAGE[0], THREADS[0])


VARIANTS: dict[str, list[Callable[[Any], None]]] = {
    "llmopt int4 as shipped": [],
    "integer zero points": [drop_correction],
    "no attention bias": [drop_attention_bias],
    "4-bit LM head": [head_4bit],
    "rotary in attention": [rotary_in_attention],
    "all four": [drop_correction, drop_attention_bias, head_4bit, rotary_in_attention],
    "MatMulQ kernel": [kernel_graph],
    "MatMulQ + GroupAttention": [all_kernels],
}

# -- timing ---------------------------------------------------------------------------------------

def session(path: Path, threads: int, profile: str | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    from llmopt.runtime import kernels

    if kernels.library() is not None:  # the MatMulQ graph needs it; the others ignore it
        options.register_custom_ops_library(str(kernels.library()))
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_times(path: Path, threads: int, kv: tuple[int, int], work: Path) -> dict[str, float]:
    s = session(path, threads, str(work / "profile"))
    f = feeds(s, *kv)
    for _ in range(60):
        s.run(["logits"], f)
    events = json.loads(Path(s.end_profiling()).read_text())
    total: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"] / 60 / 1000
    return {op: round(ms, 3) for op, ms in total.most_common()}


def main() -> None:
    import onnx

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="llmopt int4 package")
    parser.add_argument("--genai", type=Path, help="GenAI int4 folder (model.onnx)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="int4_step")
    args = parser.parse_args()

    PACKAGE[:] = [args.package]
    THREADS[:] = [args.threads]
    manifest = json.loads((args.package / "llmopt.json").read_text())
    kv = (int(manifest["kv_cache"]["num_kv_heads"]), int(manifest["kv_cache"]["head_dim"]))
    work = Path(tempfile.mkdtemp(prefix="int4_step_"))
    paths: dict[str, Path] = {}
    nodes: dict[str, int] = {}
    for name, changes in VARIANTS.items():
        model = onnx.load(str(args.package / "model.onnx"))
        for change in changes:
            change(model)
        paths[name] = work / f"{len(paths)}.onnx"
        onnx.save(model, str(paths[name]))
        nodes[name] = len(model.graph.node)
    if args.genai:
        paths["GenAI int4"] = args.genai / "model.onnx"
        nodes["GenAI int4"] = len(onnx.load(str(paths["GenAI int4"]),
                                            load_external_data=False).graph.node)

    sessions = {n: session(p, args.threads) for n, p in paths.items()}
    inputs = {n: feeds(s, *kv) for n, s in sessions.items()}
    for n, s in sessions.items():
        for _ in range(20):
            s.run(["logits"], inputs[n])
    times: dict[str, list[float]] = {n: [] for n in sessions}
    load = os.getloadavg()
    for _ in range(args.rounds):
        for n, s in sessions.items():
            started = time.perf_counter()
            for _ in range(100):
                s.run(["logits"], inputs[n])
            times[n].append((time.perf_counter() - started) / 100 * 1000)
    ops = {n: op_times(p, args.threads, kv, work) for n, p in paths.items()}

    shipped = float(np.median(times["llmopt int4 as shipped"]))
    rows = [{"graph": n, "nodes": nodes[n], "ms_per_step": round(float(np.median(t)), 3),
             "x_shipped": round(shipped / float(np.median(t)), 3), "op_ms": ops[n]}
            for n, t in times.items()]
    command = ("python bench/int4_step.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v is not None))
    report = {"command": command, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_at_start": load,
              "rounds": args.rounds, "threads": args.threads, "past": PAST, "rows": rows}
    out = ROOT / "bench" / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    top = ["MatMulNBits", "MatMulQ", "GroupQueryAttention", "MatMul", "Split", "Add",
           "RotaryEmbedding", "SkipSimplifiedLayerNormalization"]
    lines = [f"# {__doc__.splitlines()[0]}", "", f"Command: `{command}`", "",
             f"{args.threads} threads, batch 1, {PAST} cached positions, {args.rounds} "
             f"interleaved rounds of 100 steps, plain ONNX Runtime; load average at start "
             f"{[round(x, 2) for x in load]}.", "",
             "| graph | nodes | ms/step (median) | x shipped | " + " | ".join(
                 f"{op} ms" for op in top) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(top)]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['nodes']} | {r['ms_per_step']} | {r['x_shipped']} | "
                     + " | ".join(str(r["op_ms"].get(op, "")) for op in top) + " |")
    lines += ["", "Op columns: ONNX Runtime's profiler, kernel time per step (profiling adds a "
              "per-node cost, so they overstate small ops; the ms/step column is unprofiled)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
