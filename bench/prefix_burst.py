"""A burst of chats on one new system prompt through `llmopt serve`, prefix cache on and off.

    python bench/prefix_burst.py [--package int4=build/bench/smollm2-int4-fused ...] \\
        [--clients 8] [--rounds 5] [--max-new-tokens 32] [--prefill-chunk 256] [--out NAME]

For each package, starts two `llmopt serve` processes over it (HTTP door, `--prefix-cache-mib
128` and `--prefix-cache-mib 0`). Per round and server, --clients clients at once each stream
one chat through the `openai` SDK (greedy, EOS ignored): a support desk's system prompt that no
request before used (a desk number opens it), then a question of its own. With the cache on,
the first request to arrive is prefilled alone (its prompt is more than half a prefill chunk,
and the others arrive while it runs) and kept, and the others run only what follows the shared
system prompt; off, every prompt is prefilled whole. Rounds interleave the two
servers (which goes first alternates). Reports per server the mean and the last client's time
to first token, tokens/s over the burst, prompt tokens and the share the server reported cached
(`usage.prompt_tokens_details.cached_tokens`), and whether every answer equals the other
server's. Writes bench/results/<out>.json and .md. Not a test: nothing here asserts a speed.
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
from prefix_cache import at_once, openai_client, over_http  # this folder's: chats over HTTP

from llmopt.bench.prompts import CHAT_QUESTIONS

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
CACHE_MIB = {"on": 128, "off": 0}
SYSTEM = (
    "You answer customers of a bicycle shop at its help desk. Be brief and friendly, and say "
    "so when you do not know something. The shop is open from 9 to 5 on weekdays and from 10 "
    "to 4 on Saturdays; it is closed on Sundays and public holidays. It repairs every kind of "
    "bicycle, from old city bikes to electric cargo bikes, and most repairs take one or two "
    "days. A basic service costs 45 euros and includes brakes, gears, chain and tyre pressure. "
    "Flat tyres are fixed while the customer waits, for 12 euros. The shop sells helmets, "
    "lights, locks, bags and spare parts, and it rents city bikes by the day. Customers can "
    "book a repair by phone or in the shop; there is no online booking yet. Payment is by card "
    "or cash. Staff speak English, German and French.")


def burst(url: str, clients: int, desk: int, new_tokens: int, busy: bool = False
          ) -> dict[str, Any]:
    """``clients`` chats at once on desk ``desk``'s system prompt, one question each; with
    ``busy``, while another client's long answer streams (the engine steps between arrivals)."""
    replies: list[dict[str, Any]] = [{} for _ in range(clients)]
    background = None
    if busy:
        ask_long = over_http(openai_client(url), 400)
        background = threading.Thread(target=ask_long, args=(
            [{"role": "user", "content": f"Tell me a long story, number {desk}."}],))
        background.start()
        time.sleep(0.5)  # its prefill is done: it decodes while the burst arrives

    def client(index: int) -> Callable[[], None]:
        ask = over_http(openai_client(url), new_tokens)
        messages = [{"role": "system", "content": f"Desk {desk}. {SYSTEM}"},
                    {"role": "user", "content": CHAT_QUESTIONS[index % len(CHAT_QUESTIONS)]}]

        def chat() -> None:
            replies[index] = ask(messages)

        return chat

    wall = at_once(clients, client)
    if background is not None:
        background.join()
    if not all(replies):
        raise RuntimeError("a client's chat failed")
    ttfts = [r["ttft_s"] for r in replies]
    return {"clients": clients, "wall_s": wall,
            "tokens_per_s": sum(r["generated_tokens"] for r in replies) / wall,
            "ttft_mean_s": statistics.fmean(ttfts), "ttft_last_s": max(ttfts),
            "prompt_tokens": sum(r["prompt_tokens"] for r in replies),
            "cached_tokens": sum(r["cached_tokens"] for r in replies),
            "answers": [r["answer"] for r in replies]}


def run_package(label: str, package: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    servers = {}
    runs = []
    try:
        for cache, mib in CACHE_MIB.items():
            servers[cache] = script_report.launch(
                package, "--http-port", "0", "--threads", str(args.threads),
                "--prefix-cache-mib", str(mib), "--prefill-chunk", str(args.prefill_chunk))
        for server in servers.values():  # warm-up: sessions, connections, the first shapes
            burst(str(server.http_url), 2, 0, 4)
        for round_ in range(args.rounds):
            order = list(servers.items())
            for cache, server in order if round_ % 2 == 0 else order[::-1]:
                time.sleep(1.0)  # the other server's threads go idle first
                run = {"package": label, "cache": cache, "round": round_,
                       **burst(str(server.http_url), args.clients, 100 + round_,
                               args.max_new_tokens, args.busy),
                       "load_average_1m": os.getloadavg()[0]}
                runs.append(run)
                print(f"{label} round {round_}: cache {cache}: TTFT mean "
                      f"{run['ttft_mean_s'] * 1000:.0f} ms, last {run['ttft_last_s'] * 1000:.0f} "
                      f"ms, {run['tokens_per_s']:.1f} tok/s, cached {run['cached_tokens']}/"
                      f"{run['prompt_tokens']}", flush=True)
    finally:
        for server in servers.values():
            server.close(60)
    return runs


def summarize(args: argparse.Namespace, packages: dict[str, str], runs: list[dict[str, Any]],
              load_before: tuple[float, float, float]) -> dict[str, Any]:
    table = []
    for label in packages:
        mine = {cache: [r for r in runs if r["package"] == label and r["cache"] == cache]
                for cache in CACHE_MIB}
        same = sum(a == b for x, y in zip(mine["on"], mine["off"], strict=True)
                   for a, b in zip(x["answers"], y["answers"], strict=True))
        for cache, points in mine.items():
            table.append({
                "package": label, "cache": cache,
                "ttft_mean_ms": 1000 * statistics.median(r["ttft_mean_s"] for r in points),
                "ttft_last_ms": 1000 * statistics.median(r["ttft_last_s"] for r in points),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in points),
                "prompt_tokens": points[0]["prompt_tokens"],
                "cached_tokens": statistics.median(r["cached_tokens"] for r in points),
                "answers_equal": f"{same}/{args.clients * args.rounds}"})
    for r in runs:
        r.pop("answers")
    return {**script_report.provenance(load_before), "packages": packages,
            "clients": args.clients, "rounds": args.rounds, "new_tokens": args.max_new_tokens,
            "prefill_chunk": args.prefill_chunk,
            "threads": args.threads, "table": table, "runs": runs}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# A burst of chats on one new system prompt through llmopt serve, prefix cache on "
        "and off", "",
        f"Command: `{report['command']}`", "",
        f"SmolLM2-135M-Instruct ({', '.join(f'{k}: {v}' for k, v in report['packages'].items())})"
        f", CPU provider, {report['threads']} threads; {report['clients']} clients at once, "
        "each streaming one chat over HTTP with the `openai` SDK: a help desk's system prompt "
        "no request before used, then a question of its own, "
        f"{report['new_tokens']} new tokens (greedy, EOS ignored); `--prefill-chunk "
        f"{report['prefill_chunk']}`. {report['rounds']} rounds "
        "interleave the two servers; medians. " + script_report.machine_text(report), "",
        "| package | prefix cache | TTFT mean ms | TTFT last ms | tokens/s | prompt tokens | "
        "cached | answers equal |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["table"]:
        lines.append(
            f"| {r['package']} | {r['cache']} | {r['ttft_mean_ms']:.0f} | "
            f"{r['ttft_last_ms']:.0f} | {r['tokens_per_s']:.1f} | {r['prompt_tokens']} | "
            f"{r['cached_tokens']:.0f} | {r['answers_equal']} |")
    lines += ["", "With the cache on, the first request to arrive is prefilled alone and its "
              "prompt kept; the others start from its system prompt and prefill only their "
              "question. Off, every prompt is prefilled whole. `answers equal`: answers of the "
              "cache-on server identical to the cache-off server's, over every round.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", action="append", metavar="LABEL=DIR",
                   help="a package (repeatable; default: fused and int4 SmolLM2 as "
                   "vs_genai.yaml builds them)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="the servers' intra-op threads")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="the servers' --prefill-chunk (256, their default, admits prompts of "
                   "over 128 tokens one at a time)")
    p.add_argument("--busy", action="store_true",
                   help="the burst arrives while another client's 400-token answer streams")
    p.add_argument("--out", default="prefix_burst")
    args = p.parse_args()
    packages = script_report.packages(args.package, ("fused", "int4"))
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


if __name__ == "__main__":
    sys.exit(main())
