"""PNG plots of a bench run (matplotlib, Agg backend: no display needed).

Each plot is drawn only when the run has the points it needs (e.g. throughput vs concurrency
needs more than one concurrency level); ``write_plots`` returns what it wrote and why it skipped
the rest. One colour per series (target:package:provider) in every plot.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from llmopt.errors import MissingDependencyError

Record = dict[str, Any]


def write_plots(records: list[Record], out_dir: Path) -> tuple[list[Path], list[str]]:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("matplotlib", "bench") from None
    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r["status"] == "ok" and r["metrics"]]
    decoders = [r for r in ok if r["task"] == "text-generation"]
    encoders = [r for r in ok if r["task"] != "text-generation"]
    colors = _colors(sorted({r["series"] for r in ok}))
    written, skipped = [], []
    for name, draw, rows in (
            ("latency_vs_batch.png", _latency_vs_batch, decoders),
            ("encoder_latency_vs_batch.png", _encoder_latency, encoders),
            ("throughput_vs_concurrency.png", _throughput_vs_concurrency, ok),
            ("ttft_itl_distributions.png", _distributions, decoders),
            ("speedup_over_pytorch.png", _speedup, ok),
            ("throughput_latency_pareto.png", _pareto, decoders)):
        reason = draw(rows, colors, out_dir / name) if rows else "no measured points of its kind"
        if reason is None:
            written.append(out_dir / name)
        else:
            skipped.append(f"{name}: {reason}")
    return written, skipped


def _colors(series: list[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    return {s: cmap(i % cmap.N) for i, s in enumerate(series)}


def _closed_loop(rows: list[Record]) -> list[Record]:
    return [r for r in rows if r["workload"]["concurrency"] == 1
            and r["workload"]["request_rate"] is None]


def _by(rows: list[Record], *keys: str) -> dict[Any, list[Record]]:
    groups: dict[Any, list[Record]] = defaultdict(list)
    for r in rows:
        value = tuple(r["workload"][k] if k in r["workload"] else r[k] for k in keys)
        groups[value if len(value) > 1 else value[0]].append(r)
    return dict(sorted(groups.items(), key=lambda kv: _order(kv[0])))


def _order(key: Any) -> tuple[Any, ...]:
    """Sort numbers as numbers (8 before 16), None first, strings after."""
    parts = key if isinstance(key, tuple) else (key,)
    return tuple((0, 0) if v is None else (1, v) if isinstance(v, int | float) else (2, str(v))
                 for v in parts)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series_lines(ax: Any, rows: list[Record], x_key: str, metric: str, scale: float, *,
                  colors: dict[str, Any], stat: str = "p50", band: str | None = "p90") -> None:
    for series, group in _by(rows, "series").items():
        points = sorted(group, key=lambda r: r["workload"][x_key])
        xs = [r["workload"][x_key] for r in points]
        ys = [r["metrics"][metric][stat] * scale for r in points]
        ax.plot(xs, ys, "o-", color=colors[series], label=series)
        if band:
            tops = [r["metrics"][metric][band] * scale for r in points]
            ax.vlines(xs, ys, tops, color=colors[series], alpha=0.5)


def _latency_vs_batch(rows: list[Record], colors: dict[str, Any], path: Path) -> str | None:
    import matplotlib.pyplot as plt

    rows = _closed_loop(rows)
    if len({r["workload"]["batch_size"] for r in rows}) < 2:
        return "needs two or more batch sizes at concurrency 1"
    by_prompt = _by(rows, "prompt_tokens", "new_tokens")
    fig, axes = plt.subplots(2, len(by_prompt), figsize=(5.5 * len(by_prompt), 8), squeeze=False)
    for col, ((prompt, new), group) in enumerate(by_prompt.items()):
        top, bottom = axes[0][col], axes[1][col]
        _series_lines(top, group, "batch_size", "e2e_s", 1.0, colors=colors)
        _series_lines(bottom, group, "batch_size", "itl_s", 1000.0, colors=colors)
        top.set_title(f"prompt {prompt} tokens, {new} new tokens")
        top.set_ylabel("end-to-end latency per request (s)\np50, bar to p90")
        bottom.set_ylabel("inter-token latency (ms)\np50, bar to p90")
        for ax in (top, bottom):
            ax.set_xlabel("batch size (prompts per request)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["workload"]["batch_size"] for r in group}))
            ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Latency vs batch size (lower is better)")
    _save(fig, path)
    return None


def _encoder_latency(rows: list[Record], colors: dict[str, Any], path: Path) -> str | None:
    import matplotlib.pyplot as plt

    rows = _closed_loop(rows)
    if len({r["workload"]["batch_size"] for r in rows}) < 2:
        return "needs two or more batch sizes at concurrency 1"
    by_len = _by(rows, "prompt_tokens")
    fig, axes = plt.subplots(1, len(by_len), figsize=(5.5 * len(by_len), 4.5), squeeze=False)
    for ax, (length, group) in zip(axes[0], by_len.items(), strict=True):
        _series_lines(ax, group, "batch_size", "latency_s", 1000.0, colors=colors)
        ax.set_title(f"sequences of <= {length} tokens")
        ax.set_xlabel("batch size (texts per request)")
        ax.set_ylabel("latency per request (ms), p50, bar to p90")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["workload"]["batch_size"] for r in group}))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Encoder latency vs batch size (lower is better)")
    _save(fig, path)
    return None


def _throughput_vs_concurrency(rows: list[Record], colors: dict[str, Any],
                               path: Path) -> str | None:
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["workload"]["request_rate"] is None]
    if len({r["workload"]["concurrency"] for r in rows}) < 2:
        return "needs two or more concurrency levels"
    groups = _by(rows, "batch_size", "prompt_tokens", "new_tokens")
    groups = {k: g for k, g in groups.items()
              if len({r["workload"]["concurrency"] for r in g}) > 1}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False)
    for ax, ((batch, prompt, new), group) in zip(axes[0], groups.items(), strict=True):
        decoder = group[0]["task"] == "text-generation"
        metric = "output_tokens_per_s" if decoder else "sequences_per_s"
        levels: set[int] = set()
        for series, members in _by(group, "series").items():
            points = sorted(members, key=lambda r: r["workload"]["concurrency"])
            if len(points) < 2:
                continue  # a lone point (e.g. the PyTorch baseline) is no curve
            levels.update(r["workload"]["concurrency"] for r in points)
            ax.plot([r["workload"]["concurrency"] for r in points],
                    [r["metrics"][metric]["mean"] for r in points], "o-",
                    color=colors[series], label=series)
        ax.set_title(f"batch {batch}, prompt {prompt}, {new} new" if decoder
                     else f"batch {batch}, sequences of <= {prompt} tokens")
        ax.set_xticks(sorted(levels))
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s (all requests)" if decoder else "sequences/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Throughput vs concurrency (higher is better)")
    _save(fig, path)
    return None


def _distributions(rows: list[Record], colors: dict[str, Any], path: Path) -> str | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r for r in _closed_loop(rows) if r["workload"]["batch_size"] == 1 and r["samples"]]
    if not rows:
        return "needs batch-1 points at concurrency 1"
    by_prompt = _by(rows, "prompt_tokens")
    fig, axes = plt.subplots(2, len(by_prompt), figsize=(5.5 * len(by_prompt), 8), squeeze=False)
    for col, (prompt, group) in enumerate(by_prompt.items()):
        for row, (key, label) in enumerate((("ttft_s", "time to first token (ms)"),
                                             ("itl_s", "inter-token latency (ms)"))):
            ax = axes[row][col]
            for r in sorted(group, key=lambda r: r["series"]):
                values = sorted(v * 1000 for v in r["samples"][key])
                if values:
                    ys = [(i + 1) / len(values) for i in range(len(values))]
                    ax.step(values, ys, where="post", color=colors[r["series"]],
                            label=f"{r['series']} (n={len(values)})")
                    if len(values) <= 20:  # few samples: show each (one alone draws no step)
                        ax.plot(values, ys, "o", color=colors[r["series"]], markersize=4)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(label + ", log scale")
            ax.set_ylabel("fraction of samples <= x")
            ax.set_ylim(0, 1.03)
            ax.set_title(f"batch 1, prompt {prompt} tokens")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle("TTFT and inter-token latency distributions (left is better)")
    _save(fig, path)
    return None


def _speedup(rows: list[Record], colors: dict[str, Any], path: Path) -> str | None:
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("speedup_over_pytorch")]
    if not rows:
        return "needs PyTorch baseline points with matching workloads"
    decoder = rows[0]["task"] == "text-generation"
    rows = [r for r in rows if (r["task"] == "text-generation") == decoder]
    keys = (("e2e", "end-to-end latency"), ("decode_tokens_per_s", "decode tokens/s")) \
        if decoder else (("latency", "latency"),)
    workloads = sorted({(r["workload"]["batch_size"], r["workload"]["prompt_tokens"])
                        for r in rows})
    series = sorted({r["series"] for r in rows})
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(6.0, 1.6 * len(workloads)) * len(keys),
                                                    4.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for i, s in enumerate(series):
            values = {(r["workload"]["batch_size"], r["workload"]["prompt_tokens"]):
                      r["speedup_over_pytorch"].get(key) for r in rows if r["series"] == s}
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(workloads))]
            ax.bar(xs, [values.get(w) or 0 for w in workloads], width, color=colors[s], label=s)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xticks(range(len(workloads)), [f"b{b} p{p}" for b, p in workloads])
        ax.set_xlabel("workload (batch size, prompt or sequence tokens)")
        ax.set_ylabel(f"speedup in {label} (x PyTorch)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Speedup over transformers eager PyTorch (above the dashed line: faster)")
    _save(fig, path)
    return None


def _pareto(rows: list[Record], colors: dict[str, Any], path: Path) -> str | None:
    import matplotlib.pyplot as plt

    points = [(r["metrics"]["itl_s"]["p50"] * 1000, r["metrics"]["output_tokens_per_s"]["mean"],
               r) for r in rows if r["metrics"]["itl_s"]["p50"]]
    if len(points) < 2:
        return "needs two or more decoder points"
    fig, ax = plt.subplots(figsize=(8.5, 6))
    seen = set()
    for x, y, r in points:
        label = r["series"] if r["series"] not in seen else None
        seen.add(r["series"])
        ax.scatter(x, y, color=colors[r["series"]], label=label, s=36, zorder=3)
    frontier, best = [], -1.0
    for x, y, r in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            frontier.append((x, y, r))
            best = y
    ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="gray",
            linestyle="--", label="Pareto frontier", zorder=2)
    for x, y, r in frontier:
        w = r["workload"]
        ax.annotate(f"{r['package']} b{w['batch_size']} p{w['prompt_tokens']} "
                    f"c{w['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("inter-token latency p50 (ms, lower is better)")
    ax.set_ylabel("output tokens/s (higher is better)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Throughput vs latency: every decoder point; frontier = best trade-offs")
    _save(fig, path)
    return None
