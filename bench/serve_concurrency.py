"""Aggregate generation speed through `llmopt serve`: 1 stream vs N concurrent streams.

    python bench/serve_concurrency.py [--package DIR] [--streams 8] [--duration 30] [--rounds 3]

Starts `llmopt serve` as its own process on a free port over a one-model repository (SmolLM2-135M
-Instruct; without --package it is fetched with llmopt.models.fetch and exported once into
--work-dir), then runs rounds of: 1 client streaming requests back to back for --duration
seconds, then --streams clients doing the same at once (interleaved, so drift in machine load
hits both alike). Every request is a chat prompt with a fixed number of new tokens (EOS
ignored). Aggregate tokens/s = generated tokens of all streams / wall time. Writes
bench/results/serve_concurrency.{json,md}. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2"
QUESTIONS = [
    "What is the capital of France?", "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.", "List three fruits.",
    "How do airplanes fly?", "Give me a tip for learning Python.",
    "What is photosynthesis?", "Describe a cat in one paragraph.",
]


def ensure_package(package: Path | None, work_dir: Path) -> Path:
    if package is not None:
        return package
    out = work_dir / "smollm2-135m-instruct"
    if (out / "llmopt.json").is_file():
        return out
    from llmopt.exporter import export
    from llmopt.models import fetch

    print(f"exporting SmolLM2-135M-Instruct to {out} (once)", flush=True)
    export(fetch("smollm2-135m-instruct"), out)
    return out


def start_server(repo: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "llmopt.cli.main", "serve", "--model-repository",
               str(repo), "--port", "0", "--no-metrics", *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"listening on (\S+)", line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain its output
            return proc, found.group(1)
    raise SystemExit(f"llmopt serve did not start (exit {proc.wait()})")


def measure(address: str, streams: int, duration: float, new_tokens: int) -> dict[str, float]:
    import llmopt

    tokens: list[int] = []
    ttfts: list[float] = []
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        with llmopt.Client(address, timeout=600) as c:
            turn = index
            barrier.wait()
            while time.monotonic() < stop_at[0]:
                started = time.perf_counter()
                try:
                    result = c.chat(MODEL, QUESTIONS[turn % len(QUESTIONS)],
                                    max_new_tokens=new_tokens, ignore_eos=True)
                except llmopt.LlmoptError as exc:
                    with lock:
                        errors.append(str(exc))
                    continue
                with lock:
                    tokens.append(result.stats.generated_tokens)
                    ttfts.append(result.stats.ttft_s)
                    latencies.append(time.perf_counter() - started)
                turn += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + duration
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started  # includes finishing the requests begun in time
    return {"streams": streams, "requests": len(tokens), "errors": len(errors),
            "generated_tokens": sum(tokens), "wall_s": wall,
            "aggregate_tokens_per_s": sum(tokens) / wall,
            "mean_ttft_s": statistics.fmean(ttfts) if ttfts else 0.0,
            "p50_latency_s": statistics.median(latencies) if latencies else 0.0,
            "max_latency_s": max(latencies, default=0.0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", type=Path, help="SmolLM2 package (default: export one)")
    p.add_argument("--work-dir", type=Path,
                   default=Path.home() / ".cache" / "llmopt" / "bench-packages")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-batch-invariant", action="store_true",
                   help="serve with one shared padded batch (how the README's 4.1x was measured)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS / "serve_concurrency")
    args = p.parse_args()

    package = ensure_package(args.package, args.work_dir)
    repo = Path(tempfile.mkdtemp(prefix="llmopt-serve-bench-"))
    (repo / MODEL).symlink_to(package.resolve(), target_is_directory=True)
    load_before = os.getloadavg()
    proc, address = start_server(repo, *(["--no-batch-invariant"] if args.no_batch_invariant
                                         else []))
    runs: list[dict[str, float]] = []
    try:
        measure(address, args.streams, 5.0, 8)  # warm-up: sessions, threads, channels
        for round_ in range(args.rounds):
            for streams in (1, args.streams):
                run = measure(address, streams, args.duration, args.max_new_tokens)
                run["round"] = round_
                run["load_average_1m"] = os.getloadavg()[0]
                runs.append(run)
                print(f"round {round_}: {streams} stream(s): "
                      f"{run['aggregate_tokens_per_s']:.1f} tokens/s aggregate, "
                      f"{run['requests']} requests, {run['errors']} errors, "
                      f"load {run['load_average_1m']:.1f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    report = summarize(args, package, runs, load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"{args.streams} streams / 1 stream: {report['speedup']:.2f}x "
          f"(wrote {args.out.with_suffix('.json')} and .md)")
    return 0


def summarize(args: argparse.Namespace, package: Path, runs: list[dict[str, float]],
              load_before: tuple[float, float, float]) -> dict:
    from importlib import metadata

    def median(streams: int) -> float:
        return statistics.median(r["aggregate_tokens_per_s"] for r in runs
                                 if r["streams"] == streams)

    single, many = median(1), median(args.streams)
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    return {
        "command": "python " + shlex.join(argv),
        "model": "SmolLM2-135M-Instruct (fp32 export of the Q4_1 GGUF), CPU provider",
        "package": str(package), "new_tokens_per_request": args.max_new_tokens,
        "duration_s": args.duration, "rounds": args.rounds, "streams": args.streams,
        "single_stream_tokens_per_s": single, "multi_stream_tokens_per_s": many,
        "speedup": many / single if single else 0.0,
        "errors": sum(int(r["errors"]) for r in runs), "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
        "versions": {name: _version(metadata, name) for name in
                     ("llmopt", "onnxruntime", "onnxruntime-gpu", "grpcio", "numpy")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _version(metadata: object, name: str) -> str | None:
    try:
        return metadata.version(name)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a package that is not installed has no version
        return None


def markdown(report: dict) -> str:
    lines = [
        "# Serving concurrency: 1 vs {streams} streams through `llmopt serve`".format(**report),
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['model']}; chat prompts, {report['new_tokens_per_request']} new tokens per "
        f"request (EOS ignored); {report['rounds']} interleaved rounds of "
        f"{report['duration_s']:.0f} s per setting; the median round counts. "
        f"{report['machine']['cpus']} CPUs; load average before "
        f"{report['machine']['load_average_before'][0]:.1f}, after "
        f"{report['machine']['load_average_after'][0]:.1f} (the machine is shared: other "
        "work ran during the measurement).",
        "",
        "| round | streams | requests | errors | aggregate tokens/s | mean TTFT (s) | "
        "p50 latency (s) | load (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['round']} | {r['streams']} | {r['requests']} | {r['errors']} | "
                     f"{r['aggregate_tokens_per_s']:.1f} | {r['mean_ttft_s']:.2f} | "
                     f"{r['p50_latency_s']:.2f} | {r['load_average_1m']:.1f} |")
    lines += ["", f"**{report['streams']} streams: {report['multi_stream_tokens_per_s']:.1f} "
              f"tokens/s vs 1 stream: {report['single_stream_tokens_per_s']:.1f} tokens/s = "
              f"{report['speedup']:.2f}x** (target: >= 3x on this 2-core machine).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
