"""``llmopt demo``: export, optimize, quantize, serve, stream a chat answer and benchmark."""

from __future__ import annotations

import argparse
from typing import Any

from llmopt.demo import DEFAULT_MODEL, DEFAULT_QUESTION


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on one model, ending in a served chat and a benchmark",
        description="Fetch SmolLM2-135M-Instruct (or --model), export it with validation, "
        "optimize, quantize to int8 and int4, serve int4 over gRPC on a local port, stream a "
        "chat answer through the client, benchmark PyTorch eager vs fp32/int8/int4 and write a "
        "table and plots. Packages already in the output folder are reused.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a .gguf file, a model directory, a hub id or a name `llmopt fetch` "
                   f"knows (default {DEFAULT_MODEL})")
    p.add_argument("-o", "--out", default="llmopt-demo", metavar="DIR",
                   help="where packages and results go (default ./llmopt-demo)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="what to ask the served model")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length (tokens)")
    p.add_argument("--bench-new-tokens", type=int, default=32,
                   help="tokens generated per benchmark round")
    p.add_argument("--bench-repetitions", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def run(args: argparse.Namespace) -> int:
    from llmopt.demo import DemoOptions, run_demo, summary_json

    result = run_demo(DemoOptions(
        model=args.model, out_dir=args.out, port=args.port, question=args.question,
        max_new_tokens=args.max_new_tokens, bench_new_tokens=args.bench_new_tokens,
        bench_repetitions=args.bench_repetitions))
    if args.json:
        print(summary_json(result))
    return 0
