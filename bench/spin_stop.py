"""Threads that stop spinning when a run ends (CPUOptions.stop_spinning): what a second model
and decoding itself see.

    python bench/spin_stop.py --decoder build/bench/smollm2-int4-fused \\
        --encoder build/bench/minilm-fp32 [--rounds 15] [--threads 2]

ONNX Runtime's intra-op threads busy-wait after a run. In one process with two sessions (two
served models, or an int4 package's prompt session beside its decode session) the next run of
the other session shares the cores with them. For each setting this loads the decoder and the
encoder in one process and, per round: embeds one 128-token text after an idle pause (alone),
generates 16 tokens with the decoder, and embeds the text again right after (after a decode);
decode tokens/s of the generation too. Settings: spinning as ONNX Runtime defaults (stop off),
stop on (the default), no spinning at all. Writes bench/results/spin_stop.md and .json. Not a
test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"spinning, stop off": {"stop_spinning": False},
            "spinning, stop on (default)": {},
            "no spinning": {"spin": False}}


def main() -> None:
    import llmopt
    from llmopt.runtime.providers import CPUOptions
    from llmopt.runtime.sampling import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decoder", type=Path, required=True)
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="spin_stop")
    args = parser.parse_args()

    text = ["The quick brown fox jumps over the lazy dog. " * 12]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    rows = []
    load = os.getloadavg()
    for name, fields in SETTINGS.items():
        options = {"cpu": CPUOptions(intra_op_threads=args.threads, float_prompts=False,
                                     **fields)}
        decoder = llmopt.load(args.decoder, provider_options=options)
        encoder = llmopt.load(args.encoder, provider_options=options)
        for _ in range(3):
            encoder.embed(text)
            decoder.generate("Hello there", params)
        alone, after, decode = [], [], []
        for _ in range(args.rounds):
            time.sleep(0.3)
            started = time.perf_counter()
            encoder.embed(text)
            alone.append(time.perf_counter() - started)
            result = decoder.generate("Tell me a story about a cat.", params)
            decode.append(result.stats.decode_tokens_per_s)
            started = time.perf_counter()
            encoder.embed(text)
            after.append(time.perf_counter() - started)
        rows.append({"setting": name, "embed_alone_ms": round(float(np.median(alone)) * 1e3, 1),
                     "embed_after_decode_ms": round(float(np.median(after)) * 1e3, 1),
                     "decode_tokens_per_s": round(float(np.median(decode)), 1)})
        del decoder, encoder
    command = "python bench/spin_stop.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items())
    report = {"command": command, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_at_start": load,
              "rounds": args.rounds, "threads": args.threads, "rows": rows}
    out = ROOT / "bench" / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {__doc__.splitlines()[0]}", "", f"Command: `{command}`", "",
             f"{args.threads} threads, medians of {args.rounds} rounds, settings one after "
             f"another; load average at start {[round(x, 2) for x in load]}.", "",
             "| setting | embed alone ms | embed right after a decode ms | decode tokens/s |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['embed_alone_ms']} | {r['embed_after_decode_ms']} | "
              f"{r['decode_tokens_per_s']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
