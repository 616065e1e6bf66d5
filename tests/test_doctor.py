"""``llmopt doctor``: the dry run exercises everything but the GPU, end to end, on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmopt.doctor import DoctorOptions, run_doctor
from llmopt.runtime import kernels
from llmopt.runtime import providers as P


def test_dry_run_passes_every_check_and_keeps_what_it_built(tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_doctor(DoctorOptions(work_dir=str(tmp_path)), say=lines.append)
    assert report.ok, report.failures()
    names = [c.name for c in report.checks]
    for expected in ("versions and providers", "fp16 on cpu (strict): placement, greedy, logits",
                     "int4 on cpu (strict): placement, greedy, logits",
                     "KV cache in place on cpu's device",
                     "TensorRT profile and nested cache folder", "generate 2100 tokens on cpu",
                     "serve on cpu: llmopt.Client stream, tritonclient infer"):
        assert expected in names
    assert len(lines) == len(report.checks) and all(line.startswith("[ok]") for line in lines)
    assert f"llmopt CPU kernels: {kernels.status()}" in report.checks[0].detail
    assert (tmp_path / "decoder-fp16-cuda" / "model.onnx").is_file()
    assert any((tmp_path / "trt-cache" / "nested" / "not-yet").iterdir())


def test_gpu_mode_without_a_cuda_build_fails_with_the_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "available", lambda: ["cpu"])
    report = run_doctor(DoctorOptions(gpu=True), say=lambda line: None)
    assert not report.ok and len(report.checks) == 1
    assert "onnxruntime-gpu[cuda,cudnn]" in report.failures()[0].detail


def test_cli_exits_1_naming_the_failed_check(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from llmopt.cli.main import main

    monkeypatch.setattr(P, "available", lambda: ["cpu"])
    assert main(["doctor", "--gpu"]) == 1
    err = capsys.readouterr().err
    assert "FAILED versions and providers" in err and "no CUDA provider" in err


@pytest.mark.gpu
def test_doctor_gpu_passes_on_a_gpu_machine() -> None:
    done = subprocess.run([sys.executable, "-m", "llmopt.cli.main", "doctor", "--gpu"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
