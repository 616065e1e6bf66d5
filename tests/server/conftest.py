"""A repository of tiny packages (built once per session) and real servers on free ports."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tiny_decoders
from tests.exporter.test_encoders import build as build_encoder

DECODER, ENCODER, CLASSIFIER = "tiny-llama", "tiny-bert", "tiny-bert-cls"


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama decoder, a BERT feature extractor and a BERT classifier, exported."""
    from llmopt.exporter import ExportOptions, export

    root = tmp_path_factory.mktemp("server-packages")
    out = {DECODER: root / DECODER, ENCODER: root / ENCODER, CLASSIFIER: root / CLASSIFIER}
    export(tiny_decoders.build("llama", root / "src-llama"), out[DECODER])
    export(build_encoder("bert", "feature-extraction", root / "src-bert"), out[ENCODER],
           ExportOptions(task="feature-extraction"))
    export(build_encoder("bert", "text-classification", root / "src-bert-cls"), out[CLASSIFIER],
           ExportOptions(task="text-classification"))
    return out


def make_repository(root: Path, packages: dict[str, Path], names: list[str],
                    configs: dict[str, str] | None = None) -> Path:
    """A repository folder: links to the packages, or copies where a config file is written."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if configs and name in configs:
            shutil.copytree(packages[name], root / name)
            (root / name / "llmopt-serve.yaml").write_text(configs[name])
        else:
            (root / name).symlink_to(packages[name], target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def repository(packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), packages,
                           [DECODER, ENCODER, CLASSIFIER])


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[Any]:
    """One shared server over the whole tiny repository, with metrics and the HTTP door."""
    from llmopt.server import ServerConfig, create_server

    srv, _ = create_server(repository, "127.0.0.1:0", ServerConfig(metrics_port=0, http_port=0))
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="session")
def generator(packages: dict[str, Path]) -> Any:
    """The tiny decoder in-process: what every door's answers are compared with."""
    import llmopt
    from llmopt.runtime.generator import Generator

    runner = llmopt.load(packages[DECODER])
    assert isinstance(runner, Generator)
    return runner


@pytest.fixture(scope="session")
def embedder(packages: dict[str, Path]) -> Any:
    import llmopt
    from llmopt.runtime.embedder import Embedder

    runner = llmopt.load(packages[ENCODER])
    assert isinstance(runner, Embedder)
    return runner


@pytest.fixture
def client(server: Any) -> Iterator[Any]:
    import llmopt

    with llmopt.Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start a server for one test (own repository or config); stopped afterwards."""
    from llmopt.server import ServerConfig, create_server

    started: list[Any] = []

    def start(repository: Path, config: ServerConfig | None = None) -> Any:
        srv, _ = create_server(repository, "127.0.0.1:0", config)
        started.append(srv.start())
        return srv

    yield start
    for srv in started:
        srv.stop(0)


def openai_client(server: Any) -> Any:
    """The real ``openai`` SDK on a server's HTTP door (no retries, so errors show at once)."""
    import openai

    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture
def byte_level_oai(byte_level_decoder: Path, start_server: Callable[..., Any],
                   tmp_path: Path) -> Any:
    """The ``openai`` SDK on a server over a tiny decoder whose byte-level tokenizer the grammar
    library reads (served as "bytes")."""
    from llmopt.server import ServerConfig

    repo = make_repository(tmp_path / "repo", {"bytes": byte_level_decoder}, ["bytes"])
    return openai_client(start_server(repo, ServerConfig(http_port=0)))


def slow_steps(model: Any, seconds: float) -> None:
    """Make a served decoder take ``seconds`` per forward pass, so that a test can act while a
    generation is surely running (the tiny model does 255 tokens in a fraction of a second)."""
    step = model.generator.model.step

    def slowed(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return step(*args, **kwargs)

    model.generator.model.step = slowed


def sample(server: Any, name: str, labels: dict[str, str]) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0
