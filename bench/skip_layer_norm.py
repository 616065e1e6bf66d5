"""ONNX Runtime's CPU SkipLayerNormalization against the Add + LayerNormalization it fuses.

    python bench/skip_layer_norm.py [--rounds 50] [--threads 2] [--out PATH]

One-op graphs timed in interleaved rounds on the CPU provider: LayerNorm's fused form
(``SkipLayerNormalization``, com.microsoft), the two ops it replaces (``Add`` then
``LayerNormalization``), and the RMS form (``SkipSimplifiedLayerNormalization`` against ``Add``
+ ``SimplifiedLayerNormalization``) for comparison, at a decoder's decode and prompt shapes and
an encoder's batch shapes. The result decides what ``optimize`` emits for float32 LayerNorm
models (``llmopt.exporter.graph.SKIP_LAYER_NORM_CPU``). Markdown goes next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

SHAPES = ([1, 1, 768], [1, 108, 576], [1, 108, 768], [1, 128, 384], [32, 128, 384])


def graphs(hidden: int) -> dict[str, object]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    gamma = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "gamma")
    beta = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "beta")
    ms = "com.microsoft"
    forms = {
        "SkipLayerNormalization": [helper.make_node(
            "SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"], domain=ms,
            epsilon=1e-5)],
        "Add + LayerNormalization": [
            helper.make_node("Add", ["x", "skip"], ["sum"]),
            helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1,
                             epsilon=1e-5)],
        "SkipSimplifiedLayerNormalization": [helper.make_node(
            "SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y"], domain=ms,
            epsilon=1e-5)],
        "Add + SimplifiedLayerNormalization": [
            helper.make_node("Add", ["x", "skip"], ["sum"]),
            helper.make_node("SimplifiedLayerNormalization", ["sum", "gamma"], ["y"], axis=-1,
                             epsilon=1e-5)],
    }
    out = {}
    for name, nodes in forms.items():
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "skip")]
        used = {i for node in nodes for i in node.input}
        graph = helper.make_graph(nodes, name, inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [t for t in (gamma, beta) if t.name in used])
        out[name] = helper.make_model(graph, ir_version=10, opset_imports=[
            helper.make_opsetid("", 18), helper.make_opsetid(ms, 1)])
    return out


def main() -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/skip_layer_norm.json")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(1)
        feed = {"x": rng.standard_normal(shape, np.float32),
                "skip": rng.standard_normal(shape, np.float32)}
        sessions = {name: ort.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
                    for name, model in graphs(shape[-1]).items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, feed)
        for _ in range(args.rounds):  # interleaved: one call of each form per round
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append(time.perf_counter() - start)
        median = {name: 1e6 * statistics.median(t) for name, t in times.items()}
        rows.append({"shape": shape, "us": median,
                     "skip_layer_norm_x": median["SkipLayerNormalization"]
                     / median["Add + LayerNormalization"]})
    from llmopt.bench.fingerprint import cpu_info

    cpu = cpu_info()
    isa = [flag for flag, has in cpu["isa"].items() if has]
    result = {"onnxruntime": ort.__version__, "cpu": cpu["model"], "isa": isa,
              "threads": args.threads, "rounds": args.rounds, "load": os.getloadavg(),
              "command": "python bench/skip_layer_norm.py", "rows": rows}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    forms = list(result["rows"][0]["us"])
    lines = ["# SkipLayerNormalization vs Add + LayerNormalization on the CPU provider", "",
             f"Command: `{result['command']}`  ",
             f"{result['cpu']} ({', '.join(result['isa'] or [])}); "
             f"onnxruntime {result['onnxruntime']}, {result['threads']} threads, median of "
             f"{result['rounds']} interleaved calls, load average {result['load']}.", "",
             "| shape | " + " | ".join(f"{f} µs" for f in forms)
             + " | fused / unfused (LayerNorm) |",
             "|---|" + "---:|" * (len(forms) + 1)]
    for row in result["rows"]:
        lines.append(f"| {row['shape']} | " + " | ".join(f"{row['us'][f]:.1f}" for f in forms)
                     + f" | {row['skip_layer_norm_x']:.2f}x |")
    lines += ["", "A ratio above 1 means the fused op is slower. `optimize` keeps Add + "
              "LayerNormalization in float32 graphs (the CPU's); the RMS form stays fused.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
