"""``llmopt optimize PKG -o DIR``: fuse (and optionally convert to fp16) a package."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "optimize", help="fuse a package's graph (and convert to fp16 at level 3)",
        description="Levels: 0 copy, 1 ONNX Runtime basic passes, 2 llmopt fusions (default), "
        "3 fusions in float16 for GPUs. The result is validated against the input package.")
    p.add_argument("package", help="input package directory")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--level", type=int, default=2, help="0, 1, 2 (default) or 3")
    p.add_argument("--fusion", action="append", dest="fusions", metavar="NAME",
                   help="only this fusion (repeatable): norm, skip_norm, attention, activation, "
                   "moe (ONNX Runtime's MoE op; not in any level: slower on CPU)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                   help="convert to float16 (default: only at level 3)")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: float16 with GroupQueryAttention, the graph ONNX Runtime's CUDA "
                   "provider runs entirely on the GPU with the KV cache updated in place "
                   "(implies float16 at level 2 or 3)")
    p.add_argument("--no-validate", dest="validate", action="store_false")
    p.add_argument("--tolerance", type=float)


def run(args: argparse.Namespace) -> int:
    from llmopt.inspect import describe, render
    from llmopt.optimizer import OptimizeOptions, optimize

    options = OptimizeOptions(level=args.level, fusions=tuple(args.fusions) if args.fusions
                              else None, fp16=args.fp16, validate=args.validate,
                              tolerance=args.tolerance, target=args.target)
    print(render(describe(optimize(args.package, args.output, options))))
    return 0
