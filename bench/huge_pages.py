"""The kernels' weights on 2 MiB pages (CPUOptions.huge_pages): decode step time and load time.

    python bench/huge_pages.py --package build/bench/smollm2-int4-fused \\
        --package build/bench/smollm2-fused [--rounds 15] [--threads 2] [--out huge_pages]

For each package this opens it twice in one process, with the kernels' weights on huge pages
(the default) and on ordinary 4 KiB pages (``huge_pages=False``), and per round, alternating
which goes first, times 64 decode steps of each after a 120-token prompt (``DecoderModel.step``,
greedy token fixed, so both do the same work). It also opens each package once per setting in
a fresh process for the load time and peak RSS. Writes bench/results/<out>.md and .json. Not a
test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT = list(range(100, 220))
STEPS = 64
SETTINGS = {"huge pages": True, "4 KiB pages": False}
LOAD = """
import json, sys, time
import llmopt
from llmopt.runtime import CPUOptions
from llmopt.runtime.memory import resident_mb
started = time.perf_counter()
llmopt.load(sys.argv[1], provider_options={"cpu": CPUOptions(
    arena=False, intra_op_threads=int(sys.argv[3]), huge_pages=sys.argv[2] == "1")})
print(json.dumps({"load_s": time.perf_counter() - started, "peak_rss_mib": resident_mb("VmHWM"),
                  "rss_mib": resident_mb()}))
"""


def step_ms(generator: Any) -> float:
    from llmopt.runtime.kv import left_pad, position_ids

    model = generator.model
    ids, mask = left_pad([PROMPT])
    cache = model.cache(1, len(PROMPT) + STEPS + 1, generator.placement)
    model.step(ids, mask, position_ids(mask), cache)
    started = time.perf_counter()
    for i in range(STEPS):
        model.step(np.array([[5]]), np.ones((1, len(PROMPT) + i + 1), np.int64),
                   np.array([[len(PROMPT) + i]]), cache)
    return (time.perf_counter() - started) / STEPS * 1000


def load_once(package: Path, huge: bool, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", LOAD, str(package), "1" if huge else "0",
                          str(threads)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    import llmopt
    from llmopt.runtime.providers import CPUOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, action="append", required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="huge_pages")
    args = parser.parse_args()

    load_average = os.getloadavg()
    rows = []
    for package in args.package:
        loads = {name: load_once(package, huge, args.threads) for name, huge in SETTINGS.items()}
        runners = {name: llmopt.load(package, provider_options={"cpu": CPUOptions(
            arena=False, intra_op_threads=args.threads, huge_pages=huge)})
            for name, huge in SETTINGS.items()}
        for runner in runners.values():
            step_ms(runner)  # warm up
        times: dict[str, list[float]] = {name: [] for name in runners}
        for round_ in range(args.rounds):
            order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
            for name in order:
                times[name].append(step_ms(runners[name]))
        huge, small = times["huge pages"], times["4 KiB pages"]
        rows.append({
            "package": package.name,
            "ms_per_step": {name: round(statistics.median(t), 3) for name, t in times.items()},
            "speedup": round(statistics.median(small) / statistics.median(huge), 3),
            "rounds_faster": sum(h < s for h, s in zip(huge, small, strict=True)),
            "all_ms": {name: [round(x, 3) for x in t] for name, t in times.items()},
            "load": {name: {k: round(v, 2) for k, v in stats.items()}
                     for name, stats in loads.items()},
        })
        del runners

    command = "python bench/huge_pages.py " + " ".join(
        [f"--package {p}" for p in args.package]
        + [f"--rounds {args.rounds}", f"--threads {args.threads}", f"--out {args.out}"])
    report = {"command": command, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_at_start": load_average,
              "load_average_at_end": os.getloadavg(), "rounds": args.rounds,
              "threads": args.threads, "steps": STEPS, "prompt_tokens": len(PROMPT),
              "rows": rows}
    out = ROOT / "bench" / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {__doc__.splitlines()[0]}", "", f"Command: `{command}`", "",
             f"{args.threads} threads, {args.rounds} interleaved rounds of {STEPS} decode steps "
             f"after a {len(PROMPT)}-token prompt; load average "
             f"{[round(x, 2) for x in load_average]} at start, "
             f"{[round(x, 2) for x in os.getloadavg()]} at end.", "",
             "| package | ms/step huge pages | ms/step 4 KiB pages | speedup | rounds faster "
             "| load s huge / 4 KiB | peak RSS MiB huge / 4 KiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ms, load = row["ms_per_step"], row["load"]
        lines.append(
            f"| {row['package']} | {ms['huge pages']:.3f} | {ms['4 KiB pages']:.3f} | "
            f"{row['speedup']:.3f}x | {row['rounds_faster']}/{args.rounds} | "
            f"{load['huge pages']['load_s']:.2f} / {load['4 KiB pages']['load_s']:.2f} | "
            f"{load['huge pages']['peak_rss_mib']:.0f} / "
            f"{load['4 KiB pages']['peak_rss_mib']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
