"""``llmopt demo`` end to end on the real SmolLM2 (the run itself is the session fixture
``smollm2_demo`` in conftest.py, whose packages the other real-model tests check)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from llmopt.package import Package
from tests.conftest import run_demo_cli

pytestmark = pytest.mark.real_model


def test_demo_streams_an_int4_answer_through_the_server(smollm2_demo: dict[str, Any]) -> None:
    summary, stdout, stderr = smollm2_demo["summary"], smollm2_demo["stdout"], \
        smollm2_demo["stderr"]
    answer = summary["answer"]
    assert answer.strip() and summary["answer_tokens"] > 0
    assert answer.strip().splitlines()[0][:20] in stdout  # streamed to the terminal
    for number in range(1, 8):
        assert f"[{number}/7]" in stderr, stderr
    served = Path(summary["out_dir"]) / "repository" / "smollm2"
    assert served.resolve() == (Path(summary["out_dir"]) / "packages" / "int4").resolve()
    assert Package.open(served).manifest["steps"][-1]["method"].startswith("int4")
    assert f"server on 127.0.0.1:{summary['port']}" in stderr
    with socket.socket() as probe:  # the server is gone with the demo
        assert probe.connect_ex(("127.0.0.1", summary["port"])) != 0


def test_demo_writes_the_table_and_plots(smollm2_demo: dict[str, Any]) -> None:
    out = Path(smollm2_demo["summary"]["out_dir"])
    stderr = smollm2_demo["stderr"]
    for row in ("PyTorch eager", "llmopt fp32", "llmopt int8", "llmopt int4"):
        assert f"| {row}" in stderr, stderr[-3000:]
    assert (out / "bench" / "results.json").is_file()
    assert (out / "bench" / "summary.md").is_file()
    plots = list((out / "bench" / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 1000 for p in plots)
    for name in ("fp32", "fused", "int8", "int4"):
        assert (out / "packages" / name / "llmopt.json").is_file()
    assert str(out) in stderr  # says where everything is


def test_second_run_reuses_the_packages(smollm2_demo: dict[str, Any]) -> None:
    out = Path(smollm2_demo["summary"]["out_dir"])
    started = time.perf_counter()
    again = run_demo_cli(out)
    seconds = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("reusing") == 4
    assert seconds < 0.6 * smollm2_demo["seconds"], (seconds, smollm2_demo["seconds"])


def test_a_model_that_does_not_exist_fails_at_once(tmp_path: Path) -> None:
    result = run_demo_cli(tmp_path / "demo", "--model", str(tmp_path / "nope.gguf"))
    assert result.returncode == 1
    assert "error:" in result.stderr and "--model" in result.stderr
    assert "Traceback" not in result.stderr
    assert "[2/7]" not in result.stderr  # nothing was exported


def test_a_port_in_use_fails_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_demo_cli(tmp_path / "demo", "--port", str(port))
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr and "[1/7]" not in result.stderr
