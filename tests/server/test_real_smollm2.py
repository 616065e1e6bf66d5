"""SmolLM2-135M-Instruct (real weights) served: a streamed chat answer through llmopt's client
has the same tokens as in-process generation, alone and among concurrent streams."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import llmopt
from llmopt.runtime.generator import Generator

pytestmark = pytest.mark.real_model
QUESTIONS = ["What is the capital of France?", "List three fruits.",
             "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from llmopt.server import create_server

    repo = tmp_path_factory.mktemp("smollm2-repo")
    (repo / "smollm2").symlink_to(smollm2_package, target_is_directory=True)
    server, _ = create_server(repo)
    server.start()
    yield server
    server.stop(0)


def test_streamed_chat_equals_in_process(smollm2_server: Any, smollm2_package: Path) -> None:
    generator = llmopt.load(smollm2_package, ["cpu"])
    assert isinstance(generator, Generator)
    expected = generator.chat(QUESTIONS[0], max_new_tokens=48)
    with llmopt.Client(smollm2_server.address, timeout=300) as client:
        stream = client.stream("smollm2", QUESTIONS[0], chat=True, max_new_tokens=48)
        deltas = list(stream)
        details = client.get_model("smollm2")
    result = stream.result
    assert result.token_ids == expected.token_ids
    assert "".join(deltas) == result.text == expected.text
    assert "Paris" in result.text
    assert len(deltas) > 3 and result.finish_reason == expected.finish_reason
    assert details.summary.architecture == "llama" and details.providers == ("cpu",)
    assert details.manifest["source"]["kind"] == "gguf"


def test_concurrent_chats_equal_single_requests(smollm2_server: Any,
                                                smollm2_package: Path) -> None:
    generator = llmopt.load(smollm2_package, ["cpu"])
    assert isinstance(generator, Generator)
    expected = [generator.chat(q, max_new_tokens=24).token_ids for q in QUESTIONS]
    got: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        with llmopt.Client(smollm2_server.address, timeout=300) as client:
            got[i] = client.chat("smollm2", QUESTIONS[i], max_new_tokens=24).token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [got.get(i) for i in range(len(QUESTIONS))] == expected
