"""Benchmark packages across targets, providers, precisions and workloads.

    from llmopt.bench import load_config, run_bench
    run = run_bench(load_config("bench/configs/smollm2_cpu.yaml"), "bench/results/smollm2_cpu")

Everything that can be checked is checked before the first measurement (config keys,
providers, packages, baseline sources); after that a failing point is recorded and the sweep
goes on. Outputs: results.json (schema in :mod:`llmopt.bench.schema`), results.csv, summary.md
and plots/*.png.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.bench.config import BenchConfig, load_config, parse_config
from llmopt.bench.matrix import PackageInfo, Point, expand, inspect_packages
from llmopt.bench.runner import Progress, stderr_progress
from llmopt.errors import InvalidInputError

__all__ = ["BenchConfig", "BenchRun", "load_config", "parse_config", "plan", "run_bench"]


@dataclass
class BenchRun:
    results: dict[str, Any]  # what results.json holds
    files: list[Path]

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.results["records"])


def plan(config: BenchConfig, allow_missing: bool = False
         ) -> tuple[dict[str, PackageInfo], list[Point]]:
    """The packages and points a run would measure; raises on anything that would fail
    before measuring."""
    packages = inspect_packages(config, allow_missing)
    points = expand(config, packages)
    if not points:
        raise InvalidInputError("the config expands to no points",
                                fix="give each sweep at least one target, package and workload")
    for point in points:
        info = packages[point.package]
        if point.target == "pytorch" and not (config.pytorch.source or info.source
                                              or info.missing):
            raise InvalidInputError(f"package {point.package!r} records no source model for "
                                    "the PyTorch baseline",
                                    fix="set pytorch.source to the model it was made from")
        if info.missing is None and point.prompt_tokens + point.new_tokens > _context(info):
            raise InvalidInputError(
                f"{point.id}: {point.prompt_tokens} prompt + {point.new_tokens} new tokens "
                f"exceed {point.package}'s context of {_context(info)}",
                fix="use shorter prompt_lengths or new_tokens")
    return packages, points


def run_bench(config: BenchConfig, out_dir: str | os.PathLike[str] | None = None, *,
              prepare: bool = False, allow_missing: bool = False, plots: bool = True,
              progress: Progress | None = stderr_progress, command: str | None = None
              ) -> BenchRun:
    """Run the sweep and write its outputs to ``out_dir`` (nothing written when None).

    ``prepare`` first builds missing packages whose config says how; ``allow_missing``
    records the points of packages still missing as skipped instead of failing.
    """
    from llmopt.bench.fingerprint import fingerprint, load_average
    from llmopt.bench.records import build_records
    from llmopt.bench.runner import Sweep
    from llmopt.bench.schema import KIND, SCHEMA_VERSION

    if prepare:
        from llmopt.bench.prepare import prepare_packages

        prepare_packages(config, progress or (lambda message: None))
    packages, points = plan(config, allow_missing)
    if progress:
        progress(f"bench {config.name}: {len(points)} points x ({config.run.warmup} warmup + "
                 f"{config.run.repetitions} measured) rounds")
    started = time.time()
    env = fingerprint()
    analysis = None
    if config.analysis.enabled:
        from llmopt.bench.analysis import Analysis

        analysis = Analysis(config, progress or (lambda message: None))
        analysis.probe_bandwidth("before the sweep")
    results = Sweep(config, packages, points, progress).run()
    env["load_average_end"] = load_average()
    records = build_records(results, packages)
    if analysis is not None:
        analysis.probe_bandwidth("after the sweep")
    document = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "name": config.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": command or " ".join(["llmopt", *sys.argv[1:]]),
        "config": dict(config.raw),
        "fingerprint": env,
        "records": records,
    }
    if analysis is not None:
        document["analysis"] = analysis.finish(packages, records)
    files: list[Path] = []
    if out_dir is not None:
        from llmopt.bench.report import write_reports

        files = write_reports(document, Path(out_dir), plots=plots)
    return BenchRun(document, files)


def _context(info: PackageInfo) -> int:
    return info.context_length or 1 << 30
