"""``llmopt quantize PKG -o DIR``: int8 (weight-only, dynamic, static, per token) or int4
packages."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a package (int8 or int4) and measure what it costs",
        description="Write a quantized package and record its fidelity (perplexity, agreement "
        "or cosine) against the input package.")
    p.add_argument("package", help="input package directory")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--method", default=None,
                   choices=["int8", "int8-dynamic", "int8-static", "int8-per-token", "int4"],
                   help="int8: weight-only (default for decoders); int8-per-token: integer "
                   "GEMMs, per-token activations, SmoothQuant (default for encoders); "
                   "int8-dynamic; int8-static (QDQ, calibrated); int4: weight-only MatMulNBits")
    p.add_argument("--block-size", type=int, default=32, help="int4/int8 block size")
    p.add_argument("--algorithm", default="auto",
                   help="int4: auto (gguf for a package exported from a Q4_0/Q4_1/Q4_K GGUF file, "
                   "else hqq), gguf (reuse the source's 4-bit blocks exactly), hqq, gptq, mse "
                   "(clipping search), rtn")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits compute (0-4)")
    p.add_argument("--per-channel", action="store_true", help="int8 dynamic/static weights")
    p.add_argument("--keep-float", action="append", metavar="NAME",
                   help="keep weights whose name contains NAME in float (repeatable; default: "
                   "none for int8/int4, lm_head for int8-dynamic/int8-static)")
    p.add_argument("--lm-head", default="int8", choices=["int8", "int4", "float"],
                   help="int8/int4: how to store the LM head (default int8)")
    p.add_argument("--quantize-embeddings", action="store_true")
    p.add_argument("--smooth-alpha", type=float, default=None,
                   help="int8-per-token: SmoothQuant strength in [0, 1] (default 0.5)")
    p.add_argument("--calibration", default="minmax", help="minmax, entropy or percentile")
    p.add_argument("--calibration-file", help="text file (default: built-in corpus)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows")
    p.add_argument("--sequence-length", type=int, default=128, help="calibration window")
    p.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="skip the fidelity measurement")


def run(args: argparse.Namespace) -> int:
    from llmopt.inspect import describe, render
    from llmopt.package import Package
    from llmopt.quantizer import QuantizeOptions, default_options, quantize

    parent = Package.open(args.package)
    method = args.method.replace("-", "_") if args.method else default_options(parent).method
    if method == "int8_per_token":
        encoder = QuantizeOptions.int8_encoder()
        options = encoder.with_(
            keep_float=tuple(args.keep_float) if args.keep_float else encoder.keep_float,
            smooth_alpha=encoder.smooth_alpha if args.smooth_alpha is None
            else args.smooth_alpha, calibration_file=args.calibration_file,
            evaluate=args.evaluate)
        print(render(describe(quantize(parent, args.output, options))))
        return 0
    symmetric = args.symmetric if args.symmetric is not None else method == "int8"
    options = QuantizeOptions(
        method=method, block_size=args.block_size, algorithm=args.algorithm,
        symmetric=symmetric, accuracy_level=args.accuracy_level,
        per_channel=args.per_channel,
        keep_float=tuple(args.keep_float) if args.keep_float else
        ("lm_head",) if method in ("int8_dynamic", "int8_static") else (),
        lm_head_bits={"int8": 8, "int4": 4, "float": None}[args.lm_head],
        quantize_embeddings=args.quantize_embeddings, calibration=args.calibration,
        calibration_file=args.calibration_file, calibration_samples=args.samples,
        calibration_length=args.sequence_length, evaluate=args.evaluate,
    )
    print(render(describe(quantize(parent, args.output, options))))
    return 0
