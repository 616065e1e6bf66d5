"""What a rejected prompt-lookup draft costs: one decode step of 1 + N rows against one of 1 row.

    python bench/draft_cost.py [--package int4=build/bench/smollm2-int4-fused ...] \\
        [--drafts 4] [--positions 150] [--repeats 30] [--out NAME]

Each package, batch 1: a prompt of --positions tokens is prefilled, then one step of 1 row or
of 1 + --drafts rows runs on the decode session with every row's logits (what
``SamplingParams.prompt_lookup`` runs), timed alone; --repeats of each, interleaved, medians.
When every draft is rejected, that step made one token at the ratio's cost. Writes
bench/results/<out>.json and .md. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import script_report  # this folder's: packages and provenance shared by its result scripts

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def step_ms(generator: Any, positions: int, rows: int) -> float:
    from llmopt.runtime.kv import position_ids

    model = generator.model
    ids = np.arange(100, 100 + positions, dtype=np.int64)[None]
    cache = model.cache(1, positions + rows + 1, generator.placement)
    mask = np.ones((1, positions), np.int64)
    model.step(ids, mask, position_ids(mask), cache)
    grown = np.ones((1, positions + rows), np.int64)
    started = time.perf_counter()
    model.step(np.full((1, rows), 7, np.int64), grown,
               np.arange(positions, positions + rows)[None], cache, all_logits=True,
               prompt=False)
    return (time.perf_counter() - started) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", action="append", metavar="LABEL=DIR")
    p.add_argument("--drafts", type=int, default=4)
    p.add_argument("--positions", type=int, default=150)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="draft_cost")
    args = p.parse_args()
    import llmopt

    packages = script_report.packages(args.package, ("fused", "int8", "int4"))
    rows = []
    for label, path in packages.items():
        generator: Any = llmopt.load(path, ["cpu"])
        times: dict[int, list[float]] = {1: [], 1 + args.drafts: []}
        for _ in range(args.repeats):
            for n, spent in times.items():
                spent.append(step_ms(generator, args.positions, n))
        one, many = (statistics.median(spent) for spent in times.values())
        rows.append({"package": label, "one_row_ms": one, "drafted_ms": many,
                     "ratio": many / one})
        print(f"{label}: 1 row {one:.2f} ms, {1 + args.drafts} rows {many:.2f} ms", flush=True)
    report = {"command": "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "packages": packages, "drafts": args.drafts, "positions": args.positions,
              "repeats": args.repeats, "rows": rows, "cpus": os.cpu_count(),
              "load_average": list(os.getloadavg()),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out = RESULTS / args.out
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# A decode step of 1 + {args.drafts} rows against 1 row", "",
             f"Command: `{report['command']}`", "",
             f"SmolLM2-135M-Instruct, batch 1, {args.positions} cached positions, every row's "
             f"logits, decode session; median of {args.repeats} interleaved repeats. "
             f"{report['cpus']} CPUs, load average {report['load_average'][0]:.1f}.", "",
             "| package | 1 row ms | drafted step ms | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {r['package']} | {r['one_row_ms']:.2f} | {r['drafted_ms']:.2f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
