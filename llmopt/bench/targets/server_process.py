"""Start ``llmopt serve`` in a child process over a repository of the benchmarked packages.

The server runs in its own process (as in production), so its Python threads do not share the
bench client's interpreter lock. The repository is a temporary folder of links to the package
files plus a ``llmopt-serve.yaml`` per model with the provider under test; the packages
themselves are never written to.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmopt.bench import memory
from llmopt.bench.config import ProviderSpec, ServerOptions
from llmopt.errors import LlmoptError, UnsupportedError


class ServerProcess:
    def __init__(self, packages: dict[str, Path], provider: ProviderSpec,
                 options: ServerOptions, strict: bool) -> None:
        if importlib.util.find_spec("llmopt.cli.cmd_serve") is None:
            raise UnsupportedError(
                "this llmopt has no `llmopt serve` command yet, so the harness cannot start a "
                "server", fix="set server.address to a running llmopt server, or leave the "
                "server target out")
        import yaml

        self._dir = tempfile.TemporaryDirectory(prefix="llmopt-bench-repo-")
        repo = Path(self._dir.name)
        for label, path in packages.items():
            model = repo / label
            model.mkdir()
            for item in Path(path).resolve().iterdir():
                if item.name != "llmopt-serve.yaml":
                    (model / item.name).symlink_to(item)
            serve = {"providers": [provider.name], "strict_providers": strict,
                     "provider_options": {provider.name: dict(provider.options)},
                     "max_batch_size": options.max_batch_size, "max_queue": 4096,
                     "warmup": True}
            (model / "llmopt-serve.yaml").write_text(yaml.safe_dump(serve))
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.log_path = repo / "server.log"
        command = [sys.executable, "-m", "llmopt.cli.main", "serve",
                   *_serve_args(str(repo), port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env)
        self.models = list(packages)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise LlmoptError(f"the llmopt server exited with code {self.process.returncode}: "
                              f"{self.log_tail()}", fix="see the server's error above")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def memory(self) -> dict[str, Any]:
        pid = self.process.pid
        return {"server_peak_rss_bytes": memory.peak_rss_bytes(pid),
                "server_rss_bytes": memory.rss_bytes(pid),
                "server_gpu_memory_bytes": memory.gpu_memory_bytes(pid)}

    def reset_peak(self) -> bool:
        return memory.reset_peak(self.process.pid)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._dir.cleanup()


def _serve_args(repo: str, port: int) -> list[str]:
    """Arguments for ``llmopt serve``, read off its parser (so a renamed flag fails loudly)."""
    module = importlib.import_module("llmopt.cli.cmd_serve")
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {s for a in serve.choices["serve"]._actions for s in a.option_strings}
    args = ["--model-repository", repo] if "--model-repository" in flags else [repo]
    if "--no-metrics" in flags:
        args.append("--no-metrics")  # its fixed default port would clash between servers
    if "--address" in flags:
        return [*args, "--address", f"127.0.0.1:{port}"]
    if "--port" in flags:
        host = ["--host", "127.0.0.1"] if "--host" in flags else []
        return [*args, *host, "--port", str(port)]
    raise UnsupportedError("`llmopt serve` takes neither --address nor --port",
                           fix="start the server yourself and set server.address")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
