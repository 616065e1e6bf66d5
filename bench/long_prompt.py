"""A long prompt arriving while streams generate: its TTFT, the running streams' worst gap
between two tokens while it is prefilled, and the process RSS warm / right after / idle.

    python bench/long_prompt.py --package DIR [--prompt-tokens 4000] [--streams 2]
        [--runs 0:on,256:on,256:off]

Each run (``CHUNK:ARENA``: ``prefill_chunk``, 0 = whole prompt in one pass; ONNX Runtime's CPU
arena on or off) is its own process over the in-process continuous-batching engine (the server
adds only gRPC to it): load the package, warm up with three short requests (RSS "warm"), start
``--streams`` greedy streams, send one ``--prompt-tokens`` prompt (README text) and record its
TTFT and every delta time of the streams; the streams are cancelled a few tokens after the long
prompt's first token (RSS "after"), then the process idles 2 s (RSS "idle"). Writes
bench/results/long_prompt.{json,md}. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHORT = "Write a long story about a lighthouse keeper and the sea."


def one_run(package: str, chunk: int, arena: bool, prompt_tokens: int, streams: int) -> dict:
    import llmopt
    from llmopt.runtime.engine import Engine, EngineConfig
    from llmopt.runtime.memory import resident_mb
    from llmopt.runtime.providers import CPUOptions
    from llmopt.runtime.sampling import SamplingParams

    generator = llmopt.load(package, ["cpu"], provider_options={"cpu": CPUOptions(arena=arena)})
    engine = Engine(generator, EngineConfig(prefill_chunk=chunk, prefix_cache_bytes=0)).start()
    short = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for _ in range(3):
        engine.submit(SHORT, short).result(120)
    warm = resident_mb()
    ids = generator.encode((ROOT / "README.md").read_text() * 20)[:prompt_tokens]
    running = [engine.submit(SHORT, SamplingParams(max_new_tokens=2000, ignore_eos=True))
               for _ in range(streams)]
    times: list[list[float]] = [[] for _ in running]

    def read(i: int) -> None:
        for _ in running[i]:
            times[i].append(time.monotonic())

    readers = [threading.Thread(target=read, args=(i,)) for i in range(streams)]
    for reader in readers:
        reader.start()
    while any(len(t) < 3 for t in times):  # every stream is decoding
        time.sleep(0.01)
    sent = time.monotonic()
    long = engine.submit(ids, SamplingParams(max_new_tokens=4, ignore_eos=True))
    result = long.result(1800)
    first = sent + result.stats.ttft_s
    time.sleep(1.0)  # a few more tokens of the streams after the long prompt joined
    for request in running:
        request.cancel()
    for reader in readers:
        reader.join(60)
    after = resident_mb()
    time.sleep(2.0)
    idle = resident_mb()
    gaps = [b - a for t in times for a, b in itertools.pairwise(t) if b > sent and a < first]
    engine.close()
    return {"prefill_chunk": chunk, "arena": arena, "prompt_tokens": len(ids),
            "streams": streams, "ttft_s": round(result.stats.ttft_s, 2),
            "worst_gap_s": round(max(gaps), 3) if gaps else None,
            "rss_warm_mb": round(warm), "rss_after_mb": round(after), "rss_idle_mb": round(idle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, help="a SmolLM2 package (e.g. int4)")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--runs", default="0:on,256:on,256:off",
                        help="CHUNK:ARENA pairs (chunk 0: off; arena on/off)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # CHUNK:ARENA, in a child process
    args = parser.parse_args()
    if args.one:
        chunk, arena = args.one.split(":")
        print(json.dumps(one_run(args.package, int(chunk), arena == "on", args.prompt_tokens,
                                 args.streams)))
        return
    rows = []
    for run in args.runs.split(","):
        out = subprocess.run([sys.executable, __file__, "--package", args.package,
                              "--prompt-tokens", str(args.prompt_tokens), "--streams",
                              str(args.streams), "--one", run],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    command = "python bench/long_prompt.py " + shlex.join(sys.argv[1:])
    meta = {"command": command, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs", "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "long_prompt.json").write_text(json.dumps({**meta, "runs": rows}, indent=2) + "\n")
    lines = [f"`{command}` ({meta['date']}, {meta['machine']}, load average after the runs "
             f"{', '.join(f'{v:.1f}' for v in meta['load_average'])})", "",
             "| prefill_chunk | CPU arena | prompt tokens | TTFT s | worst stream gap s "
             "| RSS warm MB | RSS after MB | RSS idle MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prefill_chunk'] or 'off'} | {'on' if r['arena'] else 'off'} | "
                     f"{r['prompt_tokens']} | {r['ttft_s']} | {r['worst_gap_s']} | "
                     f"{r['rss_warm_mb']} | {r['rss_after_mb']} | {r['rss_idle_mb']} |")
    (RESULTS / "long_prompt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
