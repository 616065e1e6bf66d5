"""What batch-invariant decoding costs: aggregate tokens/s at 1/4/8 streams, on vs off.

    python bench/batch_invariance.py --package DIR [--streams 1 4 8] [--duration 20] [--rounds 2]

Runs the continuous-batching engine in-process over one package (the server adds the same
gRPC cost to both modes), with ``batch_invariant`` on (rows never padded: equal-length rows share
a pass, others run beside them) and off (one shared left-padded batch). Each stream sends chat
prompts of different lengths back to back with a fixed number of new tokens (EOS ignored); the
settings are interleaved round by round, so drift in machine load hits both modes alike.
Aggregate tokens/s = generated tokens of all streams / wall time. Writes
bench/results/batch_invariance.{json,md}. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmopt.bench.prompts import CHAT_QUESTIONS as QUESTIONS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def measure(generator: Any, invariant: bool, streams: int, duration: float,
            new_tokens: int) -> dict[str, float]:
    from llmopt.runtime.engine import Engine, EngineConfig
    from llmopt.runtime.sampling import SamplingParams

    engine = Engine(generator, EngineConfig(max_batch_size=8, batch_invariant=invariant,
                                               prefix_cache_bytes=0))
    engine.start()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    tokens: list[int] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration
    started = time.perf_counter()

    def client(index: int) -> None:
        n = index
        while time.perf_counter() < stop_at:
            result = engine.submit(QUESTIONS[n % len(QUESTIONS)], params, chat=True).result()
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
    return {"invariant": invariant, "streams": streams, "requests": len(tokens),
            "tokens_per_s": sum(tokens) / wall,
            "passes_per_step": engine.forward_passes / max(engine.steps, 1),
            "load": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    import llmopt

    generator = llmopt.load(args.package, ["cpu"])
    command = "python bench/batch_invariance.py " + shlex.join(sys.argv[1:])
    load_before = os.getloadavg()[0]
    rows = []
    for round_ in range(args.rounds):
        for streams in args.streams:
            for invariant in (True, False):
                row = measure(generator, invariant, streams, args.duration, args.new_tokens)
                row["round"] = round_
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for streams in args.streams:
        on, off = ([r["tokens_per_s"] for r in rows if r["streams"] == streams
                    and r["invariant"] is mode] for mode in (True, False))
        summary[streams] = {"on": statistics.median(on), "off": statistics.median(off),
                            "ratio": statistics.median(on) / statistics.median(off)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "package": str(args.package), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg()[0], "rows": rows, "summary": summary}
    (RESULTS / "batch_invariance.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Batch-invariant decoding: aggregate tokens/s, on vs off",
        "",
        f"Command: `{command}`",
        "",
        f"Package: {args.package.name} (SmolLM2-135M-Instruct), CPU provider, in-process engine "
        f"(max_batch_size 8); chat prompts of 8 different lengths, {args.new_tokens} new tokens "
        f"per request (EOS ignored); {args.rounds} interleaved rounds of {args.duration:g} s "
        f"per setting, the median round counts. {os.cpu_count()} CPUs, load average before "
        f"{load_before:.1f}, after {os.getloadavg()[0]:.1f} (the machine is shared: other work "
        "ran during the measurement).",
        "",
        "| round | streams | batch_invariant | requests | aggregate tokens/s "
        "| forward passes per step | load (1 min) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['round']} | {r['streams']} | {'on' if r['invariant'] else 'off'} | "
              f"{r['requests']} | {r['tokens_per_s']:.1f} | {r['passes_per_step']:.2f} | "
              f"{r['load']:.1f} |" for r in rows]
    lines += ["", "| streams | on (tokens/s) | off (tokens/s) | on / off |", "|---|---|---|---|"]
    lines += [f"| {s} | {v['on']:.1f} | {v['off']:.1f} | {v['ratio']:.2f} |"
              for s, v in summary.items()]
    (RESULTS / "batch_invariance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
