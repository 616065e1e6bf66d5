"""Start ``llmopt serve`` in a child process: the one launcher of bench servers.

:func:`launch_server` runs ``llmopt serve`` with the arguments given (``--port 0`` lets the
kernel pick a free port) and waits for the address the server announces on its first lines
(``listening on HOST:PORT``, and ``http on URL`` when the HTTP door is on), so nothing races
for a port and nothing reads the CLI's parser. :class:`ServerProcess` is the bench target's
server: it serves a temporary repository of links to the benchmarked packages, each with a
``llmopt-serve.yaml`` naming the provider under test (the packages are never written to). The
server runs in its own process (as in production), so its Python threads do not share the
bench client's interpreter lock.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from llmopt.bench import memory
from llmopt.bench.config import ProviderSpec, ServerOptions
from llmopt.errors import LlmoptError

GRPC_ANNOUNCE = re.compile(r"listening on (\S+)")
HTTP_ANNOUNCE = re.compile(r"http on (\S+)")


class LaunchedServer:
    """A running ``llmopt serve``: its process, gRPC address and (if on) HTTP URL. Its output
    goes to ``log_path`` when given; its last lines are kept for error messages."""

    def __init__(self, process: subprocess.Popen[str], want_http: bool,
                 log_path: Path | None) -> None:
        self.process = process
        self.address: str | None = None
        self.http_url: str | None = None
        self._want_http = want_http
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        self._log = log_path.open("w") if log_path else None
        self._announced = threading.Event()
        self._drain = threading.Thread(target=self._read, name="llmopt-serve-log", daemon=True)
        self._drain.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_announced(self, timeout: float) -> None:
        if not self._announced.wait(timeout):
            self.close()
            raise LlmoptError(f"llmopt serve announced no address within {timeout:.0f} s: "
                              f"{self.log_tail()}", fix="see the server's output above")
        if self.address is None or (self._want_http and self.http_url is None):
            self.close()
            raise LlmoptError(f"llmopt serve exited with code {self.process.returncode} before "
                              f"listening: {self.log_tail()}", fix="see the server's error above")

    def log_tail(self, lines: int = 5) -> str:
        return " | ".join(list(self._tail)[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise LlmoptError(f"the llmopt server exited with code {self.process.returncode}: "
                              f"{self.log_tail()}", fix="see the server's error above")

    def close(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._drain.join(timeout=5)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._tail.append(line.rstrip())
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            grpc, http = GRPC_ANNOUNCE.search(line), HTTP_ANNOUNCE.search(line)
            self.address = self.address or (grpc.group(1) if grpc else None)
            self.http_url = self.http_url or (http.group(1) if http else None)
            if self.address and (self.http_url or not self._want_http):
                self._announced.set()
        if self._log is not None:
            self._log.close()
        self._announced.set()  # the server exited: wait_announced says so


def launch_server(args: list[str], *, log_path: Path | None = None, timeout: float = 300.0,
                  env: dict[str, str] | None = None) -> LaunchedServer:
    """Run ``llmopt serve ARGS`` and return once it announced its address (and its HTTP URL
    when ``--http-port`` is among ``args``). Pass ``--port 0`` for a free port."""
    command = [sys.executable, "-m", "llmopt.cli.main", "serve", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
    server = LaunchedServer(process, "--http-port" in args, log_path)
    server.wait_announced(timeout)
    return server


def _link(source: Path, target: Path) -> None:
    """``source`` in the repository: a copy for files (ONNX Runtime refuses a weights file,
    model.onnx.data, behind a symbolic link or with more than one hard link), a symbolic
    link for folders."""
    import shutil

    if source.is_dir():
        target.symlink_to(source, target_is_directory=True)
    else:
        shutil.copy2(source, target)


class ServerProcess:
    def __init__(self, packages: dict[str, Path], provider: ProviderSpec,
                 options: ServerOptions, strict: bool) -> None:
        import yaml

        self._dir = tempfile.TemporaryDirectory(prefix="llmopt-bench-repo-")
        repo = Path(self._dir.name)
        for label, path in packages.items():
            model = repo / label
            model.mkdir()
            for item in Path(path).resolve().iterdir():
                if item.name != "llmopt-serve.yaml":
                    _link(item, model / item.name)
            serve = {"providers": [provider.name], "strict_providers": strict,
                     "provider_options": {provider.name: dict(provider.options)},
                     "max_batch_size": options.max_batch_size, "max_queue": 4096,
                     "prefix_cache_bytes": options.prefix_cache_bytes, "warmup": True}
            (model / "llmopt-serve.yaml").write_text(yaml.safe_dump(serve))
        self.log_path = repo / "server.log"
        try:
            # --no-metrics: the metrics port is fixed, and would clash between servers
            self.server = launch_server(
                ["--model-repository", str(repo), "--port", "0", "--no-metrics"],
                log_path=self.log_path, timeout=options.startup_timeout_s)
        except BaseException:
            self._dir.cleanup()
            raise
        self.process = self.server.process
        self.address = str(self.server.address)
        self.models = list(packages)

    def check_alive(self) -> None:
        self.server.check_alive()

    def log_tail(self, lines: int = 5) -> str:
        return self.server.log_tail(lines)

    def memory(self) -> dict[str, Any]:
        pid = self.process.pid
        return {"server_peak_rss_bytes": memory.peak_rss_bytes(pid),
                "server_rss_bytes": memory.rss_bytes(pid),
                "server_gpu_memory_bytes": memory.gpu_memory_bytes(pid)}

    def reset_peak(self) -> bool:
        return memory.reset_peak(self.process.pid)

    def close(self) -> None:
        self.server.close()
        self._dir.cleanup()
