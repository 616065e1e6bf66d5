"""Prefix caching: the keys and values of token sequences the engine already ran, reused by
prompts that start with them.

A chat's next turn resends the whole conversation, and the requests of one deployment often
start with the same system prompt: their prefill would compute again keys and values the engine
computed moments before. :class:`PrefixCache` keeps, in host memory, the cache of recent prompts
(stored when their prefill ends) and of finished generations (prompt and answer), least recently
used out first within a byte budget. A prompt that shares at least ``min_tokens`` leading tokens
with an entry starts its prefill from a copy of those positions and runs only the rest; at least
its last token always runs, since its logits choose the first new token.

Reuse changes no number: a position's keys and values depend only on the tokens up to it, and
on the CPU llmopt's kernels compute a row alike whatever rows run beside it and however its
prompt is split into chunks, so a prompt prefilled on a cached prefix gets the same cache and
logits, to the bit, as one prefilled whole (tests/runtime/test_prefix_cache.py; on a GPU up to
float rounding, like a chunked prefill). The engine keeps no prefix cache for packages where
that does not hold (:func:`unreusable`), and keeps finished answers only where the decode steps
run the prompt's kernels (:func:`answers_reusable`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llmopt.errors import InvalidInputError

if TYPE_CHECKING:
    from llmopt.runtime.generator import Generator

DEFAULT_BYTES = 128 * 1024 * 1024
MIN_TOKENS = 16  # shorter matches cost a prefill pass of their own for little saved work


def check_budget(budget: object) -> None:
    """Refuse a prefix-cache budget (``prefix_cache_bytes``) that is not a byte count >= 0."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise InvalidInputError(f"prefix_cache_bytes must be an integer >= 0, not {budget!r}",
                                fix="e.g. 134217728 (128 MiB); 0 turns prefix caching off")


@dataclass(frozen=True)
class Match:
    """A cached prefix of a prompt: its first ``length`` positions of every cache tensor
    ([1, kv_heads, length, head_dim] host arrays)."""

    length: int
    kv: list[np.ndarray]


class PrefixCache:
    """Cached keys and values of token sequences, found by their longest common prefix with a
    prompt. Not thread-safe: the engine's thread alone uses it."""

    def __init__(self, budget_bytes: int = DEFAULT_BYTES, min_tokens: int = MIN_TOKENS) -> None:
        self.budget_bytes = budget_bytes
        self.min_tokens = max(1, min_tokens)
        self._entries: OrderedDict[int, tuple[np.ndarray, list[np.ndarray]]] = OrderedDict()
        self._next_key = 0
        self.bytes = 0  # what the entries' arrays hold
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: Sequence[int]) -> Match | None:
        """The longest cached prefix of ``prompt`` of at least ``min_tokens`` tokens and at
        most all but its last, or None."""
        tokens = np.asarray(prompt, np.int64)
        best, best_key = 0, -1
        for key, (cached, _) in self._entries.items():
            n = min(len(cached), len(tokens) - 1)
            if n < max(best + 1, self.min_tokens):
                continue
            differ = np.flatnonzero(cached[:n] != tokens[:n])
            length = int(differ[0]) if differ.size else n
            if length > best:
                best, best_key = length, key
        if best < self.min_tokens:
            return None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        kv = self._entries[best_key][1]
        return Match(best, [np.ascontiguousarray(a[:, :, :best]) for a in kv])

    def add(self, tokens: Sequence[int], kv: list[np.ndarray]) -> None:
        """Keep ``kv`` (one [1, kv_heads, len(tokens), head_dim] array per cache tensor, owned
        by the cache from now on) as the keys and values of ``tokens``. Entries it extends are
        dropped; an entry that already extends it is only marked used."""
        ids = np.asarray(tokens, np.int64)
        size = sum(int(a.nbytes) for a in kv)
        if len(ids) < self.min_tokens or size > self.budget_bytes:
            return
        if any(a.shape[2] != len(ids) for a in kv):
            raise ValueError(f"{len(ids)} tokens but cache tensors of "
                             f"{sorted({a.shape[2] for a in kv})} positions")
        for key, (cached, arrays) in list(self._entries.items()):
            if len(cached) >= len(ids) and np.array_equal(cached[:len(ids)], ids):
                self._entries.move_to_end(key)  # nothing new: this one holds them all
                return
            if len(cached) < len(ids) and np.array_equal(ids[:len(cached)], cached):
                del self._entries[key]
                self.bytes -= sum(int(a.nbytes) for a in arrays)
        self._entries[self._next_key] = (ids, kv)
        self._next_key += 1
        self.bytes += size
        while self.bytes > self.budget_bytes:
            _, (_, arrays) = self._entries.popitem(last=False)
            self.bytes -= sum(int(a.nbytes) for a in arrays)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def unreusable(generator: Generator) -> str | None:
    """Why a prompt prefilled on a cached prefix could get other numbers than one prefilled
    whole on this generator's package, or None where it gets the same."""
    model, manifest = generator.model, generator.package.manifest
    if manifest.quantization == "int8_dynamic":
        return "dynamic int8 quantizes each whole input with one scale, so a prefix's cache " \
               "depends on the tokens after it"
    if model.rope_long_after is not None:
        return "LongRoPE rotates every position anew once a sequence passes its switch point"
    if generator.package.kv_cache.get("sliding_window"):
        return "a sliding-window cache keeps only the last positions"
    return None


def answers_reusable(generator: Generator) -> bool:
    """Whether a finished generation's cache (prompt and answer) may be kept: its answer ran
    through the decode steps, which compute what a prefill would only where prompts run on the
    same session (an int4 package's float prompt session does not)."""
    return generator.model.prompt_session is None
