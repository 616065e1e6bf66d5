"""The one launcher of bench servers: `llmopt serve` on port 0, its address read from the line
the server announces."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmopt.bench.targets.server_process import launch_server
from llmopt.errors import LlmoptError


def test_a_server_on_port_0_announces_the_port_it_got(tiny_package: Path,
                                                      tmp_path: Path) -> None:
    from llmopt.client import Client

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "tiny").symlink_to(tiny_package, target_is_directory=True)
    log = tmp_path / "serve.log"
    server = launch_server(["--model-repository", str(repo), "--port", "0", "--http-port", "0",
                            "--no-metrics"], log_path=log, timeout=120)
    try:
        assert server.address is not None and not server.address.endswith(":0")
        assert server.http_url is not None and server.http_url.startswith("http://")
        with Client(server.address, timeout=30) as client:
            assert "tiny" in {m.name for m in client.list_models()}
        server.check_alive()
    finally:
        server.close()
    assert server.process.returncode is not None
    assert "listening on" in log.read_text()
    with pytest.raises(LlmoptError, match="exited"):
        server.check_alive()


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(LlmoptError, match="exited with code") as caught:
        launch_server(["--model-repository", str(tmp_path / "missing"), "--port", "0",
                       "--no-metrics"], timeout=120)
    assert "missing" in str(caught.value)
