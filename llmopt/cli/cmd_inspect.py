"""``llmopt inspect DIR``: a readable summary of a package."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="summarize a model package",
                              description="Show a package's I/O, ops, size, steps and "
                              "validation results.")
    p.add_argument("package", help="package directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from llmopt.inspect import describe, render

    info = describe(args.package)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
