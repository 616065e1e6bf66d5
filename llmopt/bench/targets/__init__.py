"""Bench targets: the same workload through PyTorch, llmopt in-process, or a llmopt server.

:class:`TargetPool` loads each target once, on first use, and remembers a load failure, so
every point of a target that cannot load fails with the same recorded error.
"""

from __future__ import annotations

from typing import Any

from llmopt.bench.config import BenchConfig
from llmopt.bench.matrix import PackageInfo, Point
from llmopt.bench.targets.base import Target, Timing

__all__ = ["Target", "TargetPool", "Timing"]


class TargetPool:
    def __init__(self, config: BenchConfig, packages: dict[str, PackageInfo],
                 points: list[Point]) -> None:
        self.config = config
        self.packages = packages
        self.points = points
        self.targets: dict[tuple[str, str, str], Any] = {}
        self.failures: dict[tuple[str, str, str], BaseException] = {}
        self._servers: dict[str, Any] = {}
        self._server_failures: dict[str, BaseException] = {}
        self._tokenizers: dict[str, Any] = {}

    def get(self, point: Point) -> Target:
        group = point.group
        if group in self.failures:
            raise self.failures[group]
        if group not in self.targets:
            try:
                self.targets[group] = self._load(point)
            except BaseException as exc:
                self.failures[group] = exc
                raise
        target: Target = self.targets[group]
        return target

    def tokenizer(self, label: str) -> Any:
        """The package's tokenizer, which builds every target's inputs for that package."""
        if label not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[label] = AutoTokenizer.from_pretrained(
                str(self.packages[label].path))
        return self._tokenizers[label]

    def close(self, group: tuple[str, str, str] | None = None) -> None:
        """Close one group's target, or everything (servers included)."""
        groups = [group] if group else list(self.targets)
        for key in groups:
            target = self.targets.pop(key, None)
            if target is not None:
                target.close()
        if group is None:
            for server in self._servers.values():
                server.close()
            self._servers.clear()

    def servers(self) -> list[Any]:
        return list(self._servers.values())

    def _load(self, point: Point) -> Any:
        info = self.packages[point.package]
        run = self.config.run
        if point.target == "pytorch":
            from llmopt.bench.targets.pytorch import PytorchTarget

            source = self.config.pytorch.source or info.source
            if not source:
                raise ValueError(f"package {info.label!r} records no source for the PyTorch "
                                 "baseline; set pytorch.source in the config")
            return PytorchTarget(source, info.task, self.config.pytorch)
        provider = self.config.providers[point.provider]
        lookup = self.config.packages[point.package].prompt_lookup
        if lookup and point.target != "inprocess":
            raise ValueError(f"package {info.label!r} sets prompt_lookup, which the bench "
                             "passes to in-process points only; measure it with the inprocess "
                             "target, or a server with `python bench/prompt_lookup.py --served`")
        if point.target == "genai":
            from llmopt.bench.targets.genai import GenaiTarget

            return GenaiTarget(info.path, provider, self.config.genai,
                               self.tokenizer(point.package))
        if point.target == "inprocess":
            from llmopt.bench.targets.inprocess import InProcessTarget

            return InProcessTarget(info.path, provider, run.strict_providers, self.config.engine,
                                   lookup)
        from llmopt.bench.targets.served import ServedTarget, connect

        server = self._server(point.provider)
        address = str(server.address if server else self.config.server.address)
        client = connect(address, self.config.server.token)
        try:
            client.wait_ready([point.package], self.config.server.startup_timeout_s)
            return ServedTarget(client, point.package, self.tokenizer(point.package),
                                options=self.config.server, server=server,
                                timeout=run.request_timeout_s)
        except BaseException:
            client.close()
            if server is not None:
                server.check_alive()  # a crashed server explains itself better
            raise

    def _server(self, provider_label: str) -> Any:
        """The server the harness started for this provider (one per provider, serving every
        package that has server points), or None when the config gives an address."""
        if self.config.server.address:
            return None
        if provider_label in self._server_failures:
            raise self._server_failures[provider_label]
        if provider_label not in self._servers:
            from llmopt.bench.targets.server_process import ServerProcess

            labels = sorted({p.package for p in self.points
                             if p.target == "server" and p.provider == provider_label
                             and not self.packages[p.package].missing})
            paths = {label: self.packages[label].path for label in labels}
            try:
                self._servers[provider_label] = ServerProcess(
                    paths, self.config.providers[provider_label], self.config.server,
                    self.config.run.strict_providers)
            except BaseException as exc:
                self._server_failures[provider_label] = exc
                raise
        return self._servers[provider_label]
