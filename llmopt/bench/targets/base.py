"""What every target does: run one request and time it as the client sees it.

A request is ``batch_size`` prompts issued together. Clocks start at ``issued`` (the request's
scheduled send time, so client-side queueing under a request rate is counted) and stop when
a token arrives at the caller: prompts are tokenized and request messages built before the
clock starts, and each arrival is time-stamped before its text is handled, so client
overhead stays out of the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Timing:
    """One request, timed. Encoders fill only ``e2e_s`` and the token counts."""

    e2e_s: float
    ttft_s: list[float] = field(default_factory=list)  # per prompt: issue -> first token
    itl_s: list[float] = field(default_factory=list)   # gaps between a prompt's tokens
    prompt_tokens: int = 0   # over all prompts
    output_tokens: int = 0   # over all prompts
    sequences: int = 0       # prompts (or texts) in the request


class Target(Protocol):
    """A loaded model behind one way of calling it."""

    name: str
    tokenizer: Any
    supports_concurrency: bool

    def info(self) -> dict[str, Any]:
        """What is in effect: providers and their options, library, device."""
        ...

    def decode(self, prompts: list[list[int]], new_tokens: int, issued: float) -> Timing: ...

    def encode(self, texts: list[str], issued: float) -> Timing: ...

    def memory(self) -> dict[str, Any]:
        """Extra memory facts (a served target's process); {} when none."""
        ...

    def close(self) -> None: ...


class TokenClock:
    """Arrival times of one prompt's tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens = 0

    def tick(self, tokens: int = 1, at: float | None = None) -> None:
        self.times.append(time.perf_counter() if at is None else at)
        self.tokens += tokens


def timing_from_clocks(clocks: list[TokenClock], issued: float, ended: float,
                       prompt_tokens: int) -> Timing:
    """A request's Timing from its prompts' token clocks."""
    ttft = [c.times[0] - issued for c in clocks if c.times]
    itl = [b - a for c in clocks for a, b in zip(c.times, c.times[1:], strict=False)]
    return Timing(e2e_s=ended - issued, ttft_s=ttft, itl_s=itl, prompt_tokens=prompt_tokens,
                  output_tokens=sum(c.tokens for c in clocks), sequences=len(clocks))


class StreamFanout:
    """Runs the prompts of one request as parallel streams (for targets whose unit is one
    prompt: the engine and the server), each consumed on its own thread."""

    def __init__(self, workers: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-stream")

    def run(self, open_stream: Callable[[list[int], TokenClock], Iterator[Any] | None],
            prompts: list[list[int]], issued: float) -> Timing:
        clocks = [TokenClock() for _ in prompts]

        def consume(index: int) -> None:
            stream = open_stream(prompts[index], clocks[index])
            for _ in stream or ():
                pass

        if len(prompts) == 1:
            consume(0)
        else:
            for future in [self._pool.submit(consume, i) for i in range(len(prompts))]:
                future.result()
        return timing_from_clocks(clocks, issued, time.perf_counter(),
                                  sum(len(p) for p in prompts))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
