"""Continuous batching: requests join a running batch at step boundaries and leave when done.

One background thread owns the ONNX Runtime session. Each decode step runs every running batch
(:mod:`llmopt.runtime.batch`) once. Batch-invariant mode (the default) never pads a row: new
requests are prefilled with those of equal prompt length and join the running batch of exactly
their length, or start their own, so a greedy answer is the same whatever else is running. The
shared mode (``batch_invariant=False``) keeps one batch and left-pads the shorter KV caches
(masked positions): one forward pass per step for all live requests, faster with many streams,
but a row's logits then depend on the padding (docs/batch_invariance.md). A prompt longer than
``EngineConfig.prefill_chunk`` is prefilled one chunk per engine step, between decode steps of
the running batches (:mod:`llmopt.runtime.prefill`), so at most one chunk of prompt tokens runs
between two tokens of a running stream, and giving up on it stops it within one chunk. A
prompt that starts with at least 16 tokens the engine ran before (a system prompt, a chat's
earlier turns) is prefilled from their cached keys and values, alone
(:mod:`llmopt.runtime.prefix_cache`: the same numbers as a whole prefill). Finished, cancelled
or expired requests leave at the next step boundary and their rows (and any all-padding cache
columns) are dropped at once. A bounded queue and a KV-cache memory budget
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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from llmopt.errors import BusyError, InvalidInputError
from llmopt.runtime.batch import RunningBatch, place, prefill_groups, rows_couple
from llmopt.runtime.generator import Generator, Prompt, lookup_draft, verify_draft
from llmopt.runtime.memory import TRIM_AFTER_TOKENS, trim_heap
from llmopt.runtime.prefill import Prefill, StepRecord
from llmopt.runtime.prefix_cache import DEFAULT_BYTES as DEFAULT_PREFIX_CACHE_BYTES
from llmopt.runtime.prefix_cache import PrefixCache, answers_reusable, check_budget, unreusable
from llmopt.runtime.sampling import SamplingParams, check_prompt_lookup
from llmopt.runtime.sequence import DecodeState, GenerationResult
from llmopt.runtime.slots import SlotCopier

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
    # bytes the KV stores may hold (preallocated slots and positions counted); None: no limit
    kv_budget_bytes: int | None = None
    max_prefill_batch: int = 4
    # rows never padded: same greedy tokens whatever else runs (False: one shared padded batch)
    batch_invariant: bool = True
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    max_prompt_tokens: int | None = None
    # host bytes of recent prompts' and answers' KV cache kept for reuse; 0: no prefix cache
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    # prompt-lookup draft tokens of requests that set none (SamplingParams.prompt_lookup); a
    # request drafts while it runs alone in its batch, with the same tokens as without
    prompt_lookup: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_prefill_batch"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1", fix=f"set {name} to 1 or more")
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise InvalidInputError(f"prefill_chunk must be >= 0, not {self.prefill_chunk}",
                                    fix="e.g. 256 tokens per step; 0 turns chunking off")
        check_budget(self.prefix_cache_bytes)
        check_prompt_lookup(self.prompt_lookup)
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise InvalidInputError(
                f"max_prompt_tokens must be >= 1, not {self.max_prompt_tokens}",
                fix="set a token count, or leave it out for the model's context")

    @property
    def chunk(self) -> int | None:
        """The prefill chunk, ``None`` when chunking is off."""
        return self.prefill_chunk or None


class Request:
    """A submitted generation: iterate it for text deltas (or :meth:`chunks` for deltas with
    their token counts); ``result()`` waits for the end."""

    _ids = itertools.count(1)

    def __init__(self, state: DecodeState, deadline: float | None) -> None:
        self.id = next(self._ids)
        self.state = state
        self.deadline = deadline  # time.monotonic() value
        self.events: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        state.on_delta = self._delta

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step boundary."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        for text, _ in self.chunks():
            yield text

    def chunks(self) -> Iterator[tuple[str, int]]:
        """Text deltas, each with the number of tokens generated when it was emitted (so a
        stream can send each token's log-probability with the text it produced)."""
        while True:
            item = self.events.get()
            if item is _END:
                return
            yield item

    def _delta(self, text: str) -> None:
        self.events.put((text, len(self.state.generated)))

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
        self._batches: list[RunningBatch[Request]] = []
        # admitted groups waiting for (or in) their chunked prefill; the first runs one chunk a step
        self._prefills: deque[Prefill[Request]] = deque()
        self._rows_couple = rows_couple(generator)
        self._ragged = model.ragged  # rows of any lengths share one pass unpadded
        # the device-side copies of the running batches' slot stores (shared-buffer graphs)
        self._copier = SlotCopier(model.layout, generator.placement) \
            if generator.shared_kv else None
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps: every running batch advanced by one token
        self.forward_passes = 0  # session runs, prefills included
        self._prefilled_since_trim = 0
        # recent prompts' and answers' cache, for prompts that start with them
        self.prefixes: PrefixCache | None = None
        blocker = unreusable(generator)
        if self.config.prefix_cache_bytes and blocker is None:
            self.prefixes = PrefixCache(self.config.prefix_cache_bytes)
        elif self.config.prefix_cache_bytes:
            log.info("no prefix cache for this package: %s", blocker)
        self._keep_answers = answers_reusable(generator)
        # a lone row's prompt-lookup drafts run where they compute as one-token steps
        self._speculates = generator.speculates
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
        if not params.prompt_lookup and self.config.prompt_lookup:
            params = replace(params, prompt_lookup=self.config.prompt_lookup)
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
        """Rows running, in every running batch."""
        return sum(len(b) for b in self._batches)

    @property
    def running_batches(self) -> int:
        return len(self._batches)

    @property
    def _running(self) -> list[Request]:
        return [r for b in self._batches for r in b.requests]

    @property
    def _prefilling(self) -> list[Request]:
        return [r for p in self._prefills for r in p.members]

    def close(self, grace: float | None = None) -> None:
        """Stop taking requests; let running ones finish within ``grace`` seconds (then cancel)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        deadline = None if grace is None else time.monotonic() + grace
        while self._thread and self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                for request in self._running + list(self._waiting) + self._prefilling:
                    request.cancel()
            self._thread.join(0.05)
        self._thread = None

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        """One engine step: at most one prefill chunk, then one decode step of every batch."""
        while True:
            with self._lock:
                while (not self._waiting and not self._running and not self._prefills
                       and not self._stopping):
                    self._lock.wait()
                if (self._stopping and not self._waiting and not self._running
                        and not self._prefills):
                    return
                if not self._prefills:
                    admitted = self._take_admissible()
                    if admitted:
                        self._start_prefill(admitted)
            try:
                self._prefill_some()
                if self._running:
                    self._decode()
            except Exception:  # a broken step must not hang its clients
                log.exception("engine step failed; failing the requests in it")
                for request in self._prefilling + self._running:
                    request.state.cancel("error")
                    request._close()
                self._prefills.clear()
                self._batches = []
            if (not self._running and not self._prefills
                    and self._prefilled_since_trim >= TRIM_AFTER_TOKENS):
                trim_heap()  # the long prompts' cache and activations go back to the OS
                self._prefilled_since_trim = 0

    def _take_admissible(self) -> list[Request]:
        """The next requests to prefill: waiting ones in order, within the batch, the KV budget
        and (with chunking) one chunk padded to the longest, or one longer prompt alone."""
        taken: list[Request] = []
        free = self.config.max_batch_size - len(self._running)
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
            budget = self.config.kv_budget_bytes
            if budget is not None and (self._running or self._prefills or taken) and \
                    self._kv_bytes_after([*taken, request]) > budget:
                break  # wait for memory to free up (a lone request is always admitted)
            taken.append(self._waiting.popleft())
        return taken

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache the running batches' stores hold (their preallocated slots and
        positions included); what ``kv_budget_bytes`` bounds."""
        # a batch whose rows all left is dropped at the end of this step, its store with it
        return sum(b.kv_positions for b in self._batches if len(b)) * self.kv_bytes_per_token

    def _kv_bytes_after(self, admitted: list[Request]) -> int:
        """An upper bound of :attr:`kv_bytes` once ``admitted`` (and the prefills queued
        before them) joined their batches and every row ran to its token limit: into the one
        running batch where all rows share one, else each into a batch of its own."""
        joining = [*(r for p in self._prefills for r in p.members), *admitted]
        live = [b for b in self._batches if len(b)]
        positions = sum(b.kv_positions_after([], 0) for b in live)
        if (self._ragged or not self.config.batch_invariant) and not self._rows_couple:
            target = live[0] if live else self._new_batch()
            width = max(len(r.state.prompt) for r in joining)
            positions += target.kv_positions_after(joining, width) - (
                target.kv_positions_after([], 0))
        else:
            positions += sum(self._new_batch().kv_positions_after([r], len(r.state.prompt))
                             for r in joining)
        return positions * self.kv_bytes_per_token

    def _new_batch(self) -> RunningBatch[Request]:
        budget = self.config.kv_budget_bytes
        return RunningBatch[Request](
            self.generator, self.config.max_batch_size, self._copier,
            None if budget is None else budget // self.kv_bytes_per_token)

    def _expired(self, request: Request) -> bool:
        return request.deadline is not None and time.monotonic() > request.deadline

    def _abandoned(self, request: Request) -> str | None:
        """Why to stop ``request`` now, if at all. A deadline wins over a cancel: a server
        cancels a call whose deadline passed, and that is still a deadline."""
        if self._expired(request):
            return "deadline"
        return "cancelled" if request.cancelled.is_set() else None

    def _start_prefill(self, requests: list[Request]) -> None:
        """Queue the admitted requests' prefill groups (equal lengths in batch-invariant mode);
        a prompt that starts with a cached prefix runs alone, from that prefix's cache."""
        now = time.perf_counter()
        fresh = []
        for request in requests:
            request.state.prefill_started = now
            prompt = request.state.prompt
            match = self.prefixes.match(prompt) if self.prefixes is not None else None
            if match is None:
                fresh.append(request)
                continue
            request.state.cached_tokens = match.length
            self._prefills.append(Prefill(self.generator, [request], [prompt],
                                          self.config.chunk, match))
        for group in prefill_groups(fresh, self.config.batch_invariant, self._rows_couple,
                                    self._ragged):
            self._prefills.append(Prefill(self.generator, group,
                                          [r.state.prompt for r in group], self.config.chunk))

    def _prefill_some(self) -> None:
        """This step's prefill: the first group's next chunk, then the next groups' while the
        step's prompt positions stay within one chunk (every group when chunking is off)."""
        chunk, ran = self.config.chunk, 0
        while self._prefills:
            prefill = self._prefills[0]
            if ran and chunk is not None and ran + prefill.next_tokens > chunk:
                return
            ran += self._prefill_step(prefill)

    def _prefill_step(self, prefill: Prefill[Request]) -> int:
        """The group's next chunk; after its last, its rows join a running batch. Rows given
        up on before a chunk end there, and a group with none left stops. Returns the
        positions run."""
        for request in prefill.members:
            reason = self._abandoned(request)
            if reason is not None:
                request.state.cancel(reason)
        if all(r.state.done for r in prefill.members):
            for request in prefill.members:
                request._close()
            self._prefills.popleft()
            return 0
        tokens = prefill.step()
        self.forward_passes += 1
        self._prefilled_since_trim += tokens
        self._record("prefill", prefill.members, tokens)
        if not prefill.finished:
            return tokens
        self._prefills.popleft()
        requests, logits = prefill.members, prefill.logits
        assert logits is not None
        if self.prefixes is not None:
            self._keep_prompts(prefill)
        last = np.array([r.state.step(logits[i, -1]) if not r.state.done else 0
                         for i, r in enumerate(requests)], np.int64)
        batch = place(self._batches, prefill.mask.shape[1], self.config.batch_invariant,
                      self._rows_couple, self._ragged)
        if batch is None:
            batch = self._new_batch()
            self._batches.append(batch)
        batch.merge(requests, prefill.mask, prefill.positions[:, -1], last, prefill.present)
        self._retire()
        return tokens

    def _keep_prompts(self, prefill: Prefill[Request]) -> None:
        """Cache the unpadded prompts of a finished prefill, for later prompts that start
        with them (a running request's system prompt, before its answer ends)."""
        assert self.prefixes is not None
        kv: list[np.ndarray] | None = None
        for i, request in enumerate(prefill.members):
            if not prefill.mask[i].all() or len(request.state.prompt) < self.prefixes.min_tokens:
                continue  # padded, or too short to be worth keeping
            kv = kv if kv is not None else prefill.cache.arrays()  # host arrays, read once
            self.prefixes.add(request.state.prompt, [np.array(a[i:i + 1]) for a in kv])

    def _keep_answer(self, request: Request, kv: list[np.ndarray]) -> None:
        """Cache a leaving row's prompt and answer (the tokens whose keys and values its
        cache holds), for the conversation's next turn."""
        assert self.prefixes is not None
        tokens = request.state.prompt + request.state.generated
        if kv[0].shape[2] <= len(tokens):
            self.prefixes.add(tokens[:kv[0].shape[2]], kv)

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
        if not self._batches:
            return
        for batch in self._batches:
            draft = lookup_draft(batch.requests[0].state) \
                if len(batch) == 1 and self._speculates else []
            logits = batch.forward(draft)
            self.forward_passes += 1
            self._record("decode", batch.requests, len(batch) + len(draft))
            if draft:  # a lone row checks its prompt-lookup draft (as the Generator does)
                token, accepted = verify_draft(batch.requests[0].state, logits[0], draft)
                batch.rewind(len(draft) - accepted)
                batch.last = np.array([token], np.int64)
            else:
                batch.last = np.array([r.state.step(logits[i, -1])
                                       for i, r in enumerate(batch.requests)], np.int64)
        self.steps += 1
        self._retire()

    def _retire(self) -> None:
        keep = self._keep_answer if self.prefixes is not None and self._keep_answers else None
        for batch in self._batches:
            for request in batch.retire(keep):
                request._close()
        self._batches = [b for b in self._batches if len(b)]
