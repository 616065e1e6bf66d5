"""Load: 16 concurrent streaming clients for 60 s on the tiny llama decoder (2 layers, hidden 64,
continuous batching at the default max_batch_size 8, so half the clients wait in the queue at
any time). Zero errors, and every greedy response equals its single-request result."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import llmopt
from llmopt.runtime.generator import Generator
from tests.server.conftest import DECODER

CLIENTS = 16
DURATION_S = 60.0
PROMPTS = ["the quick brown fox", "hello world , how are you ?", "one two three four five six",
           "a", "the sea and the sky", "what is the capital of france ?", "little country",
           "great come her any"]
# (prompt, chat, max_new_tokens): lengths vary, so requests join and leave the batch at
# different steps
WORK = [(p, i % 3 == 0, 8 + 7 * i) for i, p in enumerate(PROMPTS)]


@pytest.mark.slow
def test_sixteen_streaming_clients_for_a_minute(server: Any, packages: dict[str, Path]) -> None:
    generator = llmopt.load(packages[DECODER])
    assert isinstance(generator, Generator)
    expected = [generator.generate(p, chat=chat, max_new_tokens=n, ignore_eos=True).token_ids
                for p, chat, n in WORK]
    counts = {"requests": 0, "tokens": 0}
    errors: list[str] = []
    mismatches: list[tuple[int, int]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + DURATION_S

    def client_loop(index: int) -> None:
        with llmopt.Client(server.address, timeout=120) as client:
            turn = index
            while time.monotonic() < stop_at:
                k = turn % len(WORK)
                prompt, chat, n = WORK[k]
                turn += 1
                try:
                    stream = client.stream(DECODER, prompt, chat=chat, max_new_tokens=n,
                                           ignore_eos=True)
                    text = "".join(stream)
                    result = stream.result
                except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
                    with lock:
                        errors.append(f"client {index}: {type(exc).__name__}: {exc}")
                    continue
                with lock:
                    counts["requests"] += 1
                    counts["tokens"] += len(result.token_ids)
                    if result.token_ids != expected[k] or text != result.text:
                        mismatches.append((index, k))

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DURATION_S + 180)
    elapsed = time.monotonic() - started
    print(f"\nload: {CLIENTS} clients, {elapsed:.0f} s, {counts['requests']} streams, "
          f"{counts['tokens']} tokens ({counts['tokens'] / elapsed:.0f} tokens/s aggregate), "
          f"{len(errors)} errors, {len(mismatches)} mismatches")
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert mismatches == []
    assert counts["requests"] >= CLIENTS * 2
