"""Running batches of the continuous-batching engine: rows that decode in one forward pass.

A :class:`RunningBatch` owns its rows' KV cache (slots, :mod:`llmopt.runtime.slots`), attention
mask, positions and last tokens. On a *ragged* graph (GroupQueryAttention reading each row's own
length) rows of any lengths share one batch unpadded, each attending over its own positions.
Elsewhere rows of different lengths can share one only by left-padding the shorter caches; that
padding changes a row's numbers: ONNX Runtime's CPU attention sums over the padded length in
SIMD lanes, so one more padding column moves a logit by ~1e-5 in fp32, and int8-compute packages
(int8 and int4 MatMulNBits, dynamic int8) round those differences into other tokens (measured on
SmolLM2: up to 0.54 in a logit; docs/batch_invariance.md). :func:`place` decides which batch a
group of freshly prefilled rows joins: in batch-invariant mode any batch of a ragged graph, else
only a batch of exactly their length, so no row is ever padded; rows of a package whose
activations are quantized per tensor (dynamic int8: one scale for the whole batch) never share a
batch at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from llmopt.runtime.generator import Generator, rewind
from llmopt.runtime.sequence import DecodeState
from llmopt.runtime.slots import PastRows, SlotCache, SlotCopier


class Row(Protocol):
    """What a batch needs of a request: its decoding state."""

    state: DecodeState


R = TypeVar("R", bound=Row)


class RunningBatch(Generic[R]):
    """Rows decoding together; ``width`` is the number of cache positions (padding included).

    Row ``i`` is ``requests[i]``, its mask, position and last token, and slot ``i`` of the
    cache (:mod:`llmopt.runtime.slots`): a leaving row's place is taken by the last row, in the
    cache and in these lists alike.

    ``ragged`` (graphs whose GroupQueryAttention reads each row's own length,
    :attr:`DecoderModel.ragged`): every row's cache starts at position 0 and its mask ends at
    its own length (ones, then zeros up to the longest row), so rows of any lengths decode in
    one pass without padding, each over its own positions only.
    """

    def __init__(self, generator: Generator, slots: int = 1,
                 copier: SlotCopier | None = None, max_positions: int | None = None) -> None:
        self.generator = generator
        self.ragged = generator.model.ragged
        self.slots = slots  # the most rows the in-place store grows to hold (by doubling)
        self.max_positions = max_positions  # slots x capacity beyond which growth is exact
        self.copier = copier
        self.requests: list[R] = []
        self.mask = np.zeros((0, 0), np.int64)
        self.positions = np.zeros((0,), np.int64)
        self.last = np.zeros((0,), np.int64)
        self.cache: SlotCache | PastRows | None = None

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def padded(self) -> bool:
        """Whether some row's cache holds padding columns: a masked column before an unmasked
        one (a ragged row's mask ends in zeros past its own length; those are not its cache)."""
        return bool((self.mask[:, :-1] < self.mask[:, 1:]).any())

    def merge(self, requests: list[R], mask: np.ndarray, positions: np.ndarray,
              last: np.ndarray, present: list[Any]) -> None:
        """Add prefilled rows (``present``: their cache, [n, kv_heads, length, head_dim]); the
        shorter side's caches are left-padded to the wider one."""
        width = max(self.width, mask.shape[1])
        joining = len(requests)
        if not self.generator.shared_kv:
            gen = self.generator
            rows = self.cache if isinstance(self.cache, PastRows) else PastRows(
                gen.session, gen.model.layout, gen.placement)
            rows.join(present, width - mask.shape[1], width)
            self.cache = rows
        else:
            self._make_room(width, len(self) + joining, requests)
            assert isinstance(self.cache, SlotCache)
            self.cache.join(present, 0 if self.ragged else width - mask.shape[1])
        pad = _right_pad if self.ragged else _left_pad
        self.mask = np.concatenate([pad(self.mask, width), pad(mask, width)])
        self.positions = np.concatenate([self.positions, positions])
        self.last = np.concatenate([self.last, last])
        self.requests.extend(requests)

    def _make_room(self, width: int, rows: int, joining: list[R]) -> None:
        """A slot store for ``rows`` rows of ``width`` positions plus every row's remaining
        tokens; rows already there move only when it must grow or shift (a wider row joins)."""
        cache = self.cache if isinstance(self.cache, SlotCache) else None
        shift = width - self.width if self.requests and not self.ragged else 0
        slots, capacity = self._store_shape(width, rows, joining)
        if cache is not None and (slots, capacity) == (cache.slots, cache.capacity) and not shift:
            return
        gen = self.generator
        if self.copier is None:
            self.copier = SlotCopier(gen.model.layout, gen.placement)
        if cache is None or not self.requests:
            self.cache = SlotCache(gen.session, gen.model.layout, slots, capacity,
                                   gen.placement, self.copier)
        else:
            self.cache = cache.moved(slots, capacity, 0, self.width, shift)

    def _store_shape(self, width: int, rows: int, joining: list[R]) -> tuple[int, int]:
        """(slots, capacity) of the store that holds ``rows`` rows of ``width`` positions plus
        every row's remaining tokens: the present store where it does; else a new one whose
        rows and positions double (up to :attr:`slots` rows and the context), so a batch
        regrows O(log) times and a lone row does not hold a whole batch's memory."""
        remaining = max(r.state.limit - len(r.state.generated)
                        for r in [*self.requests, *joining])
        need = width + remaining + 1
        cache = self.cache if isinstance(self.cache, SlotCache) else None
        if cache is None:
            return rows, need
        slots = cache.slots if rows <= cache.slots else max(rows, min(self.slots,
                                                                     2 * cache.slots))
        capacity = cache.capacity if need <= cache.capacity else min(
            max(need, 2 * cache.capacity), max(need, self.generator.context_length + 1))
        if self.max_positions is not None and slots * capacity > self.max_positions:
            # doubling would pass the memory budget: a store of exactly what the rows need
            slots, capacity = rows, need
        return slots, capacity

    @property
    def kv_positions(self) -> int:
        """Cache positions this batch holds in memory (slots x capacity of its store)."""
        if isinstance(self.cache, SlotCache):
            return self.cache.slots * self.cache.capacity
        return len(self) * self.width

    def kv_positions_after(self, joining: list[R], width: int) -> int:
        """:attr:`kv_positions` once ``joining`` (prefilled to ``width`` positions) merged,
        counted to the end of every row's token limit."""
        width = max(self.width, width)
        rows = len(self) + len(joining)
        if not rows:
            return 0
        if not self.generator.shared_kv:  # the copying cache grows by one column per step
            remaining = max(r.state.limit - len(r.state.generated)
                            for r in [*self.requests, *joining])
            return rows * (width + remaining + 1)
        slots, capacity = self._store_shape(width, rows, joining)
        return slots * capacity

    def forward(self, draft: Sequence[int] = ()) -> np.ndarray:
        """One decode step of every row (the last tokens in); returns the logits. ``draft``: a
        lone row's prompt-lookup tokens, run after its last token in the same step on the
        decode session (each position computed as a one-token step would), every position's
        logits returned; :meth:`rewind` then forgets the rejected ones."""
        assert self.cache is not None
        batch, run = len(self.requests), 1 + len(draft)
        assert not draft or batch == 1, "only a lone row runs a draft"
        if self.ragged:  # each row `run` positions longer, ones up to its own length
            lengths = self.mask.sum(axis=1) + run
            self.mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)
        else:
            self.mask = np.concatenate([self.mask, np.ones((batch, run), np.int64)], axis=1)
        positions = self.positions[:, None] + 1 + np.arange(run)
        self.positions = positions[:, -1]
        if isinstance(self.cache, SlotCache) and self.width > self.cache.capacity:
            self._make_room(self.width - run, batch, [])  # defensive: capacity covers the limits
        ids = self.last[:, None]
        if draft:
            ids = np.array([[int(self.last[0]), *draft]], np.int64)
        return self.generator.model.step(ids, self.mask, positions, self.cache,
                                         all_logits=bool(draft), prompt=False)

    def rewind(self, positions: int) -> None:
        """Forget a lone row's last ``positions`` cache positions (its rejected drafts): an
        in-place store's are rewritten by the next step, a copying cache's are cut."""
        if positions:
            assert len(self) == 1 and self.cache is not None
            self.mask = self.mask[:, :-positions]
            self.positions = self.positions - positions
            rewind(self.cache.cache if isinstance(self.cache, PastRows) else self.cache,
                   self.width)

    def retire(self, keep: Callable[[R, list[np.ndarray]], None] | None = None) -> list[R]:
        """Drop finished rows (the last row takes each freed slot) and the cache columns that
        are padding in every remaining row; returns the dropped requests (the caller closes
        them). ``keep`` is first handed each dropped row's cache (:meth:`row_cache`)."""
        gone = [i for i, r in enumerate(self.requests) if r.state.done]
        if not gone:
            return []
        done = [self.requests[i] for i in gone]
        if keep is not None:
            for i in gone:
                keep(self.requests[i], self.row_cache(i))
        if len(gone) == len(self.requests):
            self.clear()
            return done
        assert self.cache is not None
        order = list(range(len(self.requests)))
        for slot in reversed(gone):  # every row after ``slot`` is alive: the last one moves
            self.cache.leave(slot)
            order[slot] = order[-1]
            order.pop()
        index = np.array(order)
        self.requests = [self.requests[i] for i in order]
        mask = self.mask[index]
        self.positions = self.positions[index]
        self.last = self.last[index]
        if self.ragged:  # the longest row may have left: the mask ends at the longest remaining
            self.mask = mask[:, :int(mask.sum(axis=1).max())]
            return done
        start = int(np.argmax(mask.any(axis=0)))
        self.mask = mask[:, start:]
        if start:
            if isinstance(self.cache, PastRows):
                self.cache.trim(start)
            else:
                cache = self.cache
                self.cache = cache.moved(cache.slots, cache.capacity, start, mask.shape[1], 0)
        return done

    def row_cache(self, row: int) -> list[np.ndarray]:
        """Row ``row``'s cached positions (its tokens so far but the last, which has not run),
        as host arrays [1, kv_heads, positions, head_dim], padding left out."""
        assert self.cache is not None
        length = int(self.mask[row].sum())
        start = 0 if self.ragged else self.width - length  # left padding before the others
        return self.cache.row(row, start, start + length)

    def clear(self) -> None:
        self.requests = []
        self.mask = np.zeros((0, 0), np.int64)
        self.positions = np.zeros((0,), np.int64)
        self.last = np.zeros((0,), np.int64)
        if isinstance(self.cache, SlotCache):
            self.cache.rows = 0  # the buffers stay for the next rows
        else:
            self.cache = None

    def cached(self, length: int) -> list[np.ndarray]:
        """The rows' first ``length`` cache positions, as host arrays (tests, debugging)."""
        assert self.cache is not None
        return self.cache.arrays(length)


def prefill_groups(requests: list[R], invariant: bool, rows_couple: bool,
                   ragged: bool = False) -> list[list[R]]:
    """Requests that may be prefilled in one pass: all of them in the shared mode (left-padded);
    in batch-invariant mode those of equal prompt length only, or one by one when the package's
    rows couple. A ``ragged`` package's rows are never padded, in either mode: equal lengths
    only."""
    if not invariant and not ragged:
        return [requests] if requests else []
    if rows_couple and invariant:
        return [[r] for r in requests]
    groups: dict[int, list[R]] = {}
    for request in requests:
        groups.setdefault(len(request.state.prompt), []).append(request)
    return list(groups.values())


def place(batches: list[RunningBatch[R]], width: int, invariant: bool, rows_couple: bool,
          ragged: bool = False) -> RunningBatch[R] | None:
    """The running batch that rows of ``width`` cache positions join, or None for a new one.
    Batch-invariant mode joins only a batch of exactly that width, unless the package is
    ``ragged`` (every row attends over its own length: any batch will do)."""
    live = [b for b in batches if len(b)]
    if not invariant:
        return live[0] if live else None
    if rows_couple:
        return None
    if ragged:
        return live[0] if live else None
    return next((b for b in live if b.width == width), None)


def rows_couple(generator: Generator) -> bool:
    """Whether one row's activations change another row's numbers even at equal length: dynamic
    int8 quantizes each MatMul's input with one scale for the whole batch tensor
    (DynamicQuantizeLinear), so a row's result depends on every row beside it."""
    return bool(generator.package.manifest.quantization == "int8_dynamic")


def _left_pad(mask: np.ndarray, width: int) -> np.ndarray:
    missing = width - mask.shape[1]
    return np.pad(mask, [(0, 0), (missing, 0)]) if missing > 0 else mask


def _right_pad(mask: np.ndarray, width: int) -> np.ndarray:
    missing = width - mask.shape[1]
    return np.pad(mask, [(0, 0), (0, missing)]) if missing > 0 else mask
