"""Prompt-lookup decoding (`SamplingParams(prompt_lookup=K)`) against plain decoding, in-process
or served.

    python bench/prompt_lookup.py [--package int4=build/bench/smollm2-int4-fused ...] \\
        [--draft 4] [--rounds 3] [--max-new-tokens 128] [--served] [--out NAME]

For each package and two chat workloads, greedy, batch 1: *edit* (the answer restates a given
paragraph: fix its spelling, keep the rest) and *questions* (short open questions, where little
of the answer is in the prompt). Every prompt runs with the drafts and without, in interleaved
rounds (which goes first alternates); reports decode tokens/s (the answer's tokens after the
first over the time after the first), the share of tokens that came from confirmed drafts, and
whether every answer with drafts equals the plain one. With --served the answers come from an
`llmopt serve` process over each package (prefix cache off: every round repeats its prompts),
streamed one at a time through llmopt's gRPC client, each with the request's own
`prompt_lookup` (a lone request drafts), and decode tokens/s is the client's: the tokens after
the first over the time from the first text delta to the end of the stream. Writes
bench/results/<out>.json and .md. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import script_report  # this folder's: packages and provenance shared by its result scripts
from script_report import MODEL

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
Chat = Callable[[str, Any], dict[str, Any]]  # a chat answer to a prompt with these params


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", action="append", metavar="LABEL=DIR",
                   help="a package (repeatable; default: fused, int8 and int4 SmolLM2 as "
                   "vs_genai.yaml builds them)")
    p.add_argument("--draft", type=int, default=4, help="draft tokens per step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--served", action="store_true",
                   help="through `llmopt serve` and its gRPC client instead of in-process")
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


@contextmanager
def in_process(package: Path, threads: int) -> Iterator[Chat]:
    """Answers by a Generator in this process (its prefix cache off: every run prefills its
    whole prompt)."""
    import llmopt
    from llmopt.runtime.providers import CPUOptions

    generator: Any = llmopt.load(package, ["cpu"], provider_options={
        "cpu": CPUOptions(intra_op_threads=threads)})
    generator.prefix_cache_bytes = 0

    def chat(prompt: str, params: Any) -> dict[str, Any]:
        result = generator.chat(prompt, params)
        stats = result.stats
        return {"tokens": stats.generated_tokens, "accepted": stats.accepted_draft_tokens,
                "decode_tokens_per_s": stats.decode_tokens_per_s, "ttft_s": stats.ttft_s,
                "answer": result.token_ids, "text": result.text}

    yield chat


@contextmanager
def served(package: Path, threads: int) -> Iterator[Chat]:
    """Answers streamed from an `llmopt serve` process through llmopt's gRPC client, timed by
    the client."""
    import llmopt

    server = script_report.launch(package, "--threads", str(threads), "--prefix-cache-mib", "0")
    client = llmopt.Client(str(server.address))

    def chat(prompt: str, params: Any) -> dict[str, Any]:
        started, first = time.perf_counter(), 0.0
        stream = client.stream(MODEL, prompt, params, chat=True)
        for _ in stream:
            first = first or time.perf_counter()
        ended = time.perf_counter()
        result = stream.result
        tokens = result.stats.generated_tokens
        return {"tokens": tokens, "accepted": result.stats.accepted_draft_tokens,
                "decode_tokens_per_s": (tokens - 1) / (ended - first) if tokens > 1 else 0.0,
                "ttft_s": first - started, "answer": result.token_ids, "text": result.text}

    try:
        yield chat
    finally:
        client.close()
        server.close(60)


def run_package(label: str, package: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from llmopt.runtime.sampling import SamplingParams

    plain = SamplingParams(max_new_tokens=args.max_new_tokens)
    settings = {"plain": plain, "lookup": replace(plain, prompt_lookup=args.draft),
                "prediction": plain}  # its prediction is the prompt's (below)
    runs = []
    with (served if args.served else in_process)(package, args.threads) as chat:
        # warm-up (sessions, shapes), and each question's answer: the prediction of a
        # regenerated answer
        earlier = {prompt: chat(prompt, plain)["text"] for prompt in WORKLOADS["questions"]}
        predictions = {**dict(zip(WORKLOADS["edit"], PARAGRAPHS, strict=True)), **earlier}
        for round_ in range(args.rounds):
            order = list(settings.items())
            for setting, params in order if round_ % 2 == 0 else order[::-1]:
                for workload, prompts in WORKLOADS.items():
                    for index, prompt in enumerate(prompts):
                        asked = replace(plain, prediction=predictions[prompt]) \
                            if setting == "prediction" else params
                        runs.append({"package": label, "setting": setting,
                                     "workload": workload, "prompt": index, "round": round_,
                                     **chat(prompt, asked)})
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

            plain, lookup, predicted = of("plain"), of("lookup"), of("prediction")
            key = ("round", "prompt")
            answers = {tuple(r[k] for k in key): r["answer"] for r in plain}
            equal = sum(r["answer"] == answers[tuple(r[k] for k in key)]
                        for r in lookup + predicted)
            rate = {s: statistics.median(
                statistics.fmean(r["decode_tokens_per_s"] for r in of(s) if r["round"] == n)
                for n in range(args.rounds)) for s in ("plain", "lookup", "prediction")}

            def share(done: list[dict[str, Any]]) -> float:
                return sum(r["accepted"] for r in done) / max(sum(r["tokens"] for r in done), 1)

            table.append({"package": label, "workload": workload,
                          "plain_tokens_per_s": rate["plain"],
                          "lookup_tokens_per_s": rate["lookup"],
                          "speedup": rate["lookup"] / rate["plain"],
                          "drafted_share": share(lookup),
                          "prediction_tokens_per_s": rate["prediction"],
                          "prediction_speedup": rate["prediction"] / rate["plain"],
                          "prediction_drafted_share": share(predicted),
                          "mean_tokens": sum(r["tokens"] for r in plain) / max(len(plain), 1),
                          "answers_equal": f"{equal}/{len(lookup) + len(predicted)}"})
    for r in runs:
        r.pop("answer")
        r.pop("text")
    return {**script_report.provenance(load_before), "packages": packages,
            "draft": args.draft, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
            "served": args.served,
            "threads": args.threads, "table": table, "runs": runs}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Prompt-lookup decoding against plain decoding", "",
        f"Command: `{report['command']}`", "",
        f"SmolLM2-135M-Instruct ({', '.join(f'{k}: {v}' for k, v in report['packages'].items())})"
        + (" served by `llmopt serve` (prefix cache off), streamed one at a time through llmopt's "
           "gRPC client (client-side decode tokens/s)" if report.get("served") else " in-process")
        + f", CPU, {report['threads']} threads, batch 1, greedy chat answers of at most "
        f"{report['max_new_tokens']} tokens (EOS ends them), {report['draft']} draft tokens per "
        "step. *edit*: restate a paragraph with its spelling fixed (4 prompts); *questions*: "
        f"short open questions (4 prompts). {report['rounds']} interleaved rounds; decode "
        "tokens/s is the mean over a round's prompts, median over rounds. "
        + script_report.machine_text(report), "",
        "| package | workload | plain tok/s | prompt lookup tok/s | x plain | tokens from drafts "
        "| prediction tok/s | x plain | tokens from drafts | mean answer tokens | answers equal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["table"]:
        predicted = (f"{r['prediction_tokens_per_s']:.1f} | {r['prediction_speedup']:.2f} | "
                     f"{100 * r['prediction_drafted_share']:.0f}%"
                     if "prediction_tokens_per_s" in r else "- | - | -")
        lines.append(f"| {r['package']} | {r['workload']} | {r['plain_tokens_per_s']:.1f} | "
                     f"{r['lookup_tokens_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{100 * r['drafted_share']:.0f}% | {predicted} | {r['mean_tokens']:.0f} | "
                     f"{r['answers_equal']} |")
    lines += ["", "*prediction*: `SamplingParams(prediction=...)` (OpenAI's Predicted Outputs, "
              "4 drafts per step from the prediction, the prompt and the answer so far): for "
              "*edit* the paragraph itself (what OpenAI suggests for an edit), for *questions* "
              "the model's own earlier answer (an answer regenerated, the best case). "
              "`answers equal`: answers with drafts (lookup and prediction) identical, token for "
              "token, to the plain answers of the same round.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
