"""Encoder int8 on all-MiniLM-L6-v2: speed and cosine of every int8 preset, in one run.

    python bench/encoder_int8.py [--rounds 3] [--threads 2] [--sensitivity] [--out PATH]

Run it with the main venv's python (.venv) and PYTHONPATH at the repository root. It exports
the cached model (``llmopt fetch all-minilm-l6-v2``) to .cache/encoder_int8/, fuses it and
quantizes the fused package with each preset, plus ONNX Runtime's plain ``quantize_dynamic``
(per-tensor int8 weights, as optimum's avx512_vnni config) on the same fused graph. Then, in
interleaved rounds (every package once per round, rotating the order, the same inputs), it
measures latency at batch 1 (median of 10 calls) and sentences/s at batch 32 (three calls),
both with 128-token inputs, on ``--threads`` intra-op threads. The table gives the best
call (on a machine shared with other jobs the least disturbed one; medians are in the JSON
and beside it) and ratios to fp32 of the same run.

Cosine: pooled, normalized embeddings against the fp32 package (itself within 3e-6 of
PyTorch) on 50 sentences: llmopt's 20 evaluation sentences (also in the built-in calibration
corpus) and 30 held-out sentences of llmopt/data/eval.txt.

``--sensitivity`` adds the per-MatMul sweep behind the preset's float layers: the per-token
preset with no float layer, then with each MatMul in turn kept in float (cosine only).
Markdown goes next to the JSON (``--out``, default bench/results/encoder_int8.json).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "encoder_int8"
SEQUENCE = 128
BATCH = 32


def build_packages() -> dict[str, Path]:
    """name -> package directory (built once, reused when present)."""
    from llmopt.exporter import ExportOptions, export
    from llmopt.models import fetch
    from llmopt.optimizer import optimize
    from llmopt.quantizer import QuantizeOptions, quantize

    source = Path(fetch("all-minilm-l6-v2"))
    fp32, fused = WORK / "fp32", WORK / "fused"
    if not (fp32 / "llmopt.json").is_file():
        export(source, fp32, ExportOptions(task="feature-extraction"))
    if not (fused / "llmopt.json").is_file():
        optimize(fp32, fused)
    presets = {
        "int8 (weight-only)": QuantizeOptions.int8(),
        "int8_dynamic": QuantizeOptions.int8_dynamic(),
        "int8_dynamic per-channel": QuantizeOptions.int8_dynamic(per_channel=True),
        "per-token, no smoothing, all int8": QuantizeOptions.int8_encoder(smooth_alpha=None,
                                                                          keep_float=()),
        "per-token + SmoothQuant 0.5, all int8": QuantizeOptions.int8_encoder(keep_float=()),
        "per-token + SmoothQuant 0.5, layers 0-1 FFN out float": QuantizeOptions.int8_encoder(
            keep_float=("layer.0.output.dense.", "layer.1.output.dense.")),
        "int8_encoder (preset)": QuantizeOptions.int8_encoder(),
        "int8_encoder split activations": QuantizeOptions.int8_encoder(split_activations=True),
    }
    out = {"fp32": fp32, "fused": fused}
    for name, options in presets.items():
        path = WORK / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        if not (path / "llmopt.json").is_file():
            quantize(fused, path, options.with_(evaluate=False))
        out[name] = path
    from llmopt.bench.prepare import ort_quantize_dynamic

    out["ORT quantize_dynamic (per-tensor)"] = ort_quantize_dynamic(fused,
                                                                    WORK / "ort_dynamic")
    return out


def cosine(packages: dict[str, Path], texts: list[str]) -> dict[str, dict[str, float]]:
    import llmopt

    def embed(path: Path) -> np.ndarray:
        return llmopt.load(path, ["cpu"]).embed(texts, normalize=True)  # type: ignore[union-attr]

    ref = embed(packages["fp32"])
    out = {}
    for name, path in packages.items():
        c = np.sum(embed(path) * ref, axis=1)
        out[name] = {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}
    return out


def speed(packages: dict[str, Path], rounds: int, threads: int) -> dict[str, dict[str, float]]:
    from llmopt.runtime.session import cpu_session

    rng = np.random.default_rng(0)

    def feed(batch: int) -> dict[str, np.ndarray]:
        ids = rng.integers(1000, 20000, (batch, SEQUENCE)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids)}

    one, many = feed(1), feed(BATCH)
    sessions = {name: cpu_session(path / "model.onnx", threads) for name, path in
                packages.items()}
    for session in sessions.values():
        session.run(None, many)
    b1: dict[str, list[float]] = {name: [] for name in sessions}
    b32: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for turn in range(rounds):  # each round starts one package later: no fixed position
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            session = sessions[name]
            calls = []
            for _ in range(10):
                start = time.perf_counter()
                session.run(None, one)
                calls.append(time.perf_counter() - start)
            b1[name].append(statistics.median(calls))
            for _ in range(3):
                start = time.perf_counter()
                session.run(None, many)
                b32[name].append(time.perf_counter() - start)
    return {name: {"latency_b1_ms": 1000 * min(b1[name]),
                   "latency_b1_ms_median": 1000 * statistics.median(b1[name]),
                   "sentences_per_s_b32": BATCH / min(b32[name]),
                   "sentences_per_s_b32_median": BATCH / statistics.median(b32[name]),
                   "calls_b32_s": b32[name]} for name in sessions}


def sensitivity(fused: Path, texts: list[str]) -> list[dict[str, Any]]:
    """Cosine of the per-token preset (no float layer) with each MatMul kept in float."""
    import onnx

    from llmopt.quantizer import QuantizeOptions, quantize, weight_matmuls

    proto = onnx.load(str(fused / "model.onnx"), load_external_data=False)
    weights = {n.name: n.input[1] for n in proto.graph.node if n.op_type == "MatMul"}
    names, _ = weight_matmuls(proto, ())
    rows = []
    for keep in [None, *names]:
        out = WORK / "sweep"
        shutil.rmtree(out, ignore_errors=True)
        kept = () if keep is None else (weights[keep],)
        quantize(fused, out, QuantizeOptions.int8_encoder(keep_float=kept)
                 .with_(evaluate=False))
        c = cosine({"fp32": WORK / "fp32", "q": out}, texts)["q"]
        rows.append({"kept_float": keep or "(none)", **c})
        print(rows[-1], file=sys.stderr, flush=True)
    shutil.rmtree(WORK / "sweep", ignore_errors=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    base = result["rows"]["fp32"]
    lines = [
        "# Encoder int8: all-MiniLM-L6-v2, every int8 preset in one run", "",
        f"Command: `{result['command']}`  ", f"Date: {result['date']}; threads "
        f"{result['threads']}; {result['rounds']} interleaved rounds; 128-token inputs; "
        f"load average at start {result['load_average']}. {result['note']}", "",
        "Best call (median in brackets):", "",
        "| package | latency b1 ms | sentences/s b32 | x fp32 (b32) | cosine mean / min |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        median_ratio = row["sentences_per_s_b32_median"] / base["sentences_per_s_b32_median"]
        lines.append(f"| {name} | {row['latency_b1_ms']:.1f} ({row['latency_b1_ms_median']:.1f})"
                     f" | {row['sentences_per_s_b32']:.1f} "
                     f"({row['sentences_per_s_b32_median']:.1f}) | "
                     f"{row['sentences_per_s_b32'] / base['sentences_per_s_b32']:.2f} "
                     f"({median_ratio:.2f})"
                     f" | {row['cosine_mean']:.4f} / {row['cosine_min']:.4f} |")
    if result.get("sensitivity"):
        lines += ["", "## Per-MatMul sensitivity (per-token + SmoothQuant 0.5, one MatMul "
                  "in float)", "", "| kept in float | cosine mean | cosine min |",
                  "|---|---:|---:|"]
        lines += [f"| {r['kept_float']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} |"
                  for r in result["sensitivity"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sensitivity", action="store_true")
    parser.add_argument("--note", default="", help="a sentence for the report (machine load)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/encoder_int8.json")
    args = parser.parse_args()
    from llmopt.bench.analysis import cosine_sentences
    from llmopt.bench.fingerprint import load_average

    texts = cosine_sentences()
    packages = build_packages()
    result: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                          time.gmtime()),
        "threads": args.threads, "rounds": args.rounds, "load_average": load_average(),
        "note": args.note, "sentences": len(texts),
    }
    fidelity = cosine(packages, texts)
    timing = speed(packages, args.rounds, args.threads)
    result["rows"] = {name: {**timing[name], **fidelity[name]} for name in packages}
    if args.sensitivity:
        result["sensitivity"] = sensitivity(packages["fused"], texts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
