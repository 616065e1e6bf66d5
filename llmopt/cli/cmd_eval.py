"""``llmopt eval PKG [--against PKG]``: perplexity, agreement and cosine, as recorded."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="measure a package's fidelity (against another package)",
        description="Decoders: perplexity on llmopt's evaluation text; with --against also "
        "top-1 agreement and greedy agreement over 64 tokens. Encoders: embedding cosine "
        "against another package.")
    p.add_argument("package")
    p.add_argument("--against", metavar="PKG", help="reference package (e.g. the fp32 one)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from llmopt.evaluate import evaluate, format_fidelity

    result = evaluate(args.package, args.against)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for line in format_fidelity(result):
        print(line)
    return 0
