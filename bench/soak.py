"""Soak `llmopt serve` with the clients a deployment sees: errors, throughput, latency, leaks.

    python bench/soak.py [--duration 600] [--concurrency 1,2,4,8,16,32]
                         [--clients triton,llmopt,perf_analyzer] [--models encoder,decoder]

Builds (once, with the llmopt CLI, into --work-dir) all-MiniLM-L6-v2 as an encoder package and
SmolLM2-135M-Instruct as an int4 package, serves both from one `llmopt serve` process on a free
port, then for each model, client and concurrency level runs that many closed-loop workers for
--duration seconds:

- `triton`: tritonclient.grpc ModelInfer with NO deadline (no client_timeout), the client most
  KServe users have; the decoder gets `text_input` with `max_tokens`.
- `llmopt`: llmopt.Client Embed / Generate, also without a deadline.
- `perf_analyzer`: NVIDIA's KServe load generator on the encoder, when $PERF_ANALYZER names it
  (`eval "$(/work/shared/tools/setup-perf-analyzer.sh)"` installs it from the tritonclient
  2.41.0 wheel; it needs libb64 and libcudart from pip, no GPU). Skipped, and said so, without.

Every --sample seconds the server process's RSS, threads and open fds are recorded; the report
gives errors, requests/s (and tokens/s for the decoder), p50/p99 latency per phase, the RSS
slope after the first phase (the warm-up; the first minute where a model runs one phase), and
threads/fds at start and end. Writes --out.json and --out.md. Not a test: nothing here asserts
a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.bench.targets.server_process import launch_server  # the one launcher of servers

ROOT = Path(__file__).resolve().parents[1]
ENCODER, DECODER = "minilm", "smollm2-int4"
TEXT = "The quick brown fox jumps over the lazy dog while the sea rolls under a grey sky."
PROMPT = "Write a short poem about the sea."
NEW_TOKENS = 16


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llmopt.cli.main", *args], check=True)


def build_packages(work: Path, models: list[str]) -> Path:
    """A repository folder of ``models``: MiniLM (fp32) and SmolLM2 int4, built with the CLI
    once."""
    from llmopt.models import fetch

    packages = {ENCODER: work / "minilm", DECODER: work / "smollm2-int4"}
    packages = {name: path for name, path in packages.items() if name in models}
    if ENCODER in packages and not (packages[ENCODER] / "llmopt.json").is_file():
        cli("export", str(fetch("all-minilm-l6-v2")), "-o", str(packages[ENCODER]),
            "--task", "feature-extraction")
    if DECODER in packages and not (packages[DECODER] / "llmopt.json").is_file():
        fp32 = work / "smollm2-fp32"
        if not (fp32 / "llmopt.json").is_file():
            cli("export", str(fetch("smollm2-135m-instruct")), "-o", str(fp32))
        cli("quantize", str(fp32), "-o", str(packages[DECODER]), "--method", "int4",
            "--no-eval")
    repo = work / ("repo-" + "-".join(sorted(packages)))
    repo.mkdir(parents=True, exist_ok=True)
    for name, package in packages.items():
        if not (repo / name).exists():
            (repo / name).symlink_to(package.resolve(), target_is_directory=True)
    return repo


class Sampler:
    """RSS, threads and fds of the server process every ``period`` seconds, on a thread."""

    def __init__(self, pid: int, period: float) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.period = period
        self.samples: list[dict[str, float]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, phase: str = "") -> dict[str, Any]:
        with self.process.oneshot():
            row = {"t_s": round(time.monotonic() - self.started, 1),
                   "rss_mb": round(self.process.memory_info().rss / 2**20, 1),
                   "threads": self.process.num_threads(), "fds": self.process.num_fds(),
                   "phase": phase}
        self.samples.append(row)
        return row

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample(self.phase)

    def start(self) -> Sampler:
        self.phase = "start"
        self.sample("start")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample("end")


def closed_loop(workers: int, duration: float,
                make_call: Callable[[], Callable[[], int]]) -> dict[str, Any]:
    """``workers`` threads calling back to back for ``duration`` s; each call returns the
    tokens it produced (0 for embeddings)."""
    latencies: list[float] = []
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(workers + 1)
    stop_at = [0.0]

    def worker() -> None:
        call = make_call()
        barrier.wait()
        while time.monotonic() < stop_at[0]:
            started = time.perf_counter()
            try:
                produced = call()
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += produced

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + duration
    began = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    ordered = sorted(latencies)

    def pct(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) \
            if ordered else None

    return {"requests": len(latencies), "errors": len(errors),
            "error_kinds": sorted({e[:120] for e in errors})[:5],
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "tokens_per_s": round(tokens[0] / elapsed, 1), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "seconds": round(elapsed, 1)}


def triton_call(address: str, model: str) -> Callable[[], Callable[[], int]]:
    import tritonclient.grpc as tc

    def make() -> Callable[[], int]:
        client = tc.InferenceServerClient(address)
        if model == ENCODER:
            ids = np.full((1, 32), 2000, np.int64)
            tensor = tc.InferInput("input_ids", list(ids.shape), "INT64")
            tensor.set_data_from_numpy(ids)

            def encode() -> int:
                client.infer(model, [tensor])  # no client_timeout: no deadline
                return 0
            return encode
        text = tc.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))

        def generate() -> int:
            result = client.infer(model, [text], parameters={
                "max_tokens": NEW_TOKENS, "ignore_eos": True, "chat": True})
            return int(result.get_response().parameters["generated_tokens"].int64_param)
        return generate

    return make


def llmopt_call(address: str, model: str) -> Callable[[], Callable[[], int]]:
    import llmopt

    def make() -> Callable[[], int]:
        client = llmopt.Client(address)  # no timeout: no deadline
        if model == ENCODER:
            return lambda: (client.embed(model, [TEXT]), 0)[1]
        return lambda: len(client.generate(model, PROMPT, chat=True, max_new_tokens=NEW_TOKENS,
                                           ignore_eos=True).token_ids)

    return make


def perf_analyzer(address: str, workers: int, duration: float) -> dict[str, Any] | None:
    """One perf_analyzer run on the encoder, or None when it is not installed."""
    binary = os.environ.get("PERF_ANALYZER")
    if not binary or not Path(binary).is_file():
        return None
    command = [binary, "-m", ENCODER, "-u", address, "-i", "grpc", "--input-data", "zero",
               "--shape", "input_ids:1,32", "--shape", "attention_mask:1,32",
               "--shape", "token_type_ids:1,32", "--concurrency-range", str(workers),
               "--measurement-mode", "time_windows",
               "--measurement-interval", str(int(duration * 1000 / 3)), "--max-trials", "3",
               "--stability-percentage", "999", "--percentile", "99"]
    run = subprocess.run(command, check=False, capture_output=True, text=True,
                         timeout=duration * 6 + 120)
    out = run.stdout + run.stderr

    def number(pattern: str) -> float | None:
        found = re.findall(pattern, out)
        return float(found[-1]) if found else None

    p50, p99 = number(r"p50 latency: (\d+) usec"), number(r"p99 latency: (\d+) usec")
    return {"requests": None, "errors": 0 if run.returncode == 0 else 1,
            "error_kinds": [] if run.returncode == 0 else [out.strip()[-300:]],
            "requests_per_s": number(r"Throughput: ([\d.]+) infer/sec"), "tokens_per_s": 0.0,
            "p50_ms": None if p50 is None else round(p50 / 1000, 1),
            "p99_ms": None if p99 is None else round(p99 / 1000, 1), "seconds": duration,
            "command": shlex.join(command)}


def slopes_after_warmup(samples: list[dict[str, Any]], models: list[str],
                        warmup_s: float = 60.0) -> dict[str, Any]:
    """RSS slope per model over its phases after its first one (the warm-up: sessions and
    arenas reach their working size), and over the whole run after the first phase. Where a
    model ran a single phase, its first ``warmup_s`` seconds are the warm-up instead."""
    def after_warmup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not rows:
            return rows
        first = rows[0]["phase"]
        later = [r for r in rows if r["phase"] != first]
        return later or [r for r in rows if r["t_s"] >= rows[0]["t_s"] + warmup_s]

    slopes: dict[str, Any] = {m: rss_slope(after_warmup(
        [s for s in samples if s["phase"].startswith(m + " ")])) for m in models}
    slopes["whole run"] = rss_slope(after_warmup(samples[1:]))
    return slopes


def rss_slope(samples: list[dict[str, Any]]) -> float | None:
    """Least-squares RSS slope of ``samples`` in MB per minute."""
    points = [(s["t_s"], s["rss_mb"]) for s in samples]
    if len(points) < 3:
        return None
    t = np.array([p[0] for p in points]) / 60
    rss = np.array([p[1] for p in points])
    return round(float(np.polyfit(t, rss, 1)[0]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds per phase")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--clients", default="triton,llmopt,perf_analyzer")
    parser.add_argument("--models", default="encoder,decoder")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "soak")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    clients = args.clients.split(",")
    models = [{"encoder": ENCODER, "decoder": DECODER}[m] for m in args.models.split(",")]

    repo = build_packages(args.work_dir, models)
    server = launch_server(["--model-repository", str(repo), "--port", "0", "--no-metrics"])
    address = str(server.address)
    sampler = Sampler(server.pid, args.sample).start()
    phases: list[dict[str, Any]] = []
    try:
        for model in models:
            for client in clients:
                for workers in levels:
                    label = f"{model} {client} x{workers}"
                    sampler.phase = label
                    if client == "perf_analyzer":
                        result = perf_analyzer(address, workers, args.duration) \
                            if model == ENCODER else None
                        if result is None:
                            continue
                    else:
                        make = {"triton": triton_call, "llmopt": llmopt_call}[client](
                            address, model)
                        result = closed_loop(workers, args.duration, make)
                    phases.append({"model": model, "client": client, "concurrency": workers,
                                   **result})
                    print(f"{label}: {result['errors']} errors, "
                          f"{result['requests_per_s']} req/s, p50 {result['p50_ms']} ms, "
                          f"p99 {result['p99_ms']} ms", flush=True)
        sampler.phase = "idle"
        time.sleep(args.sample)
    finally:
        sampler.stop()
        server.close(60)
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "duration_s": args.duration, "perf_analyzer": bool(os.environ.get("PERF_ANALYZER")),
        "phases": phases, "samples": sampler.samples,
        "rss_slope_mb_per_min_after_warmup": slopes_after_warmup(sampler.samples, models),
        "start": sampler.samples[0], "end": sampler.samples[-1],
        "errors": sum(p["errors"] for p in phases),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out}.{{json,md}}: {report['errors']} errors in all")


def markdown(report: dict[str, Any]) -> str:
    start, end = report["start"], report["end"]
    rss = [s["rss_mb"] for s in report["samples"]]
    lines = [
        "# Soak: `llmopt serve` under real clients", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']}; {report['duration_s']:.0f} s per phase; clients set "
        "no deadline.", "",
        "| model | client | concurrency | ok requests | errors | req/s | tokens/s | p50 ms | "
        "p99 ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report["phases"]:
        lines.append(f"| {p['model']} | {p['client']} | {p['concurrency']} | "
                     f"{p['requests'] if p['requests'] is not None else '-'} | {p['errors']} | "
                     f"{p['requests_per_s']} | {p['tokens_per_s'] or '-'} | {p['p50_ms']} | "
                     f"{p['p99_ms']} |")
    lines += [
        "", f"Errors in all: **{report['errors']}**.", "",
        f"Server RSS: {start['rss_mb']} MB at start, {end['rss_mb']} MB at the end, "
        f"{max(rss)} MB at most ({len(rss)} samples). Slope after warm-up (each model's "
        "phases after its first one), MB/min: " + ", ".join(
            f"{k} {v}" for k, v in report["rss_slope_mb_per_min_after_warmup"].items()) + ".",
        f"Threads: {start['threads']} at start, {end['threads']} at the end. "
        f"Open fds: {start['fds']} at start, {end['fds']} at the end.",
    ]
    errors = [f"- {p['model']} {p['client']} x{p['concurrency']}: {k}"
              for p in report["phases"] for k in p["error_kinds"]]
    if errors:
        lines += ["", "Errors seen:", "", *errors]
    if not report["perf_analyzer"]:
        lines += ["", "perf_analyzer was not installed for this run (see the script's "
                  "docstring for how)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
