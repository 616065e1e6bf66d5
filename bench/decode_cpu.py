"""Batch-1 speed on CPU: llmopt packages (fp32, fused, int8, int4...) vs transformers eager
PyTorch, and optionally ONNX Runtime GenAI, in one run.

    python bench/decode_cpu.py --package fp32=PKG [--package int4=PKG ...] [--genai]

Same model, same machine, same prompt (~100 tokens) and 128 new tokens (EOS ignored), all
runtimes interleaved per repetition so machine drift hits them alike. The first --package is
the baseline for the speedup column. --genai runs bench/reference_genai.py (its own venv)
right after, on the same prompt. Writes JSON and Markdown under bench/results/.
Prefill tokens/s = prompt tokens / time to first token; decode tokens/s = tokens after the
first / time after the first.
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

PROMPT = (
    "The history of computing is a story of people trying to make machines that think faster "
    "than they do. In the nineteenth century Charles Babbage designed the Analytical Engine, a "
    "mechanical computer that was never completed, and Ada Lovelace wrote what many consider "
    "the first program for it. A century later, Alan Turing described a universal machine, and "
    "during the war engineers built electronic computers to break codes and compute firing "
    "tables. Transistors replaced vacuum tubes, integrated circuits replaced transistors, and "
    "today a phone holds more computing power than all of those machines together. Explain"
)


def torch_run(model, ids, new_tokens: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import torch

    times: list[float] = []

    class Clock:
        def put(self, value) -> None:  # type: ignore[no-untyped-def]
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=Clock(),
                       pad_token_id=0)
    end = time.perf_counter()
    first = times[1]  # times[0] is the prompt itself
    return {"ttft_s": first - start, "prefill_tokens_per_s": ids.shape[1] / (first - start),
            "decode_tokens_per_s": (new_tokens - 1) / (end - first)}


def llmopt_run(generator, ids: list[int], new_tokens: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    result = generator.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)
    assert result.stats.generated_tokens == new_tokens, result.stats
    return {"ttft_s": result.stats.ttft_s,
            "prefill_tokens_per_s": len(ids) / result.stats.ttft_s,
            "decode_tokens_per_s": result.stats.decode_tokens_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", action="append", required=True, metavar="NAME=DIR",
                        help="a package to measure (repeatable); the first is the baseline")
    parser.add_argument("--source", help="model for PyTorch (default: the first package's)")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genai", action="store_true",
                        help="add ONNX Runtime GenAI fp32/int4 (bench/reference_genai.py)")
    parser.add_argument("--out", default="bench/results/decode_cpu")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import llmopt
    from llmopt.package import Package, tool_versions

    torch.set_num_threads(args.threads)
    variants = dict(item.split("=", 1) for item in args.package)
    packages = {name: Package.open(path) for name, path in variants.items()}
    first = next(iter(packages.values()))
    source = first.manifest["source"]
    if args.source:
        model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32)
    elif source.get("gguf_file"):
        gguf = Path(source["reference"])
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(source["reference"], dtype=torch.float32)
    model.eval()
    options = {"cpu": {"intra_op_threads": args.threads}}
    generators = {name: llmopt.load(pkg, ["cpu"], provider_options=options)
                  for name, pkg in packages.items()}
    tokenizer = next(iter(generators.values())).tokenizer
    ids = tokenizer(PROMPT)["input_ids"][: args.prompt_tokens]
    torch_ids = torch.tensor([ids])
    load_start = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {"pytorch_eager": []}
    runs.update({name: [] for name in generators})
    torch_run(model, torch_ids, 8)  # warm-up
    for generator in generators.values():
        llmopt_run(generator, ids, 8)
    for _ in range(args.repeats):
        runs["pytorch_eager"].append(torch_run(model, torch_ids, args.new_tokens))
        for name, generator in generators.items():
            runs[name].append(llmopt_run(generator, ids, args.new_tokens))
    summary = {
        name: {key: statistics.median(r[key] for r in values) for key in values[0]}
        for name, values in runs.items()
    }
    genai = None
    if args.genai:
        del generators, model
        out = Path(args.out).with_name("reference_genai.json")
        subprocess.run([sys.executable, "bench/reference_genai.py", "--skip-build",
                        "--repeats", str(args.repeats), "--threads", str(args.threads),
                        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
                        str(args.new_tokens), "--out", str(out)], check=True)
        genai = json.loads(out.read_text())
        for precision, values in genai.get("median", {}).items():
            summary[f"onnxruntime_genai_{precision}"] = {
                "ttft_s": values.get("ttft_s", 0.0),
                "prefill_tokens_per_s": values.get("prefill_tokens_per_s", 0.0),
                "decode_tokens_per_s": values.get("decode_tokens_per_s", 0.0)}
    baseline = summary[next(iter(variants))]["decode_tokens_per_s"]
    record = {
        "benchmark": "decode_cpu",
        "command": "python bench/decode_cpu.py " + " ".join(
            [f"--package {p}" for p in args.package]
            + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if v is not None and k not in ("package", "genai")]
            + (["--genai"] if args.genai else [])),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": _cpu_name(), "cores": _cores(), "python": platform.python_version(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "versions": tool_versions(),
        "packages": {name: str(pkg.path) for name, pkg in packages.items()},
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "runs": runs,
        "median": summary,
        "baseline": next(iter(variants)),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Batch-1 speed on CPU ({record['machine']['cpu']}, {args.threads} threads)",
        "",
        f"Prompt {len(ids)} tokens, {args.new_tokens} new tokens, greedy, median of "
        f"{args.repeats} interleaved runs; load average {load_start[0]:.2f} at the start. "
        f"Command: `{record['command']}`",
        "",
        f"| runtime | TTFT (ms) | prefill tokens/s | decode tokens/s | decode vs "
        f"{record['baseline']} |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in summary.items():
        lines.append(f"| {name} | {values['ttft_s'] * 1000:.0f} | "
                     f"{values['prefill_tokens_per_s']:.0f} | "
                     f"{values['decode_tokens_per_s']:.1f} | "
                     f"{values['decode_tokens_per_s'] / baseline:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
