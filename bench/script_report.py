"""What the result-writing scripts of this folder share: the SmolLM2 packages they default to
(as ``configs/vs_genai.yaml`` builds them), reading ``--package LABEL=DIR`` flags, starting an
`llmopt serve` over one package, and the provenance every result file records (command,
machine load, date)."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL = "model"  # the name a script's server serves its package under
SMOLLM2 = {"fused": "build/bench/smollm2-fused", "int8": "build/bench/smollm2-int8-fused",
           "int4": "build/bench/smollm2-int4-fused"}


def packages(given: Sequence[str] | None, default: Sequence[str]) -> dict[str, str]:
    """``--package LABEL=DIR`` flags as label -> directory, else ``default`` labels of
    :data:`SMOLLM2`."""
    if not given:
        return {label: SMOLLM2[label] for label in default}
    return dict(item.split("=", 1) for item in given)


def launch(package: Path, *flags: str) -> Any:
    """An `llmopt serve` (a LaunchedServer) over ``package`` alone, served as :data:`MODEL`,
    on a free gRPC port, metrics off, with ``flags``."""
    from llmopt.bench.targets.server_process import launch_server

    repo = Path(tempfile.mkdtemp(prefix="llmopt-bench-"))
    (repo / MODEL).symlink_to(package.resolve(), target_is_directory=True)
    return launch_server(["--model-repository", str(repo), "--port", "0", "--no-metrics",
                          *flags])


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
