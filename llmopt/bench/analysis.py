"""Facts a run records beside its timings, for the comparison tables (``analysis`` in a config).

- ``bandwidth``: the read-bandwidth limit, probed before and after the sweep (the best probe
  counts), on the threads the models use.
- ``bytes_per_token``: each decoder's bytes read per decode step (:mod:`llmopt.bench.traffic`)
  at the mean context of the workload; with ``bandwidth``, each row's share of the limit.
- ``perplexity``: each decoder's perplexity on llmopt's evaluation text, computed by
  :func:`llmopt.evaluate.perplexity` for packages and GenAI folders alike (GenAI's graphs run
  in plain ONNX Runtime through :class:`llmopt.bench.genai.GenaiOnnxModel`), and its change
  against the ``reference`` package.
- ``cosine``: each encoder's pooled, normalized embeddings of 50 sentences against the
  ``reference`` package's (mean and minimum).
- ``memory``: peak RSS of a process running only that package (:mod:`llmopt.bench.rss_probe`;
  a GenAI worker is such a process already).
- ``compare``: ratio rows, package against package at the same workload.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from llmopt.bench.config import BenchConfig
from llmopt.bench.matrix import PackageInfo

Progress = Callable[[str], None]


class Analysis:
    """Probes around the sweep, then the per-package facts and the comparison rows."""

    def __init__(self, config: BenchConfig, progress: Progress) -> None:
        self.config = config
        self.options = config.analysis
        self.progress = progress
        self.threads = _threads(config)
        self.bandwidth: list[dict[str, Any]] = []

    def probe_bandwidth(self, when: str) -> None:
        if not self.options.bandwidth:
            return
        from llmopt.bench.bandwidth import measure_read_bandwidth

        probe = measure_read_bandwidth(self.threads).as_dict()
        self.bandwidth.append({"when": when, **probe})
        self.progress(f"analysis: read bandwidth {probe['bytes_per_s'] / 1e9:.1f} GB/s on "
                      f"{self.threads} thread(s) ({when})")

    def finish(self, packages: dict[str, PackageInfo],
               records: list[dict[str, Any]]) -> dict[str, Any]:
        facts = {label: self._package_facts(info, records)
                 for label, info in packages.items() if not info.missing}
        self._add_deltas(facts, packages)
        limit = max((b["bytes_per_s"] for b in self.bandwidth), default=None)
        # a PyTorch row runs the package's source, so the package's facts are not its own
        rows = [_row(rec, {} if rec["target"] == "pytorch" else facts.get(rec["package"], {}),
                     limit) for rec in records
                if rec["status"] == "ok" and rec["workload"]["concurrency"] == 1
                and rec["workload"]["request_rate"] is None]
        for row in rows:
            title = self.config.packages[row["package"]].title
            if title and row["target"] != "pytorch":
                row["title"] = title
        return {
            "threads": self.threads,
            "bandwidth": {"bytes_per_s": limit, "probes": self.bandwidth} if limit else None,
            "reference": self.options.reference,
            "packages": facts,
            "rows": rows,
            "ratios": _ratios(rows, self.options.compare),
        }

    def _package_facts(self, info: PackageInfo, records: list[dict[str, Any]]
                       ) -> dict[str, Any]:
        facts: dict[str, Any] = {"runtime": info.runtime, "precision": info.precision,
                                 "path": str(info.path)}
        mine = [r for r in records if r["package"] == info.label and r["target"] != "pytorch"]
        decoder = info.is_decoder
        if decoder and self.options.bytes_per_token:
            facts["traffic"] = _traffic(info, _cpu_kernels(self.config)).as_dict()
        if decoder and self.options.perplexity:
            self.progress(f"analysis: perplexity of {info.label}")
            facts.update(_perplexity(info, self.threads))
        if not decoder and self.options.cosine and self.options.reference:
            reference = self.config.packages[self.options.reference].path
            self.progress(f"analysis: cosine of {info.label} against {self.options.reference}")
            facts.update(_cosine(info, reference))
        if self.options.memory:
            facts["peak_rss_bytes"] = self._peak_rss(info, mine)
        return facts

    def _peak_rss(self, info: PackageInfo, records: list[dict[str, Any]]) -> int | None:
        if info.runtime == "genai":
            peaks = [(r.get("memory") or {}).get("worker_peak_rss_bytes") for r in records]
            return max((p for p in peaks if p), default=None)
        from llmopt.bench.rss_probe import probe_peak_rss

        workload = records[0]["workload"] if records else {"prompt_tokens": 128,
                                                           "new_tokens": 64, "batch_size": 1}
        self.progress(f"analysis: peak RSS of a process running only {info.label}")
        return probe_peak_rss(info.path, workload["prompt_tokens"],
                              max(workload["new_tokens"], 1), self.threads,
                              workload["batch_size"])

    def _add_deltas(self, facts: dict[str, dict[str, Any]],
                    packages: dict[str, PackageInfo]) -> None:
        reference = facts.get(self.options.reference or "")
        if not reference or "perplexity" not in reference:
            return
        for values in facts.values():
            if "perplexity" in values:
                values["perplexity_delta_pct"] = 100.0 * (
                    values["perplexity"] / reference["perplexity"] - 1)


def _threads(config: BenchConfig) -> int:
    for provider in config.providers.values():
        if provider.name == "cpu" and provider.options.get("intra_op_threads"):
            return int(provider.options["intra_op_threads"])
    return config.pytorch.threads or 1


def _cpu_kernels(config: BenchConfig) -> bool:
    """Whether the run's CPU sessions ran on llmopt's kernels (built here, not turned off)."""
    from llmopt.runtime import kernels

    cpu = [p for p in config.providers.values() if p.name == "cpu"]
    return bool(cpu) and all(p.options.get("kernels") is not False for p in cpu) \
        and kernels.library() is not None


def _traffic(info: PackageInfo, cpu_kernels: bool = False) -> Any:
    """Bytes per token of the graph the session ran: with llmopt's CPU kernels, the rewritten
    one (their weight layouts, without the correction nodes)."""
    import onnx

    from llmopt.bench.traffic import model_traffic

    if info.runtime == "genai":
        from llmopt.bench.genai import genai_traffic

        return genai_traffic(info.path)
    from llmopt.package import Package
    from llmopt.runtime import kernels

    package = Package.open(info.path)
    if not cpu_kernels:
        return model_traffic(package.model_path)
    proto = onnx.load(str(package.model_path), load_external_data=False)
    kernels.kernel_model(proto, package.path, threads=1, blobs={})
    return model_traffic(proto)


def _perplexity(info: PackageInfo, threads: int) -> dict[str, Any]:
    from llmopt.evaluate import perplexity

    if info.runtime == "genai":
        from transformers import AutoTokenizer

        from llmopt.bench.genai import GenaiOnnxModel

        return perplexity(GenaiOnnxModel(info.path, threads),
                          AutoTokenizer.from_pretrained(str(info.path)))
    import llmopt

    runner: Any = llmopt.load(info.path, ["cpu"],
                              provider_options={"cpu": {"intra_op_threads": threads}})
    return perplexity(runner.model, runner.tokenizer)


def cosine_sentences() -> list[str]:
    """llmopt's 20 evaluation sentences and the first 30 of the held-out evaluation text."""
    from llmopt.evaluate import EVAL_SENTENCES, eval_text

    held_out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", eval_text())
                if len(s.split()) > 4][:30]
    return [*EVAL_SENTENCES, *held_out]


def _cosine(info: PackageInfo, reference: Any) -> dict[str, Any]:
    import numpy as np

    import llmopt

    texts = cosine_sentences()
    got = llmopt.load(info.path, ["cpu"]).embed(texts, normalize=True)  # type: ignore[union-attr]
    want = llmopt.load(reference, ["cpu"]).embed(texts, normalize=True)  # type: ignore[union-attr]
    cosine = np.sum(np.asarray(got) * np.asarray(want), axis=1)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "cosine_sentences": len(texts)}


def _row(record: dict[str, Any], facts: dict[str, Any], limit: float | None) -> dict[str, Any]:
    """One measured point with its package's facts: what the comparison tables print."""
    metrics, workload = record["metrics"], record["workload"]
    row: dict[str, Any] = {"id": record["id"], "target": record["target"],
                           "package": record["package"], "precision": record["precision"],
                           "workload": workload}
    if record["task"] != "text-generation":
        row.update({"latency_s": metrics["latency_s"]["p50"],
                    "sequences_per_s": metrics["sequences_per_s"]["p50"]})
        for key in ("cosine_mean", "cosine_min", "peak_rss_bytes"):
            row[key] = facts.get(key)
        return row
    decode = metrics["decode_tokens_per_s"]["p50"]
    row.update({"decode_tokens_per_s": decode, "ttft_s": metrics["ttft_s"]["p50"],
                "prefill_tokens_per_s": metrics["prefill_tokens_per_s"]["p50"],
                "peak_rss_bytes": facts.get("peak_rss_bytes"),
                "perplexity": facts.get("perplexity"),
                "perplexity_delta_pct": facts.get("perplexity_delta_pct")})
    traffic = facts.get("traffic")
    if traffic:
        from llmopt.bench.traffic import Traffic, mean_decode_context

        context = mean_decode_context(workload["prompt_tokens"], workload["new_tokens"])
        row["bytes_per_token"] = Traffic(**traffic).bytes_per_token(context)
        if limit and decode:
            from llmopt.bench.bandwidth import fraction_of_limit

            row["bandwidth_fraction"] = fraction_of_limit(row["bytes_per_token"], decode, limit)
    return row


def _ratios(rows: list[dict[str, Any]], compare: Mapping[str, str]) -> list[dict[str, Any]]:
    """``package`` against ``against`` at each workload both were measured at (not PyTorch
    rows): throughput ratios > 1 mean faster, time ratios < 1 mean faster."""
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        w = row["workload"]
        return (w["batch_size"], w["prompt_tokens"], w["new_tokens"])

    measured = {(r["package"], key(r)): r for r in rows if r["target"] != "pytorch"}
    out = []
    for (package, shape), mine in measured.items():
        against = compare.get(package)
        theirs = measured.get((against, shape)) if against else None
        if theirs is None:
            continue
        ratio: dict[str, Any] = {"package": package, "against": against,
                                 "workload": mine["workload"]}
        for name in ("decode_tokens_per_s", "prefill_tokens_per_s", "sequences_per_s",
                     "ttft_s", "latency_s"):
            if mine.get(name) and theirs.get(name):
                ratio[name] = mine[name] / theirs[name]
        out.append(ratio)
    return out
