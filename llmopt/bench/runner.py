"""The sweep: warmup, then repetitions interleaved over the points (round-robin), so slow drift
of the machine (thermal, other work) hits every point alike. A point that fails is recorded
with its error and the sweep goes on.
"""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmopt.bench import memory, prompts
from llmopt.bench.config import BenchConfig
from llmopt.bench.fingerprint import load_average
from llmopt.bench.matrix import PackageInfo, Point
from llmopt.bench.measure import Round, run_round
from llmopt.bench.targets import TargetPool
from llmopt.errors import LlmoptError

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class PointResult:
    point: Point
    status: str = "pending"  # pending -> ok | failed | skipped
    error: dict[str, Any] | None = None
    rounds: list[Round] = field(default_factory=list)
    warmup_rounds: int = 0
    measured_s: float = 0.0
    budget_exhausted: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    load_average: list[float] | None = None
    mean_input_tokens: float | None = None  # encoders: actual tokens per text

    @property
    def active(self) -> bool:
        return self.status == "pending"

    def fail(self, exc: BaseException, phase: str) -> None:
        self.status = "failed"
        kind = type(exc).__name__
        message = str(exc) if isinstance(exc, LlmoptError) else f"{kind}: {exc}"
        self.error = {"type": kind, "message": message, "phase": phase}
        if not isinstance(exc, LlmoptError):
            self.error["traceback"] = "".join(traceback.format_exception(exc)[-3:]).strip()


class Sweep:
    def __init__(self, config: BenchConfig, packages: dict[str, PackageInfo],
                 points: list[Point], progress: Progress | None = stderr_progress) -> None:
        self.config = config
        self.packages = packages
        self.results = [PointResult(p) for p in points]
        self.pool = TargetPool(config, packages, points)
        self.progress = progress or (lambda message: None)
        self.rng = random.Random(config.run.seed)
        self._inputs: dict[str, Any] = {}
        self._load_rss: dict[tuple[str, str, str], int] = {}
        self._last_group: tuple[str, str, str] | None = None  # the runtime of the last round
        for result in self.results:
            missing = packages[result.point.package].missing
            if missing:
                result.status = "skipped"
                result.error = {"type": "PackageError", "message": missing, "phase": "setup"}

    def run(self) -> list[PointResult]:
        run = self.config.run
        try:
            if run.interleave:
                for index in range(run.warmup):
                    self._pass(self.results, f"warmup {index + 1}/{run.warmup}", measured=False)
                for index in range(run.repetitions):
                    self._pass(self.results, f"rep {index + 1}/{run.repetitions}", measured=True)
            else:
                for result in self.results:
                    for index in range(run.warmup):
                        self._pass([result], f"warmup {index + 1}/{run.warmup}", measured=False)
                    for index in range(run.repetitions):
                        self._pass([result], f"rep {index + 1}/{run.repetitions}",
                                   measured=True)
                    if not any(r.active and r.point.group == result.point.group
                               for r in self.results):
                        self.pool.close(result.point.group)  # frees its memory before the next
        finally:
            self.pool.close()
        for result in self.results:
            if result.status == "pending":
                result.status = "ok"
        return self.results

    def _pass(self, results: list[PointResult], label: str, measured: bool) -> None:
        active = [r for r in results if r.active]
        for number, result in enumerate(active, 1):
            if not result.active or (measured and result.budget_exhausted):
                continue
            where = f"[{label}] ({number}/{len(active)}) {result.point.id}"
            try:
                round_ = self._round(result, measured)
            except BaseException as exc:  # one failing point never stops the sweep
                if isinstance(exc, KeyboardInterrupt):
                    raise
                phase = "load" if result.point.group in self.pool.failures else (
                    "measure" if measured else "warmup")
                result.fail(exc, phase)
                self.progress(f"{where}: FAILED ({phase}): {result.error['message']}"
                              if result.error else f"{where}: FAILED")
                continue
            if measured:
                result.rounds.append(round_)
                result.measured_s += round_.wall_s
                budget = self.config.run.max_seconds_per_point
                result.budget_exhausted = budget is not None and result.measured_s >= budget
            else:
                result.warmup_rounds += 1
            self.progress(f"{where}: {_brief(round_)}")

    def _round(self, result: PointResult, measured: bool) -> Round:
        point = result.point
        new_tokens = point.new_tokens
        if not measured and self.config.run.warmup_new_tokens:
            new_tokens = min(new_tokens, self.config.run.warmup_new_tokens)
        group_is_new = point.group not in self.pool.targets
        before = memory.rss_bytes() or 0
        target = self.pool.get(point)
        if group_is_new:
            self._load_rss[point.group] = max(0, (memory.rss_bytes() or 0) - before)
        if point.concurrency > 1 and not target.supports_concurrency:
            raise LlmoptError(f"the {point.target} target runs one request at a time",
                              fix="use concurrency 1 for it")
        prepare = getattr(target, "prepare", None)
        if prepare is not None:
            prepare(point.concurrency, point.request_rate, point.batch_size)
        info = self.packages[point.package]
        inputs, result.mean_input_tokens = self._workload_inputs(point, info)
        if info.is_decoder:
            def request(issued: float) -> Any:
                return target.decode(inputs, new_tokens, issued)
        else:
            def request(issued: float) -> Any:
                return target.encode(inputs, issued)
        servers = self.pool.servers() if point.target == "server" else []
        scoped = memory.reset_peak() and all(s.reset_peak() for s in servers)
        count = point.concurrency * self.config.run.requests_per_worker
        if point.group != self._last_group:  # another runtime's spinning threads go idle first
            time.sleep(self.config.run.settle_s)
        self._last_group = point.group
        round_ = run_round(request, count, point.concurrency, point.request_rate, self.rng)
        self._record_memory(result, target, scoped)
        if not result.info:
            result.info = target.info()
        result.load_average = load_average()
        return round_

    def _workload_inputs(self, point: Point, info: PackageInfo) -> tuple[Any, float | None]:
        key = f"{point.package}/{point.batch_size}/{point.prompt_tokens}"
        if key not in self._inputs:
            tokenizer = self.pool.tokenizer(point.package)
            if info.is_decoder:
                self._inputs[key] = (prompts.decoder_prompts(
                    tokenizer, point.prompt_tokens, point.batch_size), None)
            else:
                self._inputs[key] = prompts.encoder_texts(tokenizer, point.prompt_tokens,
                                                          point.batch_size)
        inputs, mean_tokens = self._inputs[key]
        return inputs, mean_tokens

    def _record_memory(self, result: PointResult, target: Any, scoped: bool) -> None:
        mem = result.memory
        peak = memory.peak_rss_bytes()
        if peak is not None:
            mem["peak_rss_bytes"] = max(peak, mem.get("peak_rss_bytes") or 0)
        mem["peak_rss_scope"] = "point" if scoped else "process"
        mem["model_rss_bytes"] = self._load_rss.get(result.point.group)
        gpu = memory.gpu_memory_bytes(os.getpid())
        if gpu is not None:
            mem["gpu_memory_bytes"] = max(gpu, mem.get("gpu_memory_bytes") or 0)
        for key, value in (target.memory() or {}).items():
            if isinstance(value, int | float) and isinstance(mem.get(key), int | float):
                mem[key] = max(mem[key], value)
            elif value is not None:
                mem[key] = value


def _brief(round_: Round) -> str:
    t = round_.timings
    e2e = sum(x.e2e_s for x in t) / len(t) if t else 0.0
    text = f"{len(t)} request(s), mean e2e {e2e * 1000:.0f} ms"
    if round_.output_tokens:
        text += f", {round_.output_tokens / round_.wall_s:.1f} output tok/s"
    elif round_.sequences:
        text += f", {round_.sequences / round_.wall_s:.1f} seq/s"
    return text + f" ({time.strftime('%H:%M:%S')})"
