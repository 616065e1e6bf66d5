"""Multi-turn chats through `llmopt serve`, with the prefix cache on and off.

    python bench/prefix_cache.py [--package fused=build/bench/smollm2-fused ...] \\
        [--conversations 8] [--turns 3] [--max-new-tokens 48] [--rounds 3] [--inprocess] \\
        [--out NAME]

For each package, starts two `llmopt serve` processes over it (HTTP door, `--prefix-cache-mib
128` and `--prefix-cache-mib 0`) and drives both with the `openai` SDK: --conversations chats
that share one system prompt, each of --turns turns (a distinct first question, then
follow-ups; every turn resends the whole conversation with the previous answers, as a chat
client does), streamed, greedy, --max-new-tokens per answer with EOS ignored (`ignore_eos`),
by 1 client at a time and by 8 at once (each client runs its share of the conversations one
after the other). Rounds interleave the two servers (which goes first alternates). Reports
per server and client count: aggregate generated tokens/s, mean time to first token of first
and later turns, prompt tokens and the cached share the server reported
(`usage.prompt_tokens_details.cached_tokens`); and whether every answer with the cache equals
the answer without it. Each measurement's chats open with ticket numbers no other measurement
used, so what a server can reuse is the system prompt and the chat's own earlier turns, never
a whole chat it answered before. Writes bench/results/<out>.json and .md. Not a test: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import script_report  # this folder's: packages and provenance shared by its result scripts
from script_report import MODEL

from llmopt.bench.prompts import CHAT_QUESTIONS
from llmopt.bench.targets.server_process import LaunchedServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SYSTEM = ("You are the assistant of a small bicycle shop's customer desk. Answer briefly, "
          "politely and only with what you know. The shop opens 9 to 5 on weekdays and 10 to 4 "
          "on Saturdays; it repairs every kind of bicycle and sells helmets, lights and locks.")
FOLLOW_UPS = ("Can you say that more simply?", "Give me one more example, please.",
              "Thanks! What should I remember most?")
CACHE_MIB = {"on": 128, "off": 0}
STREAMS = (1, 8)


Ask = Callable[[list[dict[str, str]]], dict[str, Any]]  # a chat turn: TTFT, tokens, answer


def conversation(index: int, ticket: int, ask: Ask, turns: int) -> list[dict[str, Any]]:
    """One chat of ``turns`` turns, each answered by ``ask``; per turn its TTFT, tokens and
    answer. Its first message carries ``ticket``, so no earlier measurement has seen the chat
    (only the system prompt)."""
    question = CHAT_QUESTIONS[index % len(CHAT_QUESTIONS)]
    messages: list[dict[str, str]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Ticket {ticket}. {question}"}]
    out = []
    for turn in range(turns):
        reply = ask(messages)
        out.append({"conversation": index, "turn": turn, **reply})
        messages += [{"role": "assistant", "content": reply["answer"]},
                     {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
    return out


def over_http(client: Any, new_tokens: int) -> Ask:
    """A turn streamed by the ``openai`` SDK ``client``, greedy, EOS ignored."""
    def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
        started, first, text, usage = time.perf_counter(), 0.0, [], None
        for chunk in client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=new_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - started
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None, "the stream ended without usage"
        details = usage.prompt_tokens_details
        return {"ttft_s": first, "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": (details.cached_tokens or 0) if details else 0,
                "generated_tokens": usage.completion_tokens, "answer": "".join(text)}

    return ask


def in_process(generator: Any, new_tokens: int) -> Ask:
    """A turn by ``generator.chat`` in this process, greedy, EOS ignored."""
    def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
        reply = generator.chat(messages, max_new_tokens=new_tokens, ignore_eos=True)
        stats = reply.stats
        return {"ttft_s": stats.ttft_s, "prompt_tokens": stats.prompt_tokens,
                "cached_tokens": stats.cached_prompt_tokens,
                "generated_tokens": stats.generated_tokens, "answer": reply.text}

    return ask


def openai_client(url: str) -> Any:
    """An ``openai`` SDK client of the server at ``url`` (HTTP door), no retries."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)


def at_once(clients: int, setup: Callable[[int], Callable[[], None]]) -> float:
    """Run ``clients`` threads, each ``setup(i)`` (its client, untimed) and then, all released
    together, what that returned; the seconds from the release until the last ends."""
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        work = setup(index)
        barrier.wait()
        work()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def measure(url: str, streams: int, conversations: int, turns: int, new_tokens: int,
            tickets: int, generator: Any = None) -> dict[str, Any]:
    """The chats, by ``streams`` clients at once (over HTTP at ``url``, or through
    ``generator`` in this process); their tickets start at ``tickets``."""
    turns_done: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(first: int) -> Callable[[], None]:
        ask = in_process(generator, new_tokens) if generator is not None else over_http(
            openai_client(url), new_tokens)

        def chats() -> None:
            for index in range(first, conversations, streams):
                done = conversation(index, tickets + index, ask, turns)
                with lock:
                    turns_done.extend(done)

        return chats

    wall = at_once(streams, client)
    tokens = sum(t["generated_tokens"] for t in turns_done)
    if len(turns_done) != conversations * turns:
        raise RuntimeError(f"{conversations * turns - len(turns_done)} turns failed")

    def mean_ttft(first_turn: bool) -> float:
        return statistics.fmean(t["ttft_s"] for t in turns_done if (t["turn"] == 0) == first_turn)

    return {"streams": streams, "wall_s": wall, "generated_tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_first_turn_s": mean_ttft(True),
            "ttft_later_turns_s": mean_ttft(False) if turns > 1 else 0.0,
            "prompt_tokens": sum(t["prompt_tokens"] for t in turns_done),
            "cached_tokens": sum(t["cached_tokens"] for t in turns_done),
            "answers": {f"{t['conversation']}/{t['turn']}": t["answer"] for t in turns_done}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", action="append", metavar="LABEL=DIR",
                   help="a package to serve (repeatable; default: fused and int4 SmolLM2 "
                   "as vs_genai.yaml builds them)")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="the servers' intra-op threads")
    p.add_argument("--inprocess", action="store_true",
                   help="also 1 client through llmopt.load's Generator in this process "
                   "(generator.prefix_cache_bytes 128 MiB vs 0)")
    p.add_argument("--out", default="prefix_cache")
    args = p.parse_args()
    packages = script_report.packages(args.package, ("fused", "int4"))
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for label, path in packages.items():
        runs += run_package(label, Path(path), args)
        if args.inprocess:
            runs += run_inprocess(label, Path(path), args)
    report = summarize(args, packages, runs, load_before)
    out = RESULTS / args.out
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


def run_package(label: str, package: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    servers: dict[str, LaunchedServer] = {}
    runs = []
    try:
        for cache, mib in CACHE_MIB.items():
            servers[cache] = script_report.launch(
                package, "--http-port", "0", "--threads", str(args.threads),
                "--prefix-cache-mib", str(mib))
        for server in servers.values():  # warm-up: sessions, connections, the first shapes
            measure(str(server.http_url), 1, 1, 1, 8, 0)
        for round_ in range(args.rounds):
            order = list(servers.items())
            for cache, server in order if round_ % 2 == 0 else order[::-1]:
                for streams in STREAMS:
                    time.sleep(1.0)  # the other server's threads go idle first
                    run = {"package": label, "cache": cache, "round": round_,
                           **measure(str(server.http_url), streams, args.conversations,
                                     args.turns, args.max_new_tokens,
                                     tickets=1000 * (round_ + 1) + 100 * streams),
                           "load_average_1m": os.getloadavg()[0]}
                    runs.append(run)
                    print(f"{label} round {round_}: cache {cache}, {streams} stream(s): "
                          f"{run['tokens_per_s']:.1f} tok/s, TTFT first "
                          f"{run['ttft_first_turn_s'] * 1000:.0f} ms, later "
                          f"{run['ttft_later_turns_s'] * 1000:.0f} ms, cached "
                          f"{run['cached_tokens']}/{run['prompt_tokens']}", flush=True)
    finally:
        for server in servers.values():
            server.close(60)
    return runs


def run_inprocess(label: str, package: Path, args: argparse.Namespace
                  ) -> list[dict[str, Any]]:
    """The chats by 1 client through a Generator in this process, its prefix cache on and off
    in alternating order (labelled ``LABEL in-process``)."""
    import llmopt
    from llmopt.runtime.providers import CPUOptions

    generator: Any = llmopt.load(package, ["cpu"], provider_options={
        "cpu": CPUOptions(intra_op_threads=args.threads)})
    conversation(0, 0, in_process(generator, 8), 1)  # warm-up
    runs = []
    for round_ in range(args.rounds):
        order = list(CACHE_MIB.items())
        for cache, mib in order if round_ % 2 == 0 else order[::-1]:
            generator.prefix_cache_bytes = mib * 2**20
            if mib:  # the system prompt is hot, as on a server that ran before
                conversation(0, 1, in_process(generator, 1), 1)
            run = {"package": f"{label} in-process", "cache": cache, "round": round_,
                   **measure("", 1, args.conversations, args.turns, args.max_new_tokens,
                             tickets=1000 * (round_ + 1) + 50, generator=generator),
                   "load_average_1m": os.getloadavg()[0]}
            runs.append(run)
            print(f"{label} in-process round {round_}: cache {cache}: "
                  f"{run['tokens_per_s']:.1f} tok/s, TTFT first "
                  f"{run['ttft_first_turn_s'] * 1000:.0f} ms, later "
                  f"{run['ttft_later_turns_s'] * 1000:.0f} ms, cached "
                  f"{run['cached_tokens']}/{run['prompt_tokens']}", flush=True)
    return runs


def summarize(args: argparse.Namespace, packages: dict[str, str], runs: list[dict[str, Any]],
              load_before: tuple[float, float, float]) -> dict[str, Any]:
    table = []
    for label in dict.fromkeys(r["package"] for r in runs):
        mine = [r for r in runs if r["package"] == label]
        on = [r for r in mine if r["cache"] == "on"]
        off = [r for r in mine if r["cache"] == "off"]
        same = sum(a == b for x, y in zip(on, off, strict=True)
                   for a, b in zip(x["answers"].values(),
                                   (y["answers"][k] for k in x["answers"]), strict=True))
        total = sum(len(r["answers"]) for r in on)
        for cache in CACHE_MIB:
            for streams in sorted({r["streams"] for r in mine}):
                points = [r for r in mine if r["cache"] == cache and r["streams"] == streams]
                table.append({
                    "package": label, "cache": cache, "streams": streams,
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in points),
                    "ttft_first_turn_ms": 1000 * statistics.median(
                        r["ttft_first_turn_s"] for r in points),
                    "ttft_later_turns_ms": 1000 * statistics.median(
                        r["ttft_later_turns_s"] for r in points),
                    "prompt_tokens": points[0]["prompt_tokens"],
                    "cached_tokens": statistics.median(r["cached_tokens"] for r in points),
                    "answers_equal": f"{same}/{total}"})
    for row in table:
        one = next(r for r in table if r["package"] == row["package"]
                   and r["cache"] == row["cache"] and r["streams"] == 1)
        off = next(r for r in table if r["package"] == row["package"]
                   and r["cache"] == "off" and r["streams"] == row["streams"])
        row["x_one_stream"] = row["tokens_per_s"] / one["tokens_per_s"]
        row["x_cache_off"] = row["tokens_per_s"] / off["tokens_per_s"]
    for r in runs:
        r.pop("answers")
    return {**script_report.provenance(load_before), "packages": packages,
            "conversations": args.conversations, "turns": args.turns,
            "new_tokens": args.max_new_tokens, "rounds": args.rounds,
            "threads": args.threads, "table": table, "runs": runs}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Multi-turn chats through llmopt serve, prefix cache on and off", "",
        f"Command: `{report['command']}`", "",
        f"SmolLM2-135M-Instruct ({', '.join(f'{k}: {v}' for k, v in report['packages'].items())})"
        f", CPU provider, {report['threads']} threads; {report['conversations']} chats sharing "
        f"one system prompt, {report['turns']} turns each (every turn resends the conversation "
        f"with its answers), {report['new_tokens']} new tokens per answer (greedy, EOS ignored), "
        "over HTTP with the `openai` SDK (streamed); 1 client at a time, then 8 at once. Each "
        "measurement's chats open with ticket numbers none other used: a server reuses the "
        "system prompt and a chat's own earlier turns, never a chat it answered before. "
        f"{report['rounds']} rounds interleave the two servers; medians. "
        + script_report.machine_text(report), "",
        "| package | prefix cache | clients | tokens/s | x 1 client | x cache off | "
        "TTFT 1st turn ms | TTFT later turns ms | prompt tokens | cached | answers equal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["table"]:
        lines.append(
            f"| {r['package']} | {r['cache']} | {r['streams']} | {r['tokens_per_s']:.1f} | "
            f"{r['x_one_stream']:.2f} | {r['x_cache_off']:.2f} | {r['ttft_first_turn_ms']:.0f} | "
            f"{r['ttft_later_turns_ms']:.0f} | {r['prompt_tokens']} | {r['cached_tokens']:.0f} | "
            f"{r['answers_equal']} |")
    lines += ["", "`answers equal`: answers of the cache-on server identical to the cache-off "
              "server's, turn by turn, over every round. Rows `LABEL in-process` (with "
              "`--inprocess`): the same chats by 1 client through `generator.chat` in the bench's "
              "own process, `generator.prefix_cache_bytes` 128 MiB against 0, the system prompt "
              "run once before each cache-on measurement.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
