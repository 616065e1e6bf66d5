"""``llmopt doctor [--gpu | --dry-run]``: the self-test of this machine's llmopt, offline."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor", help="self-test: build tiny models and run export to serve on this machine",
        description="Builds tiny random models locally (no network), exports, optimizes "
        "(--target cuda), quantizes int4, loads each with strict providers, checks node "
        "placement, greedy tokens and logits against CPU, the in-place KV cache's device, "
        "TensorRT's profile and cache folder, a 2,100-token generation, and llmopt serve "
        "through llmopt.Client and tritonclient. Exits 1 with the failed checks' reasons.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true",
                      help="test cuda (and tensorrt where installed) against CPU")
    mode.add_argument("--dry-run", action="store_true",
                      help="CPU only: every check but the GPU's (the default)")
    p.add_argument("--device-id", type=int, default=0, help="GPU to test (default 0)")
    p.add_argument("--work-dir", help="keep the built packages here (default: a temporary "
                   "folder, removed afterwards)")
    p.add_argument("--no-serve", dest="serve", action="store_false",
                   help="skip the llmopt serve check")


def run(args: argparse.Namespace) -> int:
    from llmopt.doctor import DoctorOptions, run_doctor

    report = run_doctor(DoctorOptions(gpu=args.gpu, device_id=args.device_id,
                                      work_dir=args.work_dir, serve=args.serve))
    if report.ok:
        print(f"llmopt doctor: all {len(report.checks)} checks passed")
        return 0
    for check in report.failures():
        print(f"llmopt doctor: FAILED {check.name}: {check.detail}", file=sys.stderr)
    return 1
