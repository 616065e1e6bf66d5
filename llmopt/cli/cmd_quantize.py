"""``llmopt quantize PKG -o DIR``: int8 (weight-only, dynamic, static, per token) or int4
packages.

Every flag defaults to None, meaning "the preset's value": the command starts from the method's
preset (:meth:`QuantizeOptions.preset`, or the package's default) and changes only what was
given, so the presets stay the one place that says what each method does by default.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmopt.quantizer import QuantizeOptions

LM_HEAD_BITS = {"int8": 8, "int4": 4, "float": None}
# flag destination -> QuantizeOptions field, for flags whose value passes through unchanged
FIELDS = {"block_size": "block_size", "algorithm": "algorithm", "symmetric": "symmetric",
          "accuracy_level": "accuracy_level", "per_channel": "per_channel",
          "quantize_embeddings": "quantize_embeddings", "smooth_alpha": "smooth_alpha",
          "calibration": "calibration", "calibration_file": "calibration_file",
          "samples": "calibration_samples", "sequence_length": "calibration_length",
          "evaluate": "evaluate"}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a package (int8 or int4) and measure what it costs",
        description="Write a quantized package and record its fidelity (perplexity, agreement "
        "or cosine) against the input package. Flags left out keep the method's preset.")
    p.add_argument("package", help="input package directory")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--method", default=None,
                   choices=["int8", "int8-dynamic", "int8-static", "int8-per-token", "int4"],
                   help="int8: weight-only, int8 compute (the default); int8-per-token: "
                   "integer GEMMs, per-token activations, SmoothQuant (the faster encoder int8 "
                   "where llmopt's CPU kernels cannot run); "
                   "int8-dynamic; int8-static (QDQ, calibrated); int4: weight-only MatMulNBits")
    p.add_argument("--block-size", type=int, help="int4/int8 block size (preset: 32)")
    p.add_argument("--algorithm",
                   help="int4: auto (gguf for a package exported from a Q4_0/Q4_1/Q4_K GGUF file, "
                   "else hqq), gguf (reuse the source's 4-bit blocks exactly), hqq, gptq, mse "
                   "(clipping search), rtn")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric blocks (preset: yes for int8, no for int4)")
    p.add_argument("--accuracy-level", type=int, help="MatMulNBits compute, 0-4 (preset: 4)")
    p.add_argument("--per-channel", action="store_true", default=None,
                   help="int8 dynamic/static weights")
    p.add_argument("--keep-float", action="append", metavar="NAME",
                   help="keep weights whose name contains NAME in float (repeatable; preset: "
                   "none for int8/int4, lm_head for int8-dynamic/int8-static)")
    p.add_argument("--lm-head", choices=list(LM_HEAD_BITS),
                   help="int8/int4: how to store the LM head (preset: int8)")
    p.add_argument("--quantize-embeddings", action="store_true", default=None)
    p.add_argument("--smooth-alpha", type=float,
                   help="int8-per-token: SmoothQuant strength in [0, 1] (preset: 0.5)")
    p.add_argument("--split-activations", action="store_true", default=None,
                   help="int8-per-token: each activation as an int8 code plus one of its "
                   "rounding residual (two integer GEMMs, about 16-bit activations): the "
                   "faithful encoder preset, no smoothing and no float layer unless asked")
    p.add_argument("--calibration", help="minmax (preset), entropy or percentile")
    p.add_argument("--calibration-file", help="text file (default: built-in corpus)")
    p.add_argument("--samples", type=int, help="calibration windows (preset: 16)")
    p.add_argument("--sequence-length", type=int, help="calibration window (preset: 128)")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", default=None,
                   help="skip the fidelity measurement")


def options_from(args: argparse.Namespace, default: QuantizeOptions) -> QuantizeOptions:
    """The options ``args`` ask for: ``--method``'s preset (``default`` without one) with the
    flags that were given applied."""
    from llmopt.errors import InvalidInputError
    from llmopt.quantizer import QuantizeOptions

    base = QuantizeOptions.preset(args.method.replace("-", "_")) if args.method else default
    if args.split_activations:
        if args.method not in (None, "int8-per-token"):
            raise InvalidInputError(f"--split-activations is an int8-per-token option, not "
                                    f"{args.method}'s", fix="drop --method, or use "
                                    "--method int8-per-token")
        base = QuantizeOptions.int8_encoder(split_activations=True)
    changes: dict[str, Any] = {field: getattr(args, flag) for flag, field in FIELDS.items()
                               if getattr(args, flag) is not None}
    if args.keep_float is not None:
        changes["keep_float"] = tuple(args.keep_float)
    if args.lm_head is not None:
        changes["lm_head_bits"] = LM_HEAD_BITS[args.lm_head]
    return base.with_(**changes)


def run(args: argparse.Namespace) -> int:
    from llmopt.inspect import describe, render
    from llmopt.package import Package
    from llmopt.quantizer import default_options, quantize

    parent = Package.open(args.package)
    options = options_from(args, default_options(parent))
    print(render(describe(quantize(parent, args.output, options))))
    return 0
