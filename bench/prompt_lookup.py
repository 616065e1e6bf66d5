"""Prompt-lookup decoding (`SamplingParams(prompt_lookup=K)`) against plain decoding, in-process.

    python bench/prompt_lookup.py [--package int4=build/bench/smollm2-int4-fused ...] \\
        [--draft 4] [--rounds 3] [--max-new-tokens 128] [--out NAME]

For each package and two chat workloads, greedy, batch 1: *edit* (the answer restates a given
paragraph: fix its spelling, keep the rest) and *questions* (short open questions, where little
of the answer is in the prompt). Every prompt runs with the drafts and without, in interleaved
rounds (which goes first alternates); reports decode tokens/s (the answer's tokens after the
first over the time after the first), the share of tokens that came from confirmed drafts, and
whether every answer with drafts equals the plain one. Writes bench/results/<out>.json and .md.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import script_report  # this folder's: packages and provenance shared by its result scripts

from llmopt.bench.prompts import CHAT_QUESTIONS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PARAGRAPHS = (
    "Our shop opens at nine in the moring and closes at five in the evning. We repair evry "
    "kind of bicycle, from old city bikes to new mountain bikes, and we sell helmets, lights "
    "and locks.",
    "The library will be closed on monday for cleaning. Books that are due on that day can be "
    "returned on tuesday without any fee. The reading room on the second flor stays open.",
    "To make tea, boil fresh water and pour it over the leaves. Let it steep for three minuts, "
    "then remove the leaves so the tea does not become bitter. Add milk or lemon if you like.",
    "The train to the coast leaves every hour from platform four. Tickets can be bought at the "
    "machines in the main hall or from the conducter on the train, who only accepts cards.",
)
WORKLOADS = {
    "edit": [f"Fix the spelling mistakes in this text and write it out in full:\n\n{p}"
             for p in PARAGRAPHS],
    "questions": list(CHAT_QUESTIONS[:4]),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", action="append", metavar="LABEL=DIR",
                   help="a package (repeatable; default: fused, int8 and int4 SmolLM2 as "
                   "vs_genai.yaml builds them)")
    p.add_argument("--draft", type=int, default=4, help="draft tokens per step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="prompt_lookup")
    args = p.parse_args()
    packages = script_report.packages(args.package, ("fused", "int8", "int4"))
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for label, path in packages.items():
        runs += run_package(label, Path(path), args)
    report = summarize(args, packages, runs, load_before)
    out = RESULTS / args.out
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


def run_package(label: str, package: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import llmopt
    from llmopt.runtime.providers import CPUOptions
    from llmopt.runtime.sampling import SamplingParams

    generator: Any = llmopt.load(package, ["cpu"], provider_options={
        "cpu": CPUOptions(intra_op_threads=args.threads)})
    generator.prefix_cache_bytes = 0  # every run prefills its whole prompt
    settings = {"plain": SamplingParams(max_new_tokens=args.max_new_tokens),
                "lookup": SamplingParams(max_new_tokens=args.max_new_tokens,
                                         prompt_lookup=args.draft)}
    generator.chat("Hello!", settings["lookup"])  # warm-up: sessions, shapes
    runs = []
    for round_ in range(args.rounds):
        order = list(settings.items())
        for setting, params in order if round_ % 2 == 0 else order[::-1]:
            for workload, prompts in WORKLOADS.items():
                for index, prompt in enumerate(prompts):
                    result = generator.chat(prompt, params)
                    stats = result.stats
                    runs.append({"package": label, "setting": setting, "workload": workload,
                                 "prompt": index, "round": round_,
                                 "tokens": stats.generated_tokens,
                                 "accepted": stats.accepted_draft_tokens,
                                 "decode_tokens_per_s": stats.decode_tokens_per_s,
                                 "ttft_s": stats.ttft_s, "answer": result.token_ids})
            print(f"{label} round {round_}: {setting} done", flush=True)
    return runs


def summarize(args: argparse.Namespace, packages: dict[str, str], runs: list[dict[str, Any]],
              load_before: tuple[float, float, float]) -> dict[str, Any]:
    table = []
    for label in packages:
        for workload in WORKLOADS:
            def of(setting: str, label: str = label, workload: str = workload
                   ) -> list[dict[str, Any]]:
                return [r for r in runs if r["package"] == label and r["workload"] == workload
                        and r["setting"] == setting]

            plain, lookup = of("plain"), of("lookup")
            key = ("round", "prompt")
            answers = {tuple(r[k] for k in key): r["answer"] for r in plain}
            equal = sum(r["answer"] == answers[tuple(r[k] for k in key)] for r in lookup)
            rate = {s: statistics.median(
                statistics.fmean(r["decode_tokens_per_s"] for r in of(s) if r["round"] == n)
                for n in range(args.rounds)) for s in ("plain", "lookup")}
            tokens = sum(r["tokens"] for r in lookup)
            table.append({"package": label, "workload": workload,
                          "plain_tokens_per_s": rate["plain"],
                          "lookup_tokens_per_s": rate["lookup"],
                          "speedup": rate["lookup"] / rate["plain"],
                          "drafted_share": sum(r["accepted"] for r in lookup) / max(tokens, 1),
                          "mean_tokens": tokens / max(len(lookup), 1),
                          "answers_equal": f"{equal}/{len(lookup)}"})
    for r in runs:
        r.pop("answer")
    return {**script_report.provenance(load_before), "packages": packages,
            "draft": args.draft, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
            "threads": args.threads, "table": table, "runs": runs}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Prompt-lookup decoding against plain decoding", "",
        f"Command: `{report['command']}`", "",
        f"SmolLM2-135M-Instruct ({', '.join(f'{k}: {v}' for k, v in report['packages'].items())})"
        f" in-process, CPU, {report['threads']} threads, batch 1, greedy chat answers of at most "
        f"{report['max_new_tokens']} tokens (EOS ends them), {report['draft']} draft tokens per "
        "step. *edit*: restate a paragraph with its spelling fixed (4 prompts); *questions*: "
        f"short open questions (4 prompts). {report['rounds']} interleaved rounds; decode "
        "tokens/s is the mean over a round's prompts, median over rounds. "
        + script_report.machine_text(report), "",
        "| package | workload | plain tok/s | prompt lookup tok/s | x plain | tokens from drafts "
        "| mean answer tokens | answers equal |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["table"]:
        lines.append(f"| {r['package']} | {r['workload']} | {r['plain_tokens_per_s']:.1f} | "
                     f"{r['lookup_tokens_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{100 * r['drafted_share']:.0f}% | {r['mean_tokens']:.0f} | "
                     f"{r['answers_equal']} |")
    lines += ["", "`answers equal`: answers with drafts identical, token for token, to the plain "
              "answers of the same round.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
