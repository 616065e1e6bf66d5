"""What the result-writing scripts of this folder share: the SmolLM2 packages they default to
(as ``configs/vs_genai.yaml`` builds them), reading ``--package LABEL=DIR`` flags, and the
provenance every result file records (command, machine load, date)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SMOLLM2 = {"fused": "build/bench/smollm2-fused", "int8": "build/bench/smollm2-int8-fused",
           "int4": "build/bench/smollm2-int4-fused"}


def packages(given: Sequence[str] | None, default: Sequence[str]) -> dict[str, str]:
    """``--package LABEL=DIR`` flags as label -> directory, else ``default`` labels of
    :data:`SMOLLM2`."""
    if not given:
        return {label: SMOLLM2[label] for label in default}
    return dict(item.split("=", 1) for item in given)


def provenance(load_before: Sequence[float]) -> dict[str, Any]:
    """The command that ran, the machine's CPUs and load before and now, and the date."""
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    return {"command": "python " + shlex.join(argv),
            "machine": {"cpus": os.cpu_count(), "load_average_before": list(load_before),
                        "load_average_after": list(os.getloadavg())},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def machine_text(report: dict[str, Any]) -> str:
    """The machine sentence of a result's .md, from :func:`provenance`'s keys."""
    machine = report["machine"]
    return (f"{machine['cpus']} CPUs, load average before "
            f"{machine['load_average_before'][0]:.1f}, after "
            f"{machine['load_average_after'][0]:.1f} (a shared machine: compare within this "
            "file).")
