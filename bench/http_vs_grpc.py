"""Aggregate generation speed of N concurrent streams over HTTP (OpenAI chat) vs gRPC (llmopt).

    python bench/http_vs_grpc.py [--package DIR] [--streams 8] [--duration 20] [--rounds 3]

Starts one `llmopt serve` process (gRPC and HTTP on free ports) over a one-model repository
(SmolLM2-135M-Instruct, exported once into --work-dir unless --package), then runs
interleaved rounds of: --streams llmopt.Client streams over gRPC for --duration seconds, and
--streams `openai` SDK streams over HTTP (stream=True, include_usage) for as long, the first
door alternating from round to round. Every request
is a chat prompt with a fixed number of new tokens (EOS ignored: `ignore_eos`, an extension the
HTTP door shares with vLLM). Aggregate tokens/s = generated tokens / wall time. Writes
bench/results/http.{json,md}. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from llmopt.bench.prompts import CHAT_QUESTIONS as QUESTIONS
from llmopt.bench.targets.server_process import launch_server

Request = Callable[[str], tuple[int, float]]  # prompt -> (generated tokens, TTFT seconds)
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2"


def ensure_package(package: Path | None, work_dir: Path) -> Path:
    """The SmolLM2 package to serve: --package, or an fp32 export made once in work_dir."""
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


def grpc_request(address: str, new_tokens: int) -> Callable[[], Request]:
    import llmopt

    def make() -> Request:
        client = llmopt.Client(address, timeout=600)

        def request(prompt: str) -> tuple[int, float]:
            result = client.chat(MODEL, prompt, max_new_tokens=new_tokens, ignore_eos=True)
            return result.stats.generated_tokens, result.stats.ttft_s

        return request

    return make


def http_request(url: str, new_tokens: int) -> Callable[[], Request]:
    import openai

    def make() -> Request:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=600)

        def request(prompt: str) -> tuple[int, float]:
            started, first = time.perf_counter(), 0.0
            tokens = 0
            for chunk in client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompt}],
                    max_tokens=new_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                if not first and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return tokens, first

        return request

    return make


def measure(make: Callable[[], Request], streams: int, duration: float) -> dict[str, float]:
    tokens: list[int] = []
    ttfts: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        request = make()
        turn = index
        barrier.wait()
        while time.monotonic() < stop_at[0]:
            try:
                count, ttft = request(QUESTIONS[turn % len(QUESTIONS)])
            except Exception as exc:  # noqa: BLE001 - counted as an error, the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                tokens.append(count)
                ttfts.append(ttft)
            turn += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + duration
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"streams": streams, "requests": len(tokens), "errors": len(errors),
            "generated_tokens": sum(tokens), "wall_s": wall,
            "aggregate_tokens_per_s": sum(tokens) / wall,
            "mean_ttft_s": statistics.fmean(ttfts) if ttfts else 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", type=Path, help="SmolLM2 package (default: export one)")
    p.add_argument("--work-dir", type=Path,
                   default=Path.home() / ".cache" / "llmopt" / "bench-packages")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS / "http")
    args = p.parse_args()

    package = ensure_package(args.package, args.work_dir)
    repo = Path(tempfile.mkdtemp(prefix="llmopt-http-bench-"))
    (repo / MODEL).symlink_to(package.resolve(), target_is_directory=True)
    load_before = os.getloadavg()
    server = launch_server(["--model-repository", str(repo), "--port", "0", "--http-port", "0",
                            "--no-metrics"])
    address, url = str(server.address), str(server.http_url)
    doors = {"grpc": grpc_request(address, args.max_new_tokens),
             "http": http_request(url, args.max_new_tokens)}
    runs: list[dict] = []
    try:
        for make in doors.values():
            measure(make, args.streams, 3.0)  # warm-up: sessions, threads, connections
        for round_ in range(args.rounds):
            order = list(doors.items())  # alternate which door goes first, against drift
            for door, make in order if round_ % 2 == 0 else order[::-1]:
                run = {"door": door, "round": round_,
                       **measure(make, args.streams, args.duration),
                       "load_average_1m": os.getloadavg()[0]}
                runs.append(run)
                print(f"round {round_}: {door}: {run['aggregate_tokens_per_s']:.1f} tokens/s, "
                      f"{run['requests']} requests, {run['errors']} errors, "
                      f"load {run['load_average_1m']:.1f}", flush=True)
    finally:
        server.close(60)
    report = summarize(args, package, runs, load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"HTTP / gRPC: {report['ratio']:.3f} (wrote {args.out.with_suffix('.md')})")
    return 0


def summarize(args: argparse.Namespace, package: Path, runs: list[dict],
              load_before: tuple[float, float, float]) -> dict:
    def median(door: str) -> float:
        return statistics.median(r["aggregate_tokens_per_s"] for r in runs if r["door"] == door)

    grpc, http = median("grpc"), median("http")
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    return {"command": "python " + shlex.join(argv),
            "model": "SmolLM2-135M-Instruct (fp32 export of the Q4_1 GGUF), CPU provider",
            "package": str(package), "new_tokens_per_request": args.max_new_tokens,
            "duration_s": args.duration, "rounds": args.rounds, "streams": args.streams,
            "grpc_tokens_per_s": grpc, "http_tokens_per_s": http,
            "ratio": http / grpc if grpc else 0.0,
            "errors": sum(int(r["errors"]) for r in runs), "runs": runs,
            "machine": {"cpus": os.cpu_count(), "load_average_before": list(load_before),
                        "load_average_after": list(os.getloadavg())},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def markdown(report: dict) -> str:
    lines = [
        f"# {report['streams']} streams over HTTP (OpenAI chat) vs gRPC (llmopt.v1)", "",
        f"Command: `{report['command']}`", "",
        f"{report['model']}; chat prompts, {report['new_tokens_per_request']} new tokens per "
        f"request (EOS ignored); {report['rounds']} interleaved rounds of "
        f"{report['duration_s']:.0f} s per door (which goes first alternates), one server process; "
        "the median round counts. "
        f"{report['machine']['cpus']} CPUs; load average before "
        f"{report['machine']['load_average_before'][0]:.1f}, after "
        f"{report['machine']['load_average_after'][0]:.1f} (the machine is shared: other "
        "work ran during the measurement, so compare the doors, not these numbers with other "
        "files).", "",
        "| round | door | requests | errors | aggregate tokens/s | mean TTFT (s) | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['round']} | {r['door']} | {r['requests']} | {r['errors']} | "
                     f"{r['aggregate_tokens_per_s']:.1f} | {r['mean_ttft_s']:.2f} | "
                     f"{r['load_average_1m']:.1f} |")
    lines += ["", f"**HTTP {report['http_tokens_per_s']:.1f} tokens/s vs gRPC "
              f"{report['grpc_tokens_per_s']:.1f} tokens/s = {report['ratio']:.2f}x** "
              "(target: within 10%, i.e. >= 0.90x).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
