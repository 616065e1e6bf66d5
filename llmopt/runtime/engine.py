"""Continuous batching: requests join the running batch at step boundaries and leave when done.

One background thread owns the ONNX Runtime session. New requests are prefilled together, then
merged into the running batch by left-padding the shorter KV caches (masked positions), so every
decode step is one forward pass for all live requests. A prompt longer than
``EngineConfig.prefill_chunk`` is prefilled one chunk per engine step, between decode steps of
the running batch (:mod:`llmopt.runtime.prefill`), so at most one chunk of prompt tokens runs
between two tokens of a running stream, and giving up on it stops it within one chunk.
Finished, cancelled or expired requests leave at the next step boundary and their rows (and any
all-padding cache columns) are dropped at once. A bounded queue and a KV-cache memory budget
bound the work; beyond the queue, ``submit`` fails fast with :class:`~llmopt.errors.BusyError`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmopt.errors import BusyError, InvalidInputError
from llmopt.runtime.generator import Generator, InPlaceCache, Prompt
from llmopt.runtime.memory import TRIM_AFTER_TOKENS, trim_heap
from llmopt.runtime.prefill import Prefill, StepRecord
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import DecodeState, GenerationResult

log = logging.getLogger("llmopt.engine")
_END = object()
DEFAULT_PREFILL_CHUNK = 256


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one model's engine.

    ``prefill_chunk``: most prompt positions one engine step prefills (``None`` or 0: a whole
    prompt group in one pass). ``max_prompt_tokens``: longest prompt a request may send
    (``None``: up to the model's context).
    """

    max_batch_size: int = 8
    max_queue: int = 64
    kv_budget_bytes: int | None = None  # None: no limit beyond max_batch_size
    max_prefill_batch: int = 4
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_prefill_batch"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1", fix=f"set {name} to 1 or more")
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise InvalidInputError(f"prefill_chunk must be >= 0, not {self.prefill_chunk}",
                                    fix="e.g. 256 tokens per step; 0 turns chunking off")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise InvalidInputError(
                f"max_prompt_tokens must be >= 1, not {self.max_prompt_tokens}",
                fix="set a token count, or leave it out for the model's context")

    @property
    def chunk(self) -> int | None:
        """The prefill chunk, ``None`` when chunking is off."""
        return self.prefill_chunk or None


class Request:
    """A submitted generation: iterate it for text deltas; ``result()`` waits for the end."""

    _ids = itertools.count(1)

    def __init__(self, state: DecodeState, deadline: float | None) -> None:
        self.id = next(self._ids)
        self.state = state
        self.deadline = deadline  # time.monotonic() value
        self.events: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        state.on_delta = self.events.put

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step boundary."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.events.get()
            if item is _END:
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self.finished.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.state.result()

    def _close(self) -> None:
        self.events.put(_END)
        self.finished.set()


class Engine:
    """Serves many concurrent generations over one :class:`Generator` session."""

    def __init__(self, generator: Generator, config: EngineConfig | None = None) -> None:
        self.generator = generator
        self.config = config or EngineConfig()
        model = generator.model
        itemsize = np.dtype(model.kv_dtype).itemsize
        per_layer = 2 * model.num_kv_heads * model.head_dim * itemsize
        self.kv_bytes_per_token = model.num_layers * per_layer
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._prefill: Prefill[Request] | None = None  # the joining group, while its chunks run
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # the running batch
        self._mask = np.zeros((0, 0), np.int64)
        self._positions = np.zeros((0,), np.int64)
        self._last = np.zeros((0,), np.int64)
        self._past: list[Any] = []
        # shared_buffer packages: the batch's cache in place between joins and leaves
        self._cache: InPlaceCache | None = None
        self.steps = 0
        self._prefilled_since_trim = 0
        # called on the engine thread after every forward pass (tests, tracing); keep it quick
        self.on_step: Callable[[StepRecord], None] | None = None

    # -- public ------------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llmopt-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False,
               timeout: float | None = None) -> Request:
        """Queue a generation (validated here, so bad input fails in the caller's thread)."""
        params = params or SamplingParams()
        tokens = self.generator.encode(prompt, chat=chat)
        self.generator.check_context(tokens)
        limit = self.config.max_prompt_tokens
        if limit is not None and len(tokens) > limit:
            raise InvalidInputError(
                f"the prompt has {len(tokens)} tokens; this engine takes at most {limit} "
                "(max_prompt_tokens)",
                fix=f"shorten the prompt to {limit} tokens, or raise max_prompt_tokens "
                "(llmopt serve --max-prompt-tokens, or llmopt-serve.yaml)")
        state = DecodeState(tokens, params, self.generator.tokenizer,
                            self.generator.eos_token_ids, self.generator.context_length)
        deadline = None if timeout is None else time.monotonic() + timeout
        request = Request(state, deadline)
        with self._lock:
            if self._stopping:
                raise BusyError("the engine is shutting down", fix="retry on another replica")
            if len(self._waiting) >= self.config.max_queue:
                raise BusyError(
                    f"the request queue is full ({self.config.max_queue} waiting)",
                    fix="retry later, or raise max_queue / add replicas",
                )
            self._waiting.append(request)
            self._lock.notify()
        return request

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._running)

    def close(self, grace: float | None = None) -> None:
        """Stop taking requests; let running ones finish within ``grace`` seconds (then cancel)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        deadline = None if grace is None else time.monotonic() + grace
        while self._thread and self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                for request in list(self._running) + list(self._waiting) + self._prefilling:
                    request.cancel()
            self._thread.join(0.05)
        self._thread = None

    # -- the loop ----------------------------------------------------------------------------

    @property
    def _prefilling(self) -> list[Request]:
        return list(self._prefill.members) if self._prefill is not None else []

    def _loop(self) -> None:
        """One engine step: at most one prefill chunk, then one decode step of the batch."""
        while True:
            with self._lock:
                while (not self._waiting and not self._running and self._prefill is None
                       and not self._stopping):
                    self._lock.wait()
                if (self._stopping and not self._waiting and not self._running
                        and self._prefill is None):
                    return
                if self._prefill is None:
                    admitted = self._take_admissible()
                    if admitted:
                        self._prefill = self._start_prefill(admitted)
            try:
                if self._prefill is not None:
                    self._prefill_step(self._prefill)
                if self._running:
                    self._decode()
            except Exception:  # a broken step must not hang its clients
                log.exception("engine step failed; failing the requests in it")
                for request in self._prefilling + self._running:
                    request.state.cancel("error")
                    request._close()
                self._prefill = None
                self._running = []
                self._reset_batch()
            if (not self._running and self._prefill is None
                    and self._prefilled_since_trim >= TRIM_AFTER_TOKENS):
                trim_heap()  # the long prompts' cache and activations go back to the OS
                self._prefilled_since_trim = 0

    def _take_admissible(self) -> list[Request]:
        """The next prefill group: waiting requests in order, within the batch, the KV budget
        and (with chunking) one chunk padded to the longest, or one longer prompt alone."""
        taken: list[Request] = []
        free = self.config.max_batch_size - len(self._running)
        width = self._mask.shape[1]
        chunk = self.config.chunk
        longest = 0
        while self._waiting and len(taken) < min(free, self.config.max_prefill_batch):
            request = self._waiting[0]
            reason = self._abandoned(request)
            if reason is not None:
                self._waiting.popleft()
                request.state.cancel(reason)
                request._close()
                continue
            longest = max(longest, len(request.state.prompt))
            if chunk is not None and taken and (len(taken) + 1) * longest > chunk:
                break  # a longer prompt starts its own (chunked) group next
            rows = len(self._running) + len(taken) + 1
            need = max(width, len(request.state.prompt)) + 1
            budget = self.config.kv_budget_bytes
            if budget is not None and rows * need * self.kv_bytes_per_token > budget and (
                    self._running or taken):
                break  # wait for memory to free up (a lone request is always admitted)
            taken.append(self._waiting.popleft())
        return taken

    def _expired(self, request: Request) -> bool:
        return request.deadline is not None and time.monotonic() > request.deadline

    def _abandoned(self, request: Request) -> str | None:
        """Why to stop ``request`` now, if at all. A deadline wins over a cancel: a server
        cancels a call whose deadline passed, and that is still a deadline."""
        if self._expired(request):
            return "deadline"
        return "cancelled" if request.cancelled.is_set() else None

    def _start_prefill(self, requests: list[Request]) -> Prefill[Request]:
        now = time.perf_counter()
        for request in requests:
            request.state.prefill_started = now
        return Prefill(self.generator, requests, [r.state.prompt for r in requests],
                       self.config.chunk)

    def _prefill_step(self, prefill: Prefill[Request]) -> None:
        """The group's next chunk; after its last, its rows join the running batch. Rows given
        up on before a chunk end there, and a group with none left stops."""
        for request in prefill.members:
            reason = self._abandoned(request)
            if reason is not None:
                request.state.cancel(reason)
        if all(r.state.done for r in prefill.members):
            for request in prefill.members:
                request._close()
            self._prefill = None
            return
        tokens = prefill.step()
        self._prefilled_since_trim += tokens
        self._record("prefill", prefill.members, tokens)
        if not prefill.finished:
            return
        self._prefill = None
        requests, logits = prefill.members, prefill.logits
        assert logits is not None
        last = np.array([r.state.step(logits[i, -1]) if not r.state.done else 0
                         for i, r in enumerate(requests)], np.int64)
        self._merge(requests, prefill.mask, prefill.positions[:, -1], last, prefill.past)
        self._retire()

    def _record(self, kind: str, requests: list[Request], tokens: int) -> None:
        if self.on_step is not None:
            self.on_step(StepRecord(kind, tuple(r.id for r in requests), tokens,
                                    time.monotonic()))

    def _decode(self) -> None:
        for request in self._running:
            reason = self._abandoned(request)
            if reason is not None:
                request.state.cancel(reason)
        self._retire()
        if not self._running:
            return
        batch = len(self._running)
        self._mask = np.concatenate([self._mask, np.ones((batch, 1), np.int64)], axis=1)
        self._positions = self._positions + 1
        if self.generator.shared_kv:
            total = self._mask.shape[1]
            if self._cache is None or total > self._cache.capacity:
                # room for every running request's remaining tokens: no regrowth until the
                # batch changes
                room = max(r.state.limit - len(r.state.generated) for r in self._running)
                self._cache = InPlaceCache(self.generator, batch, total + room,
                                           [_numpy(v) for v in self._cached(total - 1)])
                self._past = []
            logits = self._cache.forward(self._last[:, None], self._mask,
                                         self._positions[:, None])
        else:
            logits, self._past = self.generator._forward(
                self._last[:, None], self._mask, self._positions[:, None], self._past)
        self.steps += 1
        self._record("decode", self._running, batch)
        self._last = np.array([r.state.step(logits[i, -1]) for i, r in enumerate(self._running)],
                              np.int64)
        self._retire()

    # -- batch bookkeeping -------------------------------------------------------------------

    def _merge(self, requests: list[Request], mask: np.ndarray, positions: np.ndarray,
               last: np.ndarray, present: list[Any]) -> None:
        if not self._running:
            self._running = list(requests)
            self._mask, self._positions, self._last, self._past = mask, positions, last, present
            self._cache = None
            return
        width = max(self._mask.shape[1], mask.shape[1])
        old = [_numpy(v) for v in self._cached(self._mask.shape[1])]
        self._cache = None
        new = [_numpy(v) for v in present]
        self._past = [np.concatenate([_left_pad(a, width, 2), _left_pad(b, width, 2)])
                      for a, b in zip(old, new, strict=True)]
        self._mask = np.concatenate([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._positions = np.concatenate([self._positions, positions])
        self._last = np.concatenate([self._last, last])
        self._running.extend(requests)

    def _retire(self) -> None:
        """Drop finished rows and the cache columns that are padding in every remaining row."""
        keep = [i for i, r in enumerate(self._running) if not r.state.done]
        if len(keep) == len(self._running):
            return
        for request in self._running:
            if request.state.done:
                request._close()
        if not keep:
            self._running = []
            self._reset_batch()
            return
        index = np.array(keep)
        self._running = [self._running[i] for i in keep]
        mask = self._mask[index]
        start = int(np.argmax(mask.any(axis=0)))
        self._mask = mask[:, start:]
        self._positions = self._positions[index]
        self._last = self._last[index]
        self._past = [np.ascontiguousarray(_numpy(v)[index][:, :, start:])
                      for v in self._cached(mask.shape[1])]
        self._cache = None

    def _reset_batch(self) -> None:
        self._mask = np.zeros((0, 0), np.int64)
        self._positions = np.zeros((0,), np.int64)
        self._last = np.zeros((0,), np.int64)
        self._past = []
        self._cache = None

    def _cached(self, length: int) -> list[Any]:
        """The running batch's cache, ``length`` positions: from the in-place buffers when
        there are, else the past-sized tensors."""
        return self._cache.arrays(length) if self._cache is not None else self._past


def _numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def _left_pad(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing <= 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)
