"""``llmopt embed PKG TEXT...``: embeddings (or labels, for classification packages) as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llmopt.cli._providers import add_provider_args, load_runner


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("embed", help="embed or classify texts with an encoder package",
                              description="Print one JSON line per text: its embedding, or "
                              "its label and scores for a text-classification package.")
    p.add_argument("package", help="package directory")
    p.add_argument("texts", nargs="*", help="texts (default: one per line from stdin)")
    add_provider_args(p)


def run(args: argparse.Namespace) -> int:
    from llmopt.errors import InvalidInputError
    from llmopt.runtime.embedder import Embedder

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    embedder = load_runner(args)
    if not isinstance(embedder, Embedder):
        raise InvalidInputError(f"{args.package} is a text-generation package",
                                fix="use `llmopt generate` for it")
    if embedder.output == "logits":
        for text, c in zip(texts, embedder.classify(texts), strict=True):
            print(json.dumps({"text": text, "label": c.label, "score": c.score,
                              "scores": c.scores}, ensure_ascii=False))
    else:
        for text, vector in zip(texts, embedder.embed(texts), strict=True):
            print(json.dumps({"text": text, "embedding": [round(float(x), 7) for x in vector]},
                             ensure_ascii=False))
    return 0
