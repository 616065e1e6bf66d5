"""What a decode step costs beside its graph run: binding on cold caches, and the Generator's
tokens/s against the bare loop and against an earlier revision.

    python bench/step_overhead.py [--package int4=build/bench/smollm2-int4-fused ...] \\
        [--against REV] [--rounds 12] [--max-new-tokens 128] [--out step_overhead]

A batch-1 decode step streams every weight through the CPU's caches (SmolLM2 int4: about
100 MB against a 32 MB L3), so the Python and ONNX Runtime work between two runs starts on
cold memory. Part 1 times the operations a step may do between runs (binding an input by
array or by pointer, binding the logits output, writing into an array already bound, the
greedy argmax), warm (repeated back to back) and cold (each right after reading 64 MB), on
the first package's session: medians of 200. Part 2 decodes --max-new-tokens greedy tokens of
one chat prompt per package, in interleaved rounds (the order alternates): the Generator as it
is; with --against, the Generator and DecoderModel of that git revision (their two modules read
from git, on a second load of the same package); and the bare loop, the floor (inputs bound
once, the token and position written in place, a view of one mask array bound, the argmax).
Reports decode tokens/s, each against the first, how many rounds it won, and the median time
between two runs. Writes bench/results/<out>.json and .md. Not a test: nothing here asserts a
speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import script_report  # this folder's: packages and provenance shared by its result scripts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPT = "Tell me a long story about a robot who learns to paint."
STREAM_BYTES = 64 << 20  # read before each cold sample: twice this machine's L3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", action="append", metavar="LABEL=DIR",
                        help="a decoder package (repeatable; default: SmolLM2 int4, int8, "
                        "fused as configs/vs_genai.yaml builds them)")
    parser.add_argument("--against", metavar="REV",
                        help="also decode with the Generator and DecoderModel of this revision")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="step_overhead")
    args = parser.parse_args()
    packages = script_report.packages(args.package, ("int4", "int8", "fused"))
    load_before = os.getloadavg()

    import llmopt
    from llmopt.runtime.providers import CPUOptions

    options = {"cpu": CPUOptions(intra_op_threads=args.threads)}
    operations: list[dict[str, Any]] = []
    decode: dict[str, list[dict[str, Any]]] = {}
    for label, path in packages.items():
        runners = {"Generator": llmopt.load(path, provider_options=options)}
        if args.against:
            runners[f"Generator at {args.against}"] = _at_revision(
                llmopt.load(path, provider_options=options), args.against)
        if not operations:
            operations = _operations(runners["Generator"])
        decode[label] = _decode(runners, args.rounds, args.max_new_tokens)
        print(label, decode[label], flush=True)
        del runners

    report = {**script_report.provenance(load_before), "threads": args.threads,
              "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
              "against": args.against, "packages": packages, "operations": operations,
              "decode": decode}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


# -- part 1: the operations between two runs ------------------------------------------------------

def _operations(runner: Any) -> list[dict[str, Any]]:
    model = runner.model
    cache = model.cache(1, 512, runner.placement)
    binding = cache.binding(False, model.session)
    vocab = model._vocab
    token = np.zeros((1, 1), np.int64)
    logits = np.random.default_rng(0).standard_normal((1, 1, vocab)).astype(np.float32)
    stream = np.ones(STREAM_BYTES, np.uint8)
    cases: dict[str, Callable[[], Any]] = {
        "bind_cpu_input, a new [1, 1] array": lambda: binding.bind_cpu_input(
            "input_ids", np.zeros((1, 1), np.int64)),
        "bind_input by pointer": lambda: binding.bind_input(
            "input_ids", "cpu", 0, np.int64, [1, 1], token.ctypes.data),
        "bind_output of a new logits array by pointer": lambda: binding.bind_output(
            "logits", "cpu", 0, np.float32, [1, 1, vocab],
            np.empty((1, 1, vocab), np.float32).ctypes.data),
        "np.copyto into a bound [1, 1] array": lambda: np.copyto(token, 7),
        f"argmax over {vocab} logits": lambda: int(logits.argmax()),
    }
    rows = []
    for name, operation in cases.items():
        warm, cold = [], []
        for _ in range(200):
            started = time.perf_counter()
            operation()
            warm.append(time.perf_counter() - started)
        for _ in range(200):
            stream.sum()
            started = time.perf_counter()
            operation()
            cold.append(time.perf_counter() - started)
        rows.append({"operation": name, "warm_us": round(statistics.median(warm) * 1e6, 1),
                     "cold_us": round(statistics.median(cold) * 1e6, 1)})
    return rows


# -- part 2: decoding ----------------------------------------------------------------------------

class _RunTimes:
    """Wraps a session's run_with_iobinding to record when each run starts and ends."""

    def __init__(self, session: Any) -> None:
        self.marks: list[tuple[float, float]] = []
        run = session.run_with_iobinding

        def timed(binding: Any, *rest: Any) -> Any:
            started = time.perf_counter()
            out = run(binding, *rest)
            self.marks.append((started, time.perf_counter()))
            return out

        session.run_with_iobinding = timed

    def gap_us(self) -> float:
        """Median time between the end of a decode run and the start of the next."""
        m = self.marks[1:]  # after the prefill
        return statistics.median(b[0] - a[1] for a, b in itertools.pairwise(m)) * 1e6


def _decode(runners: dict[str, Any], rounds: int, new_tokens: int) -> list[dict[str, Any]]:
    import llmopt

    first = next(iter(runners.values()))
    text = first.render_chat([{"role": "user", "content": PROMPT}])
    params = llmopt.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    clocks = {name: _RunTimes(r.model.session) for name, r in runners.items()}

    def generator(name: str) -> Callable[[], tuple[float, list[int]]]:
        def run() -> tuple[float, list[int]]:
            result = runners[name].generate(text, params)
            return result.stats.decode_tokens_per_s, result.token_ids
        return run

    ways = {name: generator(name) for name in runners}
    ways["bare loop"] = lambda: _bare_loop(first, first.encode(text), new_tokens)
    clocks["bare loop"] = clocks[next(iter(runners))]
    answers = {name: way()[1] for name, way in ways.items()}  # warm-up, and the tokens
    speeds: dict[str, list[float]] = {name: [] for name in ways}
    gaps: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            time.sleep(0.1)
            clocks[name].marks.clear()
            speeds[name].append(ways[name]()[0])
            gaps[name].append(clocks[name].gap_us())
    base = speeds[next(iter(ways))]
    reference = answers[next(iter(ways))]
    return [{"way": name, "decode_tokens_per_s": round(statistics.median(s), 1),
             "x_first": round(statistics.median(s) / statistics.median(base), 3),
             "faster_rounds": sum(a > b for a, b in zip(s, base, strict=True)),
             "gap_us": round(statistics.median(gaps[name]), 1),
             "same_tokens": answers[name] == reference}
            for name, s in speeds.items()]


def _bare_loop(runner: Any, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Greedy decoding with nothing between two runs but the argmax and two writes: every input
    bound once, the mask a view of one array of ones."""
    from llmopt.runtime.kv import left_pad, position_ids

    model = runner.model
    ids, mask = left_pad([prompt])
    capacity = len(prompt) + new_tokens + 1
    cache = model.cache(1, capacity, runner.placement)
    logits = model.step(ids, mask, position_ids(mask), cache)
    binding = cache.binding(False, model.session)
    token, position = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
    ones = np.ones((1, capacity), np.int64)
    out = np.empty((1, 1, logits.shape[-1]), np.float32)
    binding.bind_cpu_input("input_ids", token)
    binding.bind_cpu_input("position_ids", position)
    if model.keeps_logits:
        binding.bind_cpu_input("logits_to_keep", np.array(1, np.int64))
    binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    tokens = [int(logits[0, -1].argmax())]
    started = time.perf_counter()
    for i in range(new_tokens - 1):
        token[0, 0], position[0, 0] = tokens[-1], len(prompt) + i
        binding.bind_cpu_input("attention_mask", ones[:, :len(prompt) + i + 1])
        model.session.run_with_iobinding(binding)
        tokens.append(int(out[0, 0].argmax()))
    return (new_tokens - 1) / (time.perf_counter() - started), tokens


def _at_revision(runner: Any, revision: str) -> Any:
    """``runner`` with the Generator and DecoderModel classes of ``revision``: both modules are
    read from git and imported under private names (their own imports are today's)."""
    classes = {}
    for module, name in (("kv", "DecoderModel"), ("generator", "Generator")):
        source = subprocess.run(["git", "show", f"{revision}:llmopt/runtime/{module}.py"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
        spec = importlib.util.spec_from_loader(f"_at_{revision}_{module}", loader=None)
        assert spec is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        exec(compile(source, f"{revision}:{module}.py", "exec"), loaded.__dict__)
        classes[name] = getattr(loaded, name)
    runner.model.__class__ = classes["DecoderModel"]
    runner.__class__ = classes["Generator"]
    return runner


# -- report ---------------------------------------------------------------------------------------

def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# {__doc__.splitlines()[0]}", "", f"Command: `{report['command']}`", "",
             f"{report['threads']} threads; {script_report.machine_text(report)}", "",
             "## Between two runs", "",
             "Medians of 200: warm (back to back) and cold (each right after reading "
             f"{STREAM_BYTES >> 20} MB, as a decode step's weights leave the caches).", "",
             "| operation | warm us | cold us |", "|---|---:|---:|"]
    lines += [f"| {r['operation']} | {r['warm_us']} | {r['cold_us']} |"
              for r in report["operations"]]
    lines += ["", "## Decoding", "",
              f"Greedy, batch 1, {report['max_new_tokens']} new tokens, {report['rounds']} "
              "interleaved rounds; decode tokens/s (medians), against the first row, rounds "
              "faster than it, median time between the end of a run and the start of the next, "
              "and whether the tokens equal the first row's.", ""]
    for label, rows in report["decode"].items():
        lines += [f"### {label} (`{report['packages'][label]}`)", "",
                  "| decoding | tokens/s | x | faster rounds | between runs us | same tokens |",
                  "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {r['way']} | {r['decode_tokens_per_s']} | {r['x_first']} | "
                  f"{r['faster_rounds']}/{report['rounds']} | {r['gap_us']} | "
                  f"{'yes' if r['same_tokens'] else 'no'} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
