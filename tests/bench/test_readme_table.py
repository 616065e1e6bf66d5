"""The README's headline speed table is generated from the committed vs_genai run."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmopt.bench.report import read_results
from llmopt.bench.report.readme import END, START, current_block, headline, replace_block
from llmopt.errors import InvalidInputError

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "vs_genai" / "results.json"


def test_the_readme_table_is_what_the_committed_run_generates() -> None:
    results = read_results(RESULTS)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert current_block(readme) == headline(results), (
        "README's table differs from the committed run: `llmopt bench readme "
        "bench/results/vs_genai README.md`")


def test_the_generated_table_holds_every_measured_runtime() -> None:
    results = read_results(RESULTS)
    table = headline(results)
    for row in results["analysis"]["rows"]:
        assert f"{row['decode_tokens_per_s']:.1f}" in table
    assert results["command"] in table


def test_only_the_block_between_the_markers_is_rewritten() -> None:
    text = f"# Title\n\nbefore\n{START}\nold table\n{END}\nafter\n"
    new = replace_block(text, "| new | table |")
    assert new == f"# Title\n\nbefore\n{START}\n| new | table |\n{END}\nafter\n"
    assert current_block(new) == "| new | table |"
    assert replace_block(new, "| new | table |") == new


def test_a_readme_without_markers_says_where_they_go() -> None:
    with pytest.raises(InvalidInputError, match="no generated-table markers") as caught:
        replace_block("# Title\n", "x")
    assert START in str(caught.value.fix)
