"""Chunked prefill: joining prompts are run a bounded number of tokens per engine step.

A prompt of thousands of tokens prefilled in one forward pass holds the engine thread for the
whole pass, so every running stream stops until it ends, and a client that gave up on it cannot
stop it. :class:`Prefill` runs the prompts' columns ``chunk`` at a time, each chunk attending to
the cache the earlier chunks wrote, so the engine can interleave decode steps of the running
streams and check cancellation and deadlines between chunks. The result is the same cache and
the same last-position logits as one pass (up to float rounding). A prompt whose leading tokens
the engine's prefix cache holds (:mod:`llmopt.runtime.prefix_cache`) starts on a copy of their
cache and runs only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from llmopt.runtime.generator import Generator
from llmopt.runtime.kv import left_pad, position_ids
from llmopt.runtime.prefix_cache import Match

Member = TypeVar("Member")


@dataclass(frozen=True)
class StepRecord:
    """What one engine forward pass computed, handed to ``Engine.on_step`` (tests, tracing).

    ``kind`` is ``"prefill"`` or ``"decode"``; ``tokens`` counts the positions the pass ran
    (prompt tokens and padding for a prefill chunk, one per row for a decode step plus a lone
    row's prompt-lookup drafts); ``request_ids`` are the requests in it; ``ended`` is
    ``time.monotonic()`` after the pass.
    """

    kind: str
    request_ids: tuple[int, ...]
    tokens: int
    ended: float


class Prefill(Generic[Member]):
    """The prefill of one group of left-padded prompts (``members``: whatever the caller tracks
    per row, e.g. the engine's requests), ``chunk`` padded columns per :meth:`step` (``None``:
    all at once). The engine forms groups that fit one chunk, or one longer prompt alone, so no
    step runs more than ``chunk`` positions, and only batch-1 groups run a chunk on top of a
    cache (the fused graph's GroupQueryAttention takes several new tokens on a cache at batch 1
    only; README "Limits").
    """

    def __init__(self, generator: Generator, members: list[Member], prompts: list[list[int]],
                 chunk: int | None, prefix: Match | None = None) -> None:
        if prefix is not None and len(prompts) != 1:
            raise ValueError("a cached prefix starts a one-prompt prefill only")
        self.generator = generator
        self.members = members
        self.chunk = chunk
        self.ids, self.mask = left_pad(prompts, generator.pad_token_id)
        self.positions = position_ids(self.mask)
        # past-sized tensors: the rows' cache is written into their batch's slots after
        self.cache = generator.model.copying_cache(
            len(prompts), generator.placement, None if prefix is None else prefix.kv)
        self.done = 0 if prefix is None else prefix.length  # columns already in the cache
        self.logits: np.ndarray | None = None

    @property
    def present(self) -> list[Any]:
        """The prompts' cache so far ([rows, kv_heads, positions, head_dim] per tensor)."""
        return self.cache.past

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    @property
    def next_tokens(self) -> int:
        """Positions the next :meth:`step` runs (padding included)."""
        end = self.width if self.chunk is None else min(self.width, self.done + self.chunk)
        return (end - self.done) * len(self.members)

    @property
    def finished(self) -> bool:
        return self.done >= self.width

    def step(self) -> int:
        """Run the next chunk; returns the number of positions it ran. After the last chunk,
        ``logits`` holds the last position's logits of every row."""
        end = self.width if self.chunk is None else min(self.width, self.done + self.chunk)
        logits = self.generator.model.step(
            self.ids[:, self.done:end], self.mask[:, :end], self.positions[:, self.done:end],
            self.cache, prompt=True)
        ran = (end - self.done) * len(self.members)
        self.done = end
        if self.finished:
            self.logits = logits
        return ran
