"""Worker that generates with ONNX Runtime GenAI, run in GenAI's own environment.

    .venv-genai/bin/python llmopt/bench/genai_worker.py MODEL_DIR [--threads N]

onnxruntime-genai brings its own onnxruntime, which cannot share a process (or a venv) with
llmopt's onnxruntime-gpu, so the bench target :class:`llmopt.bench.targets.genai.GenaiTarget`
runs this file with that environment's Python. It imports only the standard library and
``onnxruntime_genai``; llmopt is not installed there.

Protocol, one JSON object per line: the worker prints ``{"ready": true, "versions": ...}``
once the model is loaded, then answers each request ``{"prompt": [ids], "new_tokens": N}``
with ``{"times_s": [...], "tokens": [...], "peak_rss_bytes": N}``: greedy, EOS held off
(``min_length = max_length``), ``times_s[i]`` the seconds from the request's start (creating
the generator, which allocates the KV cache, as llmopt's Generator does inside its clock) to
token ``i`` being available. Errors come back as ``{"error": "..."}`` and the worker goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # llmopt/bench/ is not a package root: keep its modules from shadowing

import argparse
import json
import time
from typing import Any


def peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load(model_dir: str, threads: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    config.clear_providers()  # CPU
    session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    return og.Model(config)


def generate(model: Any, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    total = len(prompt) + new_tokens
    start = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total,
                              batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    times: list[float] = []
    while len(times) < new_tokens and not generator.is_done():
        generator.generate_next_token()
        times.append(time.perf_counter() - start)
    sequence = [int(t) for t in generator.get_sequence(0)]
    return {"times_s": times, "tokens": sequence[len(prompt):],
            "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import onnxruntime
    import onnxruntime_genai as og

    model = load(args.model_dir, args.threads)
    versions = {"onnxruntime_genai": og.__version__, "onnxruntime": onnxruntime.__version__,
                "python": sys.version.split()[0]}
    print(json.dumps({"ready": True, "versions": versions}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            reply = generate(model, [int(t) for t in request["prompt"]],
                             int(request["new_tokens"]))
        except Exception as exc:  # noqa: BLE001  (reported to the bench, which records it)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
