"""One decode step on two ONNX Runtime builds: onnxruntime-gpu (llmopt's) and plain onnxruntime.

    python bench/ort_builds.py --package build/bench/smollm2-int4-fused \\
        --genai .cache/genai/smollm2-135m-int4-cpu \\
        --python .venv/bin/python --python .venv-genai/bin/python [--rounds 7] [--out NAME]

llmopt depends on ``onnxruntime-gpu`` (its CPU kernels run where no GPU is); GenAI's reference
here runs on plain ``onnxruntime``, a newer release. If the plain wheel ran llmopt's packages
faster on CPU, CPU-only users should get it. This script answers that for one decode step
(batch 1, 120 cached positions, 2 threads) of:

- llmopt's int4 package as shipped, on ONNX Runtime's kernels (MatMulNBits, its
  GroupQueryAttention);
- the same package as llmopt's runtime opens it on an AVX-512 VNNI CPU (MatMulQ and
  GroupAttention from llmopt's kernel library, which both builds load);
- GenAI's int4 graph of the same model.

Each Python (``--python``, one per build) runs every graph in a fresh process per round, the
builds alternating, so both see the same machine; a round is 20 warm-up steps then 100 timed
ones per graph. Writes bench/results/<out>.md and .json. Not a test: nothing here asserts a
speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAST = 120
WARMUP, STEPS = 20, 100


# -- the worker: plain numpy and onnxruntime, so that any build's Python runs it ------------------

def feeds(session: Any, kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            out[i.name] = np.array([[1234]], np.int64)
        elif i.name == "attention_mask":
            out[i.name] = np.ones((1, PAST + 1), np.int64)
        elif i.name == "position_ids":
            out[i.name] = np.array([[PAST]], np.int64)
        elif i.name == "logits_to_keep":
            out[i.name] = np.array(1, np.int64)
        elif i.name.startswith("past_key_values"):
            out[i.name] = (rng.standard_normal((1, kv_heads, PAST, head_dim)) * 0.1
                           ).astype(np.float32)
        else:
            raise SystemExit(f"unexpected input {i.name}")
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """ms per step of each graph in ``spec`` on this Python's onnxruntime."""
    import onnxruntime as ort

    times = {}
    for name, path in spec["graphs"].items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.log_severity_level = 3
        options.register_custom_ops_library(spec["library"])
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inputs = feeds(session, *spec["kv"])
        for _ in range(WARMUP):
            session.run(["logits"], inputs)
        started = time.perf_counter()
        for _ in range(STEPS):
            session.run(["logits"], inputs)
        times[name] = (time.perf_counter() - started) / STEPS * 1000
    return {"onnxruntime": ort.__version__, "package": _distribution(), "ms": times}


def _distribution() -> str:
    from importlib import metadata

    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "?"


# -- the driver ------------------------------------------------------------------------------------

def prepare(package: Path, genai: Path | None, threads: int, work: Path) -> dict[str, str]:
    import onnx

    from llmopt.runtime import kernels

    graphs = {"llmopt int4 on ONNX Runtime's kernels": str(package / "model.onnx")}
    model = onnx.load(str(package / "model.onnx"))
    kernels.kernel_model(model, package, threads)
    onnx.save(model, str(work / "kernels.onnx"), save_as_external_data=True,
              location="kernels.onnx.data")
    graphs["llmopt int4 on llmopt's kernels"] = str(work / "kernels.onnx")
    if genai is not None:
        graphs["GenAI int4"] = str(genai / "model.onnx")
    return graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, help="llmopt int4 package")
    parser.add_argument("--genai", type=Path, help="GenAI int4 folder (model.onnx)")
    parser.add_argument("--python", action="append", default=[],
                        help="a Python with one ONNX Runtime build (give two)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="ort_builds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a JSON spec: time its graphs
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.package is None or len(args.python) < 2:
        parser.error("--package and two --python are required")

    from llmopt.runtime import kernels

    library = kernels.library()
    if library is None:
        raise SystemExit(f"llmopt's kernels cannot run here: {kernels.unavailable()}")
    manifest = json.loads((args.package / "llmopt.json").read_text())
    kv = [int(manifest["kv_cache"]["num_kv_heads"]), int(manifest["kv_cache"]["head_dim"])]
    work = Path(tempfile.mkdtemp(prefix="ort_builds_"))
    spec = {"graphs": prepare(args.package, args.genai, args.threads, work),
            "library": str(library), "threads": args.threads, "kv": kv}
    load = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {}
    builds: dict[str, str] = {}
    for _ in range(args.rounds):
        for python in args.python:
            done = subprocess.run([python, __file__, "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            builds[python] = f"{result['package']} (onnxruntime {result['onnxruntime']})"
            runs.setdefault(python, []).append(result["ms"])
    medians = {p: {g: round(float(np.median([r[g] for r in rs])), 3) for g in spec["graphs"]}
               for p, rs in runs.items()}
    first, second = args.python[0], args.python[1]
    command = "python bench/ort_builds.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items()
        if v is not None and k not in ("python", "worker")) + "".join(
        f" --python {p}" for p in args.python)
    report = {"command": command, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_at_start": load,
              "rounds": args.rounds, "threads": args.threads, "past": PAST,
              "builds": builds, "ms_per_step": medians, "runs": runs}
    out = ROOT / "bench" / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {__doc__.splitlines()[0]}", "", f"Command: `{command}`", "",
             f"{args.threads} threads, batch 1, {PAST} cached positions, {args.rounds} rounds "
             f"(a fresh process per build per round, builds alternating) of {STEPS} steps; "
             f"load average at start {[round(x, 2) for x in load]}.", "",
             f"| graph | {builds[first]} ms/step | {builds[second]} ms/step | "
             "second / first |", "|---|---:|---:|---:|"]
    for graph in spec["graphs"]:
        a, b = medians[first][graph], medians[second][graph]
        lines.append(f"| {graph} | {a} | {b} | {b / a:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
