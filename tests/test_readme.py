"""Every code block in README.md runs, so the documentation cannot drift from the code.

``python`` blocks run as scripts and ``bash``/``sh`` blocks under ``bash -euo pipefail``, in
README order and in one working directory, as a reader following the README would run them: a
later block may use what an earlier one wrote (the command-line tour reuses the packages of the
Python tour). Running one block alone (``-k``) first runs the blocks above it. A block right
below ``<!-- readme-test: skip (why) -->`` is not run; only the two set-up commands may be
skipped (one of them runs this test).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmopt.models import KNOWN_MODELS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_COMMANDS = {"make demo", "make test"}  # the README's "Set up" section, in .ci/run / Makefile
RUNNERS = {
    "python": [sys.executable],
    "bash": ["bash", "-euo", "pipefail"],
    "sh": ["bash", "-euo", "pipefail"],
}
NOT_CODE = {"", "text", "console-output", "json", "yaml", "toml", "proto", "diff"}
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b(.*?)-->")
FENCE = re.compile(r"^(```|~~~)\s*([\w+-]*)")
TIMEOUT_S = 1800


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.language or 'plain'}-line{self.line}"

    @property
    def uses_real_model(self) -> bool:
        return any(name in self.code for name in KNOWN_MODELS)


def parse_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        fence, language, start = match.group(1), match.group(2).lower(), index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].startswith(fence):
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise ValueError(f"README.md:{start + 1}: code block is never closed")
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        skip = SKIP.search(previous)
        reason = None
        if skip is not None:
            reason = skip.group(1).strip(" ()") or "no reason given"
        blocks.append(Block(start + 1, language, "\n".join(body).strip() + "\n", reason))
        index += 1
    return blocks


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.language in RUNNERS and b.skip_reason is None]


def test_readme_has_runnable_blocks() -> None:
    assert RUNNABLE, "README.md has no runnable code blocks; did the parser break?"
    assert any(b.language == "python" for b in RUNNABLE)


def test_only_the_setup_commands_are_skipped() -> None:
    skipped = [b for b in BLOCKS if b.skip_reason is not None]
    assert sorted(b.code.strip() for b in skipped) == sorted(SETUP_COMMANDS)
    assert all(b.skip_reason != "no reason given" for b in skipped)


def test_setup_commands_exist_and_ci_runs_the_test_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for command in SETUP_COMMANDS:
        target = command.removeprefix("make ")
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"Makefile has no {target}:"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\s*$", ci, re.MULTILINE), ".ci/run must run `make test`"


def test_make_demo_runs_llmopt_demo() -> None:
    """``make demo`` (the first set-up command) installs, then runs ``llmopt demo``, which
    tests/test_demo.py runs end to end."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "Makefile has no demo recipe"
    assert re.search(r"\$\(LLMOPT\) demo\b", recipe.group(1)), recipe.group(1)
    assert re.search(r"^demo:.*\binstall\b", makefile, re.MULTILINE), "make demo must install"


def test_every_block_is_runnable_or_plain_text() -> None:
    unknown = [b.id for b in BLOCKS if b.language not in RUNNERS and b.language not in NOT_CODE]
    assert not unknown, f"blocks in a language this test cannot run: {unknown}"


def _param(block: Block) -> object:
    marks = [pytest.mark.real_model, pytest.mark.slow] if block.uses_real_model else []
    return pytest.param(block, id=block.id, marks=marks)


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


_OUTCOMES: dict[int, str | None] = {}  # block line -> None (passed) or why it failed


def _run(block: Block, work: Path) -> str | None:
    suffix = ".py" if block.language == "python" else ".sh"
    script = work.parent / f"readme-line{block.line}{suffix}"
    script.write_text(block.code)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [*RUNNERS[block.language], str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    if result.returncode == 0:
        return None
    return (f"README.md:{block.line} ({block.language}) exited with {result.returncode}\n"
            f"--- code\n{block.code}--- stdout (tail)\n{result.stdout[-3000:]}"
            f"--- stderr (tail)\n{result.stderr[-6000:]}")


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_readme_block(block: Block, readme_dir: Path) -> None:
    work = readme_dir / "work"
    work.mkdir(exist_ok=True)
    for earlier in RUNNABLE:
        if earlier.line >= block.line:
            break
        if earlier.line not in _OUTCOMES:
            _OUTCOMES[earlier.line] = _run(earlier, work)
    _OUTCOMES[block.line] = failure = _run(block, work)
    assert failure is None, failure
