"""Provider flags shared by the commands that run a package."""

from __future__ import annotations

import argparse
from typing import Any

TRT_PRECISIONS = ("fp32", "fp16", "int8")  # llmopt.runtime.providers.TRT_PRECISIONS


def add_provider_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", action="append", dest="providers", metavar="NAME",
                   help="execution provider, in order of preference (tensorrt, cuda, cpu); "
                   "repeatable; default cpu")
    p.add_argument("--strict-providers", action="store_true",
                   help="fail instead of falling back when the first provider cannot load or "
                   "leaves compute nodes on CPU")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: all cores)")
    gpu = p.add_argument_group("GPU (cuda, tensorrt)")
    gpu.add_argument("--device-id", type=int, help="GPU index for cuda/tensorrt (default 0)")
    gpu.add_argument("--trt-cache-dir", metavar="DIR",
                     help="keep TensorRT engines and timing caches here (a keyed subfolder is "
                     "created), so later runs load instead of rebuilding")
    gpu.add_argument("--trt-precision", choices=TRT_PRECISIONS,
                     help="TensorRT precision (default fp32; int8 takes a static int8 package)")


def provider_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The per-provider options the flags set; only what the user gave."""
    options: dict[str, dict[str, Any]] = {}
    if args.threads:
        options["cpu"] = {"intra_op_threads": args.threads}
    if args.device_id is not None:
        options["cuda"] = {"device_id": args.device_id}
        options["tensorrt"] = {"device_id": args.device_id}
    trt = options.setdefault("tensorrt", {})
    if args.trt_cache_dir:
        trt["cache_dir"] = args.trt_cache_dir
    if args.trt_precision:
        trt["precision"] = args.trt_precision
    if not trt:
        del options["tensorrt"]
    return options


def load_runner(args: argparse.Namespace) -> Any:
    import llmopt

    return llmopt.load(args.package, args.providers or ["cpu"],
                       provider_options=provider_options(args) or None,
                       strict=args.strict_providers)
