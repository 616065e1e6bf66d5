"""Provider flags shared by the commands that run a package."""

from __future__ import annotations

import argparse
from typing import Any


def add_provider_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", action="append", dest="providers", metavar="NAME",
                   help="execution provider, in order of preference (tensorrt, cuda, cpu); "
                   "repeatable; default cpu")
    p.add_argument("--strict-providers", action="store_true",
                   help="fail instead of falling back when the first provider cannot load")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: all cores)")


def load_runner(args: argparse.Namespace) -> Any:
    import llmopt

    options = {"cpu": {"intra_op_threads": args.threads}} if args.threads else None
    return llmopt.load(args.package, args.providers or ["cpu"], provider_options=options,
                       strict=args.strict_providers)
