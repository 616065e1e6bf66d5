"""ONNX Runtime GenAI as a bench target: a worker process in GenAI's own environment.

The worker (:mod:`llmopt.bench.genai_worker`) loads one model folder and generates the token
ids it is sent; it times each request itself, from creating the generator to each token, and
the target lays those times onto the request's ``issued`` clock, so the pipe between the two
processes (tens of microseconds) is outside the numbers, as the client side is for the other
targets. Peak RSS is the worker's: a process that holds this one model.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from llmopt.bench.config import GenaiOptions, ProviderSpec
from llmopt.bench.targets.base import Timing, TokenClock, timing_from_clocks
from llmopt.errors import InvalidInputError, LlmoptError

WORKER = Path(__file__).resolve().parent.parent / "genai_worker.py"


class GenaiTarget:
    name = "genai"
    supports_concurrency = False

    def __init__(self, model_dir: Path, provider: ProviderSpec, options: GenaiOptions,
                 tokenizer: Any) -> None:
        if provider.name != "cpu":
            raise InvalidInputError(f"the genai target runs on the CPU, not {provider.name}",
                                    fix="give the genai points the cpu provider")
        python = Path(options.python).expanduser()
        if not python.is_file():
            raise LlmoptError(
                f"no Python for ONNX Runtime GenAI at {python}",
                fix="run `python bench/reference_genai.py` once (it creates .venv-genai), or "
                "set genai.python in the config")
        self.tokenizer = tokenizer
        self.threads = int(provider.options.get("intra_op_threads") or 1)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        command = [str(python), str(WORKER), str(Path(model_dir).resolve()),
                   "--threads", str(self.threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, text=True, bufsize=1,
                                        env={**os.environ, "PYTHONNOUSERSITE": "1"})
        ready = self._reply()
        self.versions = ready.get("versions", {})
        self.peak_rss: int | None = None

    def info(self) -> dict[str, Any]:
        return {"library": "onnxruntime-genai", "versions": self.versions,
                "session": {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1},
                "worker_pid": self.process.pid}

    def decode(self, prompts: list[list[int]], new_tokens: int, issued: float) -> Timing:
        if len(prompts) != 1:
            raise InvalidInputError("the genai target generates one prompt per request",
                                    fix="use batch_sizes [1] for genai points")
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"prompt": prompts[0],
                                             "new_tokens": new_tokens}) + "\n")
        reply = self._reply()
        clock = TokenClock()
        for at in reply["times_s"]:
            clock.tick(at=issued + at)
        self.peak_rss = reply.get("peak_rss_bytes") or self.peak_rss
        ended = issued + (reply["times_s"][-1] if reply["times_s"] else 0.0)
        return timing_from_clocks([clock], issued, ended, len(prompts[0]))

    def encode(self, texts: list[str], issued: float) -> Timing:
        raise InvalidInputError("the genai target runs decoders only",
                                fix="leave encoder packages out of genai points")

    def memory(self) -> dict[str, Any]:
        return {"worker_peak_rss_bytes": self.peak_rss}

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the worker answers or exits
        if not line:
            self.process.wait()
            raise LlmoptError(f"the GenAI worker exited with code {self.process.returncode}: "
                              f"{self._log_tail()}", fix="see the worker's error above; "
                              "check .venv-genai with `python bench/reference_genai.py`")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise LlmoptError(f"ONNX Runtime GenAI failed: {reply['error']}",
                              fix="see the message; check the model folder")
        return reply

    def _log_tail(self, lines: int = 5) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])
