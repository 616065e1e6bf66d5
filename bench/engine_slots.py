"""The serving engine before and after the slot KV store: aggregate tokens/s and p99 inter-token
latency at 1, 8 and 16 streams, with requests joining mid-stream.

    python bench/engine_slots.py --package DIR [--package DIR ...] [--before REF]
        [--streams 1 8 16] [--duration 12] [--rounds 2] [--new-tokens 32]

Runs the continuous-batching engine in-process (default ``EngineConfig``: batch-invariant on,
``max_batch_size`` raised to the largest stream count) in a fresh worker process per setting:
``before`` imports llmopt as of git ``REF`` (extracted with ``git archive``), ``after`` this
checkout; both run the same package files. One untimed request warms each worker up. Then
each stream sends chat prompts of 8 different lengths back to back, streams start 50 ms apart
and requests end at different times, so requests keep joining and leaving running batches.
Settings are interleaved round by round, so drift in machine load hits both alike. Aggregate
tokens/s = generated tokens of all streams / wall time; inter-token latency = time between two
consecutive tokens of one request (the first token excluded: that is TTFT), p99 over every gap
of the setting. Writes bench/results/engine_slots.{json,md}. Not a test: nothing here asserts a
speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def chat_questions() -> list[str]:
    """llmopt's bench chat questions. Workers get them as JSON from the parent: the ``before``
    worker imports an llmopt that may predate ``llmopt.bench.prompts.CHAT_QUESTIONS``."""
    if "LLMOPT_BENCH_QUESTIONS" in os.environ:
        return list(json.loads(os.environ["LLMOPT_BENCH_QUESTIONS"]))
    from llmopt.bench.prompts import CHAT_QUESTIONS

    return list(CHAT_QUESTIONS)


def measure(package: str, streams: int, duration: float, new_tokens: int) -> dict[str, Any]:
    """One setting, in this process (the worker): whatever llmopt is on the path."""
    import numpy as np

    import llmopt
    from llmopt.runtime import sequence
    from llmopt.runtime.engine import Engine, EngineConfig
    from llmopt.runtime.sampling import SamplingParams

    questions = chat_questions()
    generator = llmopt.load(package, ["cpu"])
    token_times: dict[int, list[float]] = {}
    step = sequence.DecodeState.step

    def timed_step(state: Any, logits: Any) -> int:
        token = step(state, logits)
        token_times.setdefault(id(state), []).append(time.perf_counter())
        return token

    sequence.DecodeState.step = timed_step  # type: ignore[method-assign]
    engine = Engine(generator, EngineConfig(max_batch_size=max(streams, 8),
                                            prefix_cache_bytes=0))
    engine.start()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engine.submit(questions[0], params, chat=True).result()  # first-run allocations: not timed
    token_times.clear()
    tokens: list[int] = []
    lock = threading.Lock()
    started = time.perf_counter()
    stop_at = started + duration

    def client(index: int) -> None:
        time.sleep(0.05 * index)  # staggered: later streams join running batches
        n = index
        while time.perf_counter() < stop_at:
            result = engine.submit(questions[n % len(questions)], params, chat=True).result()
            n += streams
            with lock:
                tokens.append(result.stats.generated_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    engine.close()
    gaps = [b - a for times in token_times.values() for a, b in itertools.pairwise(times)]
    return {"streams": streams, "requests": len(tokens), "tokens_per_s": sum(tokens) / wall,
            "itl_p50_ms": 1000 * float(np.percentile(gaps, 50)) if gaps else None,
            "itl_p99_ms": 1000 * float(np.percentile(gaps, 99)) if gaps else None,
            "passes_per_step": engine.forward_passes / max(engine.steps, 1),
            "load": os.getloadavg()[0]}


def extract(ref: str, into: Path) -> Path:
    """llmopt as of git ``ref``, extracted under ``into`` (its import root)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "llmopt"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_worker(code_root: Path, package: Path, streams: int, args: argparse.Namespace
               ) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code_root),
           "LLMOPT_BENCH_QUESTIONS": json.dumps(chat_questions())}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--package",
               str(package), "--streams", str(streams), "--duration", str(args.duration),
               "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True,
                         cwd=code_root).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, action="append", required=True)
    parser.add_argument("--before", default="e7a1de9", help="git ref of the engine before")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(str(args.package[0]), args.streams[0], args.duration,
                                 args.new_tokens)), flush=True)
        return 0
    command = "python bench/engine_slots.py " + shlex.join(sys.argv[1:])
    args.package = [p.resolve() for p in args.package]  # workers run from another directory
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"before": extract(args.before, Path(tmp)), "after": ROOT}
        for round_ in range(args.rounds):
            for package in args.package:
                for streams in args.streams:
                    for variant, code_root in roots.items():
                        row = run_worker(code_root, package, streams, args)
                        row.update(round=round_, variant=variant, package=package.name)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    summary: dict[str, dict[int, dict[str, float]]] = {}
    for package in args.package:
        for streams in args.streams:
            cell = {}
            for variant in ("before", "after"):
                mine = [r for r in rows if r["package"] == package.name
                        and r["streams"] == streams and r["variant"] == variant]
                cell[f"{variant}_tokens_per_s"] = statistics.median(r["tokens_per_s"]
                                                                    for r in mine)
                cell[f"{variant}_itl_p99_ms"] = statistics.median(r["itl_p99_ms"] for r in mine)
                cell[f"{variant}_passes_per_step"] = statistics.median(
                    r["passes_per_step"] for r in mine)
            summary.setdefault(package.name, {})[streams] = cell
        one = summary[package.name].get(1)
        for cell in summary[package.name].values():
            for variant in ("before", "after"):
                cell[f"{variant}_vs_1_stream"] = (cell[f"{variant}_tokens_per_s"]
                                                  / one[f"{variant}_tokens_per_s"]) if one else 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "before": args.before, "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg()[0], "rows": rows, "summary": summary}
    (RESULTS / "engine_slots.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Serving engine: slot KV store and ragged batches, before vs after",
        "",
        f"Command: `{command}`",
        "",
        f"Before: llmopt at `{args.before}`; after: this checkout. Same package files, CPU "
        f"provider, in-process engine, default EngineConfig (batch-invariant on) with "
        f"max_batch_size = max(streams, 8); chat prompts of 8 different lengths, "
        f"{args.new_tokens} new tokens per request (EOS ignored), streams started 50 ms apart "
        f"and sending back to back (requests join and leave mid-stream); {args.rounds} "
        f"interleaved rounds of {args.duration:g} s per setting, the median round counts. "
        f"{os.cpu_count()} CPUs, load average before {load_before:.1f}, after "
        f"{os.getloadavg()[0]:.1f} (the machine is shared: other work ran during the "
        "measurement).",
        "",
        "| package | streams | before tok/s | after tok/s | after / before | before xN of 1 "
        "stream | after xN of 1 stream | p99 ITL before ms | p99 ITL after ms "
        "| passes/step before | after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cells in summary.items():
        for streams, c in cells.items():
            lines.append(
                f"| {name} | {streams} | {c['before_tokens_per_s']:.1f} | "
                f"{c['after_tokens_per_s']:.1f} | "
                f"{c['after_tokens_per_s'] / c['before_tokens_per_s']:.2f} | "
                f"{c['before_vs_1_stream']:.2f} | {c['after_vs_1_stream']:.2f} | "
                f"{c['before_itl_p99_ms']:.0f} | {c['after_itl_p99_ms']:.0f} | "
                f"{c['before_passes_per_step']:.2f} | {c['after_passes_per_step']:.2f} |")
    lines += ["", "Every round:", "", "| round | package | streams | variant | requests "
              "| tok/s | p50 ITL ms | p99 ITL ms | passes/step | load |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['package']} | {r['streams']} | {r['variant']} | "
              f"{r['requests']} | {r['tokens_per_s']:.1f} | {r['itl_p50_ms']:.0f} | "
              f"{r['itl_p99_ms']:.0f} | {r['passes_per_step']:.2f} | {r['load']:.1f} |"
              for r in rows]
    (RESULTS / "engine_slots.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
