"""``llmopt serve`` as a real process (SIGTERM drains in-flight streams) and
``llmopt generate --server``, through the real entry point."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import llmopt
from llmopt.cli.main import main
from llmopt.server.status import ServerUnavailableError
from tests.server.conftest import DECODER, make_repository

ROOT = Path(__file__).resolve().parents[2]
# `llmopt serve` with each forward pass slowed to 20 ms, so a stream surely runs during SIGTERM
SLOW_SERVE = """
import sys, time
from llmopt.runtime.kv import DecoderModel
step = DecoderModel.step
def slowed(self, *args, **kwargs):
    time.sleep(0.02)
    return step(self, *args, **kwargs)
DecoderModel.step = slowed
from llmopt.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _start_serve(repo: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVE, "serve", "--model-repository", str(repo), "--port",
         "0", "--no-metrics", "--grace", "60", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found = re.search(r"listening on (\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError(f"llmopt serve did not start: {proc.stdout.read()}")


def test_sigterm_drains_in_flight_streams(packages: dict[str, Path], tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo", packages, [DECODER])
    proc, address = _start_serve(repo)
    try:
        with llmopt.Client(address, timeout=60) as client:
            stream = client.stream(DECODER, "hello", max_new_tokens=100, ignore_eos=True)
            first = [next(stream) for _ in range(3)]
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # new calls are refused once it drains ...
                try:
                    client.list_models(timeout=2)
                except ServerUnavailableError as exc:
                    assert "shutting down" in str(exc)
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the server kept accepting calls after SIGTERM")
            rest = list(stream)  # ... while the stream in flight runs to its end
        assert stream.result.finish_reason == "length"
        assert stream.result.stats.generated_tokens == 100
        assert "".join(first + rest) == stream.result.text
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stdout is not None
    output = proc.stdout.read()
    assert f"model {DECODER} READY" in output and "Traceback" not in output


def test_generate_through_the_server(server: Any, packages: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    generator = llmopt.load(packages[DECODER])
    expected = generator.generate("hello world", max_new_tokens=7, ignore_eos=True)
    code = main(["generate", DECODER, "hello world", "--server", server.address, "--raw",
                 "--max-new-tokens", "7", "--ignore-eos", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    assert result["providers"] == ["cpu"]
    chat = generator.chat("hello world", max_new_tokens=7)
    assert main(["generate", DECODER, "hello world", "--server", server.address,
                 "--max-new-tokens", "7"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == chat.text.strip()
    assert f"{chat.stats.generated_tokens} generated tokens" in out.err
    assert main(["generate", "nope", "hi", "--server", server.address]) == 1
    assert "no model named 'nope'" in capsys.readouterr().err
    prompt = "the quick brown fox jumps over the lazy dog . " * 3
    plain = generator.generate(prompt, max_new_tokens=9, ignore_eos=True)
    assert main(["generate", DECODER, prompt, "--server", server.address, "--raw",
                 "--max-new-tokens", "9", "--ignore-eos", "--prompt-lookup", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == plain.token_ids
    assert 0 <= result["stats"]["accepted_draft_tokens"] < len(plain.token_ids)


def test_generate_in_process_with_prompt_lookup(packages: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    generator = llmopt.load(packages[DECODER])
    prompt = "the quick brown fox jumps over the lazy dog . " * 3
    expected = generator.generate(prompt, max_new_tokens=9, ignore_eos=True)
    assert main(["generate", str(packages[DECODER]), prompt, "--raw", "--max-new-tokens", "9",
                 "--ignore-eos", "--prompt-lookup", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == expected.token_ids
    assert result["stats"]["accepted_draft_tokens"] >= 0
    assert main(["generate", str(packages[DECODER]), "hi", "--prompt-lookup", "9"]) == 1
    assert "prompt_lookup must be an integer from 0 to 7" in capsys.readouterr().err
    predicted = tmp_path / "prediction.txt"
    predicted.write_text(expected.text)
    assert main(["generate", str(packages[DECODER]), prompt, "--raw", "--max-new-tokens", "9",
                 "--ignore-eos", "--prediction-file", str(predicted), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == expected.token_ids
    assert result["stats"]["accepted_draft_tokens"] > 4
    assert main(["generate", str(packages[DECODER]), "hi", "--prediction-file",
                 str(tmp_path / "missing.txt")]) == 1
    assert "cannot read the prediction" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--tls-cert", "cert.pem"], "needs both --tls-cert and --tls-key"),
    (["--token-env", "LLMOPT_TEST_UNSET_TOKENS"], "unset or empty"),
    (["--port", "99999"], "cannot bind"),
    (["--prefill-chunk", "-1"], "prefill_chunk must be an integer >= 0"),
    (["--max-prompt-tokens", "0"], "max_prompt_tokens must be a positive integer"),
    (["--prefix-cache-mib", "-1"], "--prefix-cache-mib must be >= 0"),
    (["--request-timeout", "0"], "request_timeout_s must be a positive number"),
    (["--tls-cert", "cert.pem", "--tls-key", "key.pem"],
     "cannot read the TLS certificate file cert.pem"),
])
def test_serve_refuses_bad_options(packages: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], args: list[str],
                                   message: str) -> None:
    repo = make_repository(tmp_path / "repo", packages, [DECODER])
    assert main(["serve", "--model-repository", str(repo), "--no-metrics", *args]) == 1
    assert message in capsys.readouterr().err


def test_serve_needs_a_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model-repository", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_serve_refuses_a_metrics_port_in_use(packages: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repository(tmp_path / "repo", packages, [DECODER])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model-repository", str(repo), "--port", "0",
                     "--metrics-port", str(port)]) == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in capsys.readouterr().err


def test_metrics_bind_their_own_host(packages: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repository(tmp_path / "repo", packages, [DECODER])
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model-repository", str(repo), "--port", "0",
                     "--metrics-host", "127.0.0.2", "--metrics-port", str(port)]) == 1
    assert f"cannot serve metrics on 127.0.0.2:{port}" in capsys.readouterr().err

@pytest.mark.parametrize(("flags", "invariant"), [([], True), (["--no-batch-invariant"], False)])
def test_serve_batch_invariance_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       flags: list[str], invariant: bool) -> None:
    import llmopt.server

    served: list[Any] = []
    monkeypatch.setattr(llmopt.server, "serve",
                        lambda repo, address, config, on_ready: served.append(config) or 0)
    assert main(["serve", "--model-repository", str(tmp_path), *flags]) == 0
    assert served[0].model_defaults.batch_invariant is invariant
