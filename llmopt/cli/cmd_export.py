"""``llmopt export SOURCE -o DIR``: export and validate a model package.

Flags default to None, meaning ExportOptions' own default, so the defaults live there alone.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmopt.exporter import ExportOptions

# ExportOptions fields set from the flag of the same name
FIELDS = ("task", "dtype", "revision", "trust_remote_code", "allow_pickle", "external_data",
          "validate", "tolerance", "generation_tokens", "builder")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a transformers model (hub id, directory or .gguf) to a validated package",
        description="Export SOURCE (a Hugging Face hub id, a local model directory or a .gguf "
        "file) to an ONNX model package in DIR, validated against PyTorch.",
    )
    p.add_argument("source", help="hub id, local model directory, or .gguf file")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="package directory")
    p.add_argument("--task", help="text-generation, feature-extraction or text-classification "
                   "(default: from the model config)")
    p.add_argument("--builder", choices=("auto", "native", "traced"),
                   help="native: the graph emitted from the weights by a registered "
                   "architecture (fused by optimize); traced: the PyTorch module traced, for any "
                   "architecture transformers runs; auto (default): native where registered")
    p.add_argument("--dtype", help="float32 (default) or float16")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow code from the model repository to run")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow pickled (.bin) weights when no safetensors exist")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="store weights in model.onnx.data (default: only above 2 GB)")
    p.add_argument("--no-validate", dest="validate", action="store_false", default=None,
                   help="skip the comparison with PyTorch (not recommended)")
    p.add_argument("--tolerance", type=float, help="override the validation tolerance")
    p.add_argument("--generation-tokens", type=int,
                   help="greedy tokens compared with PyTorch (default 16)")


def options_from(args: argparse.Namespace) -> ExportOptions:
    """ExportOptions with the flags that were given; the rest keep the dataclass defaults."""
    from llmopt.exporter import ExportOptions

    return ExportOptions(**{field: getattr(args, field) for field in FIELDS
                            if getattr(args, field) is not None})


def run(args: argparse.Namespace) -> int:
    from llmopt.exporter import export
    from llmopt.inspect import describe, render

    package = export(args.source, args.output, options_from(args))
    print(render(describe(package)))
    return 0
