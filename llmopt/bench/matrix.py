"""Expand a bench config into its points, after checking that every package exists.

A point is one (target, package, provider, workload) combination. Some combinations collapse or
drop out, each for a stated reason: the PyTorch baseline does not depend on the package's
precision or on the ONNX Runtime provider (it runs each package's *source*, once per source),
and it is measured without concurrency; encoders have no generation length.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.bench.config import BenchConfig
from llmopt.bench.genai import genai_precision, read_genai_config
from llmopt.errors import PackageError
from llmopt.manifest import Manifest

log = logging.getLogger("llmopt.bench")


@dataclass(frozen=True)
class PackageInfo:
    """What the harness needs to know about a package before loading it."""

    label: str
    path: Path
    task: str
    source: str | None        # what the PyTorch baseline loads
    steps: tuple[str, ...]     # export, optimize, quantize ...
    precision: str
    missing: str | None = None  # why the package is absent (its points are then skipped)
    runtime: str = "llmopt"     # or "genai": an ONNX Runtime GenAI model folder
    context_length: int | None = None

    @property
    def is_decoder(self) -> bool:
        return self.task == "text-generation"


@dataclass(frozen=True)
class Point:
    target: str
    package: str
    provider: str  # provider label; "torch-<device>" for the PyTorch baseline
    batch_size: int
    prompt_tokens: int
    new_tokens: int  # 0 for encoders
    concurrency: int
    request_rate: float | None

    @property
    def id(self) -> str:
        rate = "" if self.request_rate is None else f"/r{self.request_rate:g}"
        return (f"{self.target}/{self.package}/{self.provider}/b{self.batch_size}"
                f"/p{self.prompt_tokens}/n{self.new_tokens}/c{self.concurrency}{rate}")

    @property
    def series(self) -> str:
        """The line a point belongs to in plots: everything but the workload."""
        return f"{self.target}:{self.package}:{self.provider}"

    @property
    def workload(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "concurrency": self.concurrency,
                "request_rate": self.request_rate}

    @property
    def group(self) -> tuple[str, str, str]:
        """Points of one group share one loaded target."""
        return (self.target, self.package, self.provider)


def inspect_packages(config: BenchConfig, allow_missing: bool = False) -> dict[str, PackageInfo]:
    """Open every package's manifest. A missing one is a :class:`PackageError` (before anything
    runs) unless ``allow_missing``: then its points are recorded as skipped."""
    from llmopt.package import Package

    infos: dict[str, PackageInfo] = {}
    for label, spec in config.packages.items():
        try:
            if spec.runtime == "genai":
                infos[label] = describe_genai(label, spec.path)
                continue
            package = Package.open(spec.path)
        except PackageError as exc:
            if not allow_missing:
                how = (" or run with --prepare (the config says how to build it)"
                       if spec.prepare else "")
                raise PackageError(f"package {label!r}: {exc.message}",
                                   fix=f"build it with `llmopt export`{how}, or fix its path "
                                   "in the config") from None
            infos[label] = PackageInfo(label, spec.path, "unknown", None, (), "unknown",
                                       missing=exc.message)
            continue
        infos[label] = describe(label, package)
    return infos


def describe(label: str, package: Any) -> PackageInfo:
    manifest = package.manifest
    source = manifest.source
    reference: str | None = source["reference"]
    if reference and source["gguf_file"] and source["kind"] == "gguf":
        reference = str(Path(reference))
    return PackageInfo(label, package.path, package.task, reference, manifest.stages,
                       _precision(manifest), context_length=manifest.context_length)


def describe_genai(label: str, path: Path) -> PackageInfo:
    """An ONNX Runtime GenAI folder as the harness sees a package: a decoder."""
    decoder = read_genai_config(path)
    return PackageInfo(label, Path(path), "text-generation", None, ("genai-builder",),
                       genai_precision(path), runtime="genai",
                       context_length=decoder.context_length)

def _precision(manifest: Manifest) -> str:
    """The quantize method (int8_dynamic, int4 ...), else fp16 / fp32 from the graph's float
    type."""
    if manifest.quantization is not None:
        return manifest.quantization
    return "fp16" if manifest.dtype == "float16" else "fp32"


def expand(config: BenchConfig, packages: dict[str, PackageInfo]) -> list[Point]:
    """Every point of every sweep, in config order, without duplicates."""
    points: dict[str, Point] = {}
    baseline_of: dict[tuple[Any, ...], str] = {}
    dropped: set[str] = set()
    for sweep in config.sweeps:
        combos = itertools.product(sweep.targets, sweep.packages, sweep.providers,
                                   sweep.batch_sizes, sweep.prompt_lengths, sweep.new_tokens,
                                   sweep.concurrency, sweep.request_rates)
        for target, label, provider, batch, prompt, new, conc, rate in combos:
            info = packages[label]
            tokens = 0 if not info.is_decoder and info.missing is None else new
            package, runs_on = label, provider
            if (target == "genai") != (info.runtime == "genai"):
                dropped.add("the genai target runs GenAI model folders and only they run on it")
                continue
            if target == "pytorch":
                if conc > 1 or rate is not None:
                    dropped.add("the PyTorch baseline is measured at concurrency 1 without a "
                                "request rate")
                    continue
                if info.missing and not config.pytorch.source:
                    dropped.add("a missing package has no recorded source for a PyTorch "
                                "baseline (its precision variants share one anyway)")
                    continue
                source = config.pytorch.source or info.source or label
                # one baseline per source: precision variants share it
                package = baseline_of.setdefault((source, batch, prompt, tokens), label)
                runs_on = f"torch-{config.pytorch.device}"
            point = Point(target, package, runs_on, batch, prompt, tokens, conc, rate)
            points.setdefault(point.id, point)
    for reason in sorted(dropped):
        log.info("bench: some combinations left out: %s", reason)
    return list(points.values())
