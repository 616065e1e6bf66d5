"""``llmopt`` entry point: parse, call one library function, print, map errors to exit codes.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args)``;
heavy modules (torch, onnxruntime) are imported inside ``run`` so ``llmopt --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

COMMANDS = (
    "export", "optimize", "quantize", "eval", "inspect",
    "generate", "embed", "fetch", "bench", "serve", "demo", "doctor",
)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from llmopt import __version__

    parser = argparse.ArgumentParser(
        prog="llmopt",
        description="Export, optimize, quantize, serve and benchmark Transformer models on "
        "ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"llmopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="show warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"llmopt.cli.cmd_{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    from llmopt.errors import LlmoptError

    command = importlib.import_module(f"llmopt.cli.cmd_{args.command}")
    try:
        return int(command.run(args) or 0)
    except LlmoptError as exc:
        print(f"llmopt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("llmopt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`llmopt embed ... | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("llmopt").setLevel(level)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
