"""Running batches of the continuous-batching engine: rows that decode in one forward pass.

A :class:`RunningBatch` owns its rows' KV cache, attention mask, positions and last tokens.
Rows of different lengths can share one only by left-padding the shorter caches; that padding
changes a row's numbers: ONNX Runtime's CPU attention sums over the padded length in SIMD lanes,
so one more padding column moves a logit by ~1e-5 in fp32, and int8-compute packages (int8 and
int4 MatMulNBits, dynamic int8) round those differences into other tokens (measured on SmolLM2:
up to 0.54 in a logit; docs/batch_invariance.md). :func:`place` decides which batch a group of
freshly prefilled rows joins: in batch-invariant mode only a batch of exactly their length, so no
row is ever padded; rows of a package whose activations are quantized per tensor (dynamic int8:
one scale for the whole batch) never share a batch at all.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from llmopt.runtime.generator import Generator, InPlaceCache
from llmopt.runtime.sequence import DecodeState


class Row(Protocol):
    """What a batch needs of a request: its decoding state."""

    state: DecodeState


R = TypeVar("R", bound=Row)


class RunningBatch(Generic[R]):
    """Rows decoding together; ``width`` is the number of cache positions (padding included)."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.requests: list[R] = []
        self.mask = np.zeros((0, 0), np.int64)
        self.positions = np.zeros((0,), np.int64)
        self.last = np.zeros((0,), np.int64)
        self.past: list[Any] = []
        # shared_buffer packages: the batch's cache in place between joins and leaves
        self.cache: InPlaceCache | None = None

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def padded(self) -> bool:
        """Whether some row's cache holds padding columns."""
        return bool(self.mask.size) and not bool(self.mask.all())

    def merge(self, requests: list[R], mask: np.ndarray, positions: np.ndarray,
              last: np.ndarray, present: list[Any]) -> None:
        """Add prefilled rows; the shorter side's caches are left-padded to the wider one."""
        if not self.requests:
            self.requests = list(requests)
            self.mask, self.positions, self.last, self.past = mask, positions, last, present
            self.cache = None
            return
        width = max(self.width, mask.shape[1])
        old = [_numpy(v) for v in self.cached(self.width)]
        self.cache = None
        new = [_numpy(v) for v in present]
        self.past = [np.concatenate([_left_pad(a, width, 2), _left_pad(b, width, 2)])
                     for a, b in zip(old, new, strict=True)]
        self.mask = np.concatenate([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.positions = np.concatenate([self.positions, positions])
        self.last = np.concatenate([self.last, last])
        self.requests.extend(requests)

    def forward(self) -> np.ndarray:
        """One decode step of every row (the last tokens in); returns the logits."""
        gen = self.generator
        batch = len(self.requests)
        self.mask = np.concatenate([self.mask, np.ones((batch, 1), np.int64)], axis=1)
        self.positions = self.positions + 1
        if gen.shared_kv:
            total = self.width
            if self.cache is None or total > self.cache.capacity:
                # room for every row's remaining tokens: no regrowth until the batch changes
                room = max(r.state.limit - len(r.state.generated) for r in self.requests)
                self.cache = InPlaceCache(gen, batch, total + room,
                                          [_numpy(v) for v in self.cached(total - 1)])
                self.past = []
            return self.cache.forward(self.last[:, None], self.mask, self.positions[:, None])
        logits, self.past = gen._forward(self.last[:, None], self.mask,
                                         self.positions[:, None], self.past)
        return logits

    def retire(self) -> list[R]:
        """Drop finished rows and the cache columns that are padding in every remaining row;
        returns the dropped requests (the caller closes them)."""
        keep = [i for i, r in enumerate(self.requests) if not r.state.done]
        if len(keep) == len(self.requests):
            return []
        done = [r for r in self.requests if r.state.done]
        if not keep:
            self.clear()
            return done
        index = np.array(keep)
        self.requests = [self.requests[i] for i in keep]
        mask = self.mask[index]
        start = int(np.argmax(mask.any(axis=0)))
        self.mask = mask[:, start:]
        self.positions = self.positions[index]
        self.last = self.last[index]
        self.past = [np.ascontiguousarray(_numpy(v)[index][:, :, start:])
                     for v in self.cached(mask.shape[1])]
        self.cache = None
        return done

    def clear(self) -> None:
        self.requests = []
        self.mask = np.zeros((0, 0), np.int64)
        self.positions = np.zeros((0,), np.int64)
        self.last = np.zeros((0,), np.int64)
        self.past = []
        self.cache = None

    def cached(self, length: int) -> list[Any]:
        """The cache, ``length`` positions: from the in-place buffers when there are, else the
        past-sized tensors."""
        return self.cache.arrays(length) if self.cache is not None else self.past


def prefill_groups(requests: list[R], invariant: bool, rows_couple: bool) -> list[list[R]]:
    """Requests that may be prefilled in one pass: all of them in the shared mode (left-padded);
    in batch-invariant mode those of equal prompt length only, or one by one when the package's
    rows couple."""
    if not invariant:
        return [requests] if requests else []
    if rows_couple:
        return [[r] for r in requests]
    groups: dict[int, list[R]] = {}
    for request in requests:
        groups.setdefault(len(request.state.prompt), []).append(request)
    return list(groups.values())


def place(batches: list[RunningBatch[R]], width: int, invariant: bool, rows_couple: bool
          ) -> RunningBatch[R] | None:
    """The running batch that rows of ``width`` cache positions join, or None for a new one."""
    live = [b for b in batches if len(b)]
    if not invariant:
        return live[0] if live else None
    if rows_couple:
        return None
    return next((b for b in live if b.width == width), None)


def rows_couple(generator: Generator) -> bool:
    """Whether one row's activations change another row's numbers even at equal length: dynamic
    int8 quantizes each MatMul's input with one scale for the whole batch tensor
    (DynamicQuantizeLinear), so a row's result depends on every row beside it."""
    return bool(generator.package.manifest.quantization == "int8_dynamic")


def _numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def _left_pad(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing <= 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)
