"""``llmopt demo``: the whole pipeline on one model, from nothing to a served, measured chat.

fetch -> export (validated against PyTorch) -> optimize -> quantize int8 and int4 (each
measured) -> serve the int4 package over gRPC on a free local port -> stream a chat answer
through the client -> a short benchmark (PyTorch eager vs fp32 vs int8 vs int4) -> table and
plot -> the server drained and stopped.

Everything lands in one folder (``llmopt-demo/`` by default). A package that is already there,
made from the same source by the same steps, is reused, so a second run only serves and
measures.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.errors import InvalidInputError, LlmoptError
from llmopt.package import Package

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_QUESTION = "In two sentences, why is the sky blue?"
SERVED_NAME = "smollm2"


@dataclass(frozen=True)
class DemoOptions:
    """``model``: anything ``llmopt export`` takes, or a name ``llmopt fetch`` knows."""

    model: str = DEFAULT_MODEL
    out_dir: str = "llmopt-demo"
    port: int = 0
    question: str = DEFAULT_QUESTION
    max_new_tokens: int = 64
    bench_prompt_tokens: int = 64
    bench_new_tokens: int = 32
    bench_repetitions: int = 2
    threads: int | None = None


@dataclass
class DemoResult:
    out_dir: Path
    packages: dict[str, Path]
    answer: str
    answer_tokens: int
    server_port: int
    table: str
    bench_files: list[Path] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)


def run_demo(options: DemoOptions | None = None,
             say: Callable[[str], None] | None = None,
             write: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo; ``say`` gets progress lines, ``write`` the streamed answer's text."""
    options = options or DemoOptions()
    say = say or _say
    write = write or _write
    _check_options(options)
    out = Path(options.out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(say)
    packages: dict[str, Path] = {}

    with stages("fetch", 1):
        source = _resolve_model(options.model, say)
    with stages("export (validated against PyTorch)", 2):
        packages["fp32"] = _reuse_or(out / "packages" / "fp32", stages, lambda path: _export(
            source, path))
    with stages("optimize (fused graph)", 3):
        packages["fused"] = _reuse_or(out / "packages" / "fused", stages, lambda path: _optimize(
            packages["fp32"], path))
    with stages("quantize int8 (weight-only, measured)", 4):
        packages["int8"] = _reuse_or(out / "packages" / "int8", stages, lambda path: _quantize(
            packages["fused"], path, "int8"))
    with stages("quantize int4 (measured)", 5):
        packages["int4"] = _reuse_or(out / "packages" / "int4", stages, lambda path: _quantize(
            packages["fused"], path, "int4"))
    for name in ("int8", "int4"):
        say(f"      {name}: {_fidelity_line(Package.open(packages[name]))}")

    repository = out / "repository"
    repository.mkdir(exist_ok=True)
    served = repository / SERVED_NAME
    if served.is_symlink() or served.exists():
        served.unlink()
    served.symlink_to(Path("..") / "packages" / "int4", target_is_directory=True)

    from llmopt.client import Client
    from llmopt.server import ServerConfig, create_server

    with stages("serve int4 over gRPC and stream a chat answer", 6):
        server, port = create_server(repository, f"127.0.0.1:{options.port}",
                                     ServerConfig(grace_s=5.0))
        try:
            server.start()
            say(f"      server on 127.0.0.1:{port}, model {SERVED_NAME!r} (int4)")
            say(f"      you> {options.question}")
            write("      llmopt> ")
            with Client(f"127.0.0.1:{port}") as client:
                stream = client.stream(SERVED_NAME, options.question, chat=True,
                                       max_new_tokens=options.max_new_tokens)
                for delta in stream:
                    write(delta.replace("\n", "\n              "))
                write("\n")
                answer = stream.result
        finally:
            server.stop(5.0)
        say(f"      {answer.stats.generated_tokens} tokens, "
            f"{answer.stats.decode_tokens_per_s:.1f} tokens/s decode through the server; "
            "server stopped")

    with stages("benchmark: PyTorch eager vs fp32 vs int8 vs int4", 7):
        table, files = _bench(out, packages, options, say)
    say("")
    for line in table.splitlines():
        say(line)
    say("")
    say(f"Everything is in {out}/: packages/ (fp32, fused, int8, int4), repository/ (what was "
        f"served), bench/ (results.json, summary.md, plots/*.png). Run again to reuse them.")
    return DemoResult(out, packages, answer.text, answer.stats.generated_tokens, port, table,
                      files, stages.seconds, stages.reused)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _Stages:
    TOTAL = 7

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self._name = ""
        self._started = 0.0

    def __call__(self, name: str, number: int) -> _Stages:
        self._name = name
        self.say(f"[{number}/{self.TOTAL}] {name}")
        return self

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        elapsed = time.perf_counter() - self._started
        self.seconds[self._name] = round(elapsed, 1)
        if exc_type is None:
            self.say(f"      done in {elapsed:.1f} s")


def _check_options(options: DemoOptions) -> None:
    if not 0 <= options.port <= 65535:
        raise InvalidInputError(f"port {options.port} is out of range",
                                fix="give a port from 1 to 65535, or 0 for a free one")
    if options.port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", options.port))
            except OSError:
                raise InvalidInputError(
                    f"port {options.port} on 127.0.0.1 is in use",
                    fix="pick another --port, or 0 (the default) for a free one") from None
    if options.max_new_tokens < 1 or options.bench_new_tokens < 2:
        raise InvalidInputError("the demo needs at least 1 answer and 2 benchmark tokens",
                                fix="raise --max-new-tokens / --bench-new-tokens")
    if not options.question.strip():
        raise InvalidInputError("the question is empty", fix="ask something, e.g. --question "
                                f"{DEFAULT_QUESTION!r}")


def _resolve_model(model: str, say: Callable[[str], None]) -> str:
    from llmopt import models

    known = {m.name for m in models.list_models()}
    if model in known:
        path = models.fetch(model)
        say(f"      {model}: {path}")
        return str(path)
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    if "/" in model and not model.startswith((".", "/", "~")):
        return model  # a Hugging Face Hub id: export loads it (and says so if it cannot)
    raise InvalidInputError(
        f"--model {model!r} is not a file, a directory, a hub id or a model llmopt fetches",
        fix=f"give a .gguf file, a model directory, a hub id (org/name) or one of: "
        f"{', '.join(sorted(known))}")


def _reuse_or(path: Path, stages: _Stages, build: Callable[[Path], Any]) -> Path:
    if (path / "llmopt.json").is_file():
        try:
            Package.open(path)
        except LlmoptError:
            pass  # unreadable: rebuilt below
        else:
            stages.reused.append(path.name)
            stages.say(f"      reusing {path}")
            return path
    build(path)
    return path


def _export(source: str, path: Path) -> None:
    from llmopt.exporter import export

    _fresh(path)
    export(source, path)


def _optimize(parent: Path, path: Path) -> None:
    from llmopt.optimizer import optimize

    _fresh(path)
    optimize(parent, path)


def _quantize(parent: Path, path: Path, method: str) -> None:
    from llmopt.quantizer import QuantizeOptions, quantize

    _fresh(path)
    quantize(parent, path, QuantizeOptions.int4() if method == "int4" else QuantizeOptions.int8())


def _fresh(path: Path) -> None:
    if path.exists():
        import shutil

        shutil.rmtree(path)


def _fidelity_line(package: Package) -> str:
    fidelity = package.manifest.fidelity or {}
    if "perplexity_delta_pct" not in fidelity:
        return "fidelity not measured"
    greedy = fidelity.get("greedy_agreement") or {}
    return (f"perplexity {fidelity['perplexity']:.2f} ({fidelity['perplexity_delta_pct']:+.2f}% "
            f"vs fp32), top-1 agreement {100 * fidelity['top1_agreement']:.1f}%, greedy "
            f"agreement {100 * greedy.get('mean_fraction', 0):.0f}% of {greedy.get('tokens')} "
            f"tokens, {package.size_bytes() / 1e6:.0f} MB")


def _bench(out: Path, packages: dict[str, Path], options: DemoOptions,
           say: Callable[[str], None]) -> tuple[str, list[Path]]:
    from llmopt.bench import parse_config, run_bench

    threads = options.threads or min(2, os.cpu_count() or 1)
    try:  # the PyTorch baseline loads the model again: no progress bars inside the demo's
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    config = parse_config({
        "name": "llmopt_demo",
        "description": "llmopt demo: PyTorch eager vs llmopt fp32, int8, int4 (batch 1, CPU)",
        "packages": {name: str(packages[name]) for name in ("fp32", "int8", "int4")},
        "providers": [{"name": "cpu", "options": {"intra_op_threads": threads}}],
        "pytorch": {"threads": threads},
        "matrix": {"targets": ["pytorch", "inprocess"], "batch_sizes": [1],
                   "prompt_lengths": [options.bench_prompt_tokens],
                   "new_tokens": [options.bench_new_tokens], "concurrency": [1]},
        "sweeps": [{"targets": ["pytorch"], "packages": ["fp32"]},
                   {"targets": ["inprocess"]}],
        "run": {"warmup": 1, "repetitions": options.bench_repetitions},
    }, where="demo bench")
    run = run_bench(config, out / "bench", progress=lambda line: say(f"      {line}"),
                    command="llmopt demo")
    return _table(run.records, packages), run.files


def _table(records: list[dict[str, Any]], packages: dict[str, Path]) -> str:
    rows = ["| runtime | TTFT ms | decode tokens/s | speedup vs PyTorch | perplexity vs fp32 "
            "| size MB |", "|---|---:|---:|---:|---:|---:|"]
    baseline = None
    reference = (Package.open(packages["int4"]).manifest.fidelity or {}).get(
        "reference_perplexity") if "int4" in packages else None
    order = list(packages)
    ordered = sorted(records, key=lambda r: (r["target"] != "pytorch", order.index(r["package"])
                                             if r["package"] in order else len(order)))
    for record in ordered:
        metrics = record.get("metrics") or {}
        decode = (metrics.get("decode_tokens_per_s") or {}).get("p50")
        ttft = (metrics.get("ttft_s") or {}).get("p50")
        if record["target"] == "pytorch":
            baseline = decode
            name, ppl, size = "PyTorch eager (transformers)", "", ""
        else:
            package = Package.open(packages[record["package"]])
            name = f"llmopt {record['package']}"
            fidelity = package.manifest.fidelity or {}
            ppl = (f"{fidelity['perplexity_delta_pct']:+.2f}%" if "perplexity_delta_pct"
                   in fidelity else f"{reference:.2f} (reference)" if reference else "reference")
            size = f"{package.size_bytes() / 1e6:.0f}"
        speedup = f"{decode / baseline:.2f}x" if decode and baseline else ""
        rows.append(f"| {name} | {'' if ttft is None else f'{1000 * ttft:.0f}'} | "
                    f"{'' if decode is None else f'{decode:.1f}'} | {speedup} | {ppl} | "
                    f"{size} |")
    return "\n".join(rows)


def summary_json(result: DemoResult) -> str:
    return json.dumps({"out_dir": str(result.out_dir), "answer": result.answer,
                       "answer_tokens": result.answer_tokens, "port": result.server_port,
                       "stage_seconds": result.stage_seconds, "reused": result.reused,
                       "bench_files": [str(f) for f in result.bench_files]}, indent=2)
