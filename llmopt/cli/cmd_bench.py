"""``llmopt bench CONFIG.yaml`` runs a sweep; ``llmopt bench compare A.json B.json`` compares
two runs; ``llmopt bench readme RESULTS [README.md]`` writes a run's comparison table into the
README. Flags override the config (or define the whole run without one)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

TARGETS = ("pytorch", "inprocess", "server", "genai")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark packages (PyTorch baseline, in-process, served)",
        description="Run a benchmark sweep from a YAML config and/or flags, writing "
        "results.json, results.csv, summary.md and plots/ to --out. "
        "`llmopt bench compare A.json B.json` compares two runs; "
        "`llmopt bench readme RESULTS [README.md]` writes a run's comparison table between "
        "the README's markers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  llmopt bench bench/configs/smollm2_cpu.yaml --prepare --out bench/results/x\n"
        "  llmopt bench --package fp32=build/bench/smollm2-fp32 --target inprocess "
        "--batch-sizes 1,4\n"
        "  llmopt bench compare bench/results/a/results.json bench/results/b/results.json\n"
        "  llmopt bench readme bench/results/vs_genai README.md")
    p.add_argument("inputs", nargs="*", metavar="CONFIG | compare A B | readme RESULTS [README]",
                   help="a YAML bench config, `compare` and two results files, or `readme`, "
                   "a results file (or its folder) and the README to rewrite")
    p.add_argument("-o", "--out", help="output directory (default bench-results/NAME)")
    p.add_argument("--name", help="run name (default: the config file's name)")
    p.add_argument("--package", action="append", metavar="[LABEL=]DIR",
                   help="package to benchmark (repeatable; replaces the config's packages)")
    p.add_argument("--provider", action="append", metavar="NAME",
                   help="execution provider (repeatable; replaces the config's providers)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads for --provider cpu")
    p.add_argument("--target", action="append", choices=TARGETS,
                   help="target (repeatable; replaces the config's targets)")
    for flag, kind in (("batch-sizes", int), ("prompt-lengths", int), ("new-tokens", int),
                       ("concurrency", int), ("request-rates", float)):
        p.add_argument(f"--{flag}", type=_list_of(kind), metavar="N,N",
                       help="comma-separated; replaces the value in every sweep")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repetitions", type=int)
    p.add_argument("--max-seconds", type=float, help="time budget per point (measured rounds)")
    p.add_argument("--no-interleave", action="store_true",
                   help="finish each point before the next (cleaner memory numbers)")
    p.add_argument("--server-address", help="benchmark a running server instead of starting one")
    p.add_argument("--server-token", help="bearer token for --server-address")
    p.add_argument("--prepare", action="store_true",
                   help="first build missing packages the config says how to build")
    p.add_argument("--skip-missing", action="store_true",
                   help="record points of missing packages as skipped instead of failing")
    p.add_argument("--no-plots", action="store_true", help="leave out the PNG plots")
    p.add_argument("--dry-run", action="store_true", help="list the points and exit")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="compare: ratios within this of 1 count as the same (default 0.05)")


def run(args: argparse.Namespace) -> int:
    from llmopt.errors import InvalidInputError

    if args.inputs[:1] == ["compare"]:
        if len(args.inputs) != 3:
            raise InvalidInputError("compare takes two results files",
                                    fix="llmopt bench compare A/results.json B/results.json")
        return _compare(args.inputs[1], args.inputs[2], args.threshold)
    if args.inputs[:1] == ["readme"]:
        if len(args.inputs) not in (2, 3):
            raise InvalidInputError("readme takes a results file and optionally the README",
                                    fix="llmopt bench readme bench/results/vs_genai README.md")
        return _readme(args.inputs[1], args.inputs[2] if len(args.inputs) == 3 else "README.md")
    if len(args.inputs) > 1:
        raise InvalidInputError(f"one config file expected, got {len(args.inputs)}",
                                fix="llmopt bench CONFIG.yaml [flags]")
    from llmopt.bench import load_config, parse_config, plan, run_bench
    from llmopt.bench.config import with_overrides
    from llmopt.bench.report import SUMMARY_NAME

    overrides = _overrides(args)
    if args.inputs:
        config = load_config(args.inputs[0], overrides)
    else:
        if not args.package:
            raise InvalidInputError("no config file and no --package",
                                    fix="llmopt bench CONFIG.yaml, or --package DIR")
        config = parse_config(with_overrides({"name": "bench"}, overrides), where="flags")
    if args.dry_run:
        packages, points = plan(config, allow_missing=True)
        for label, info in packages.items():
            state = f"MISSING ({info.missing})" if info.missing else info.precision
            print(f"package {label}: {info.path} [{info.task}, {state}]")
        for point in points:
            print(point.id)
        print(f"{len(points)} points", file=sys.stderr)
        return 0
    out = args.out or f"bench-results/{config.name}"
    command = "llmopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_ = run_bench(config, out, prepare=args.prepare, allow_missing=args.skip_missing,
                     plots=not args.no_plots, command=command)
    records = run_.records
    failed = [r for r in records if r["status"] == "failed"]
    print((Path(out) / SUMMARY_NAME).read_text())
    print(f"wrote {len(run_.files)} files to {out}: "
          f"{len(records) - len(failed)} of {len(records)} points measured or skipped, "
          f"{len(failed)} failed", file=sys.stderr)
    return 0


def _compare(a: str, b: str, threshold: float) -> int:
    from llmopt.bench.compare import compare, format_table
    from llmopt.bench.report import read_results

    env, rows, notes = compare(read_results(a), read_results(b), threshold)
    print(f"A: {a}\nB: {b}\n")
    print(format_table(env, rows, notes))
    return 0


def _readme(results: str, readme: str) -> int:
    from llmopt.bench.report import read_results
    from llmopt.bench.report.readme import update_readme

    changed = update_readme(read_results(results), readme)
    print(f"{readme}: table {'rewritten' if changed else 'already up to date'} from {results}")
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.name:
        out["name"] = args.name
    if args.package:
        packages = {}
        for item in args.package:
            label, sep, path = item.partition("=")
            if not sep:
                label, path = item.rstrip("/").split("/")[-1], item
            packages[label] = path
        out["packages"] = packages
    if args.provider or args.threads:
        options = {"intra_op_threads": args.threads} if args.threads else None
        out["providers"] = [{"name": p, "options": options} if options and p == "cpu" else p
                            for p in args.provider or ["cpu"]]
    if args.threads:
        out["pytorch"] = {"threads": args.threads}
    matrix = {"targets": args.target, "batch_sizes": args.batch_sizes,
              "prompt_lengths": args.prompt_lengths, "new_tokens": args.new_tokens,
              "concurrency": args.concurrency, "request_rates": args.request_rates}
    out["matrix"] = {k: v for k, v in matrix.items() if v is not None}
    run = {"warmup": args.warmup, "repetitions": args.repetitions,
           "max_seconds_per_point": args.max_seconds}
    out["run"] = {k: v for k, v in run.items() if v is not None}
    if args.no_interleave:
        out["run"]["interleave"] = False
    server = {"address": args.server_address, "token": args.server_token}
    out["server"] = {k: v for k, v in server.items() if v is not None}
    return out


def _list_of(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse
