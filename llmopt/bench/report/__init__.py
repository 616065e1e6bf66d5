"""Write a bench run's outputs: results.json, results.csv, summary.md and plots/*.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llmopt.bench.report.tables import to_csv, to_markdown
from llmopt.errors import InvalidInputError, MissingDependencyError

log = logging.getLogger("llmopt.bench")

__all__ = ["SUMMARY_NAME", "read_results", "to_csv", "to_markdown", "write_reports"]

SUMMARY_NAME = "summary.md"  # the Markdown tables people read; `llmopt bench` prints it


def write_reports(results: dict[str, Any], out_dir: Path, plots: bool = True) -> list[Path]:
    """Write every output into ``out_dir``; returns the files written. Without matplotlib the
    plots are left out with a warning saying how to get them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "results.json", out_dir / "results.csv", out_dir / SUMMARY_NAME]
    files[0].write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    files[1].write_text(to_csv(results["records"]))
    markdown = to_markdown(results)
    if plots:
        from llmopt.bench.report.plots import write_plots

        try:
            written, skipped = write_plots(results["records"], out_dir / "plots")
        except MissingDependencyError as exc:
            log.warning("bench: no plots: %s", exc)
            written, skipped = [], [f"all: {exc}"]
        files += written
        if written:
            markdown += "\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in written) + "\n"
        if skipped:
            markdown += "\nPlots not drawn:\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n"
    files[2].write_text(markdown)
    return files


def read_results(path: str | Path) -> dict[str, Any]:
    """Load a results.json, checking that it is one and that this llmopt can read it."""
    from llmopt.bench.schema import KIND, SCHEMA_VERSION

    file = Path(path)
    if file.is_dir():
        file = file / "results.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"{file} does not exist",
                                fix="pass a results.json written by `llmopt bench`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{file} is not readable JSON: {exc}",
                                fix="pass a results.json written by `llmopt bench`") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise InvalidInputError(f"{file} is not llmopt bench results",
                                fix="pass a results.json written by `llmopt bench`")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise InvalidInputError(f"{file} has results schema version {version!r}; this llmopt "
                                f"reads up to {SCHEMA_VERSION}", fix="upgrade llmopt")
    return data


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)
