"""The Generator: prefill, then decode with the KV cache kept in ONNX Runtime values.

Every step is :meth:`llmopt.runtime.kv.DecoderModel.step` on the cache the package calls for
(:meth:`~llmopt.runtime.kv.DecoderModel.cache`): one buffer updated in place by a
``shared_buffer`` graph, else the previous step's ``present.*`` OrtValues bound straight back as
``past_key_values.*``; either way the cache is never copied into numpy between steps. Batches
of prompts are left-padded, with attention mask and position ids that skip the padding, so a
prompt decodes the same tokens alone or in a batch. A one-prompt generation whose prompt starts
with 16 or more tokens an earlier one ran (a chat's earlier turns and answers, a shared system
prompt) prefills only the rest, from their cached keys and values
(:mod:`llmopt.runtime.prefix_cache`; the same numbers as a whole prefill).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as Generator_
from dataclasses import replace
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.runtime.chat_template import render_chat
from llmopt.runtime.kv import DecoderModel, left_pad, position_ids
from llmopt.runtime.kv_cache import CopyingCache, InPlaceCache, KVCache, KVPlacement
from llmopt.runtime.prefix_cache import (
    DEFAULT_BYTES,
    PrefixCache,
    answers_reusable,
    check_budget,
    unreusable,
)
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import DecodeState, GenerationResult
from llmopt.runtime.session import SessionInfo

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]


class TextStream:
    """Iterator of text deltas; ``result`` holds the :class:`GenerationResult` once exhausted.

    The concatenated deltas equal ``result.text``.
    """

    def __init__(self, deltas: Iterator[str], holder: list[GenerationResult]) -> None:
        self._deltas = deltas
        self._holder = holder

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    @property
    def result(self) -> GenerationResult:
        if not self._holder:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._holder[0]


class Generator:
    """Text generation over a decoder package (created by :func:`llmopt.load`)."""

    def __init__(self, package: Any, session: Any, info: SessionInfo, tokenizer: Any,
                 prompt_session: Any = None, initializers: dict[str, Any] | None = None
                 ) -> None:
        self.package = package
        self.session = session
        self.session_info = info
        self.tokenizer = tokenizer
        self.model = DecoderModel(session, package.kv_cache, prompt_session)
        # OrtValues the sessions read without owning (llmopt.runtime.prompt_graph): held here
        self.initializers = initializers or {}
        self.eos_token_ids = package.manifest.eos_token_ids
        self.pad_token_id = package.manifest.pad_token_id
        self.context_length = package.manifest.context_length
        self.placement = KVPlacement.of(info)  # every KV binding and allocation
        self.shared_kv = self.model.shared_buffer
        self.prefixes: PrefixCache | None = None
        self.prefix_cache_bytes = DEFAULT_BYTES
        self._prefix_lock = threading.Lock()

    @property
    def prefix_cache_bytes(self) -> int:
        """Host bytes of recent one-prompt generations' cache (prompt and answer) kept so a
        later prompt that starts with them prefills only the rest; 0 turns it off (and frees
        it). 128 MiB by default; nothing is kept for packages where reuse would change numbers
        (:func:`~llmopt.runtime.prefix_cache.unreusable`) or whose cache is not in host
        memory."""
        return 0 if self.prefixes is None else self.prefixes.budget_bytes

    @prefix_cache_bytes.setter
    def prefix_cache_bytes(self, budget: int) -> None:
        check_budget(budget)
        usable = budget and unreusable(self) is None and self.placement.on_host
        self.prefixes = PrefixCache(budget) if usable else None

    @property
    def device(self) -> str:
        return self.placement.device

    @property
    def device_id(self) -> int:
        return self.placement.device_id

    @property
    def providers(self) -> list[str]:
        return list(self.session_info.active)

    # -- prompts -------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: text, chat messages (rendered with the chat template), or ids."""
        if isinstance(prompt, str) and self.tokenizer is None:
            raise InvalidInputError("this package has no tokenizer, so it takes token ids only",
                                    fix="pass a list of token ids, or re-export with a tokenizer")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidInputError("the prompt is empty", fix="pass some text to continue")
            if chat:
                return self.render_chat([{"role": "user", "content": prompt}])
            return list(self.tokenizer(prompt)["input_ids"])
        items = list(prompt)
        if not items:
            raise InvalidInputError("the prompt is empty", fix="pass text, messages or token ids")
        if all(isinstance(m, dict) for m in items):
            return self.render_chat(items)  # type: ignore[arg-type]
        if all(isinstance(t, int | np.integer) for t in items):
            vocab = self.vocab_size
            ids = [int(t) for t in items]  # type: ignore[call-overload]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidInputError(f"token ids {bad[:5]} are outside the vocabulary "
                                        f"(0..{vocab - 1})", fix="pass ids from this tokenizer")
            return ids
        raise InvalidInputError("a prompt is a string, a list of chat messages "
                                "({'role': ..., 'content': ...}), or a list of token ids",
                                fix="pass one of those")

    @property
    def vocab_size(self) -> int:
        """Rows of the logits: token ids (prompt, eos) must lie below it."""
        return int(self.package.manifest.vocab_size)

    def render_chat(self, messages: Sequence[dict[str, Any]],
                    tools: Sequence[dict[str, Any]] | None = None,
                    tool_choice: Any = "auto") -> list[int]:
        """Token ids of chat ``messages`` rendered by the chat template, ending with the
        assistant's turn; ``tools`` (OpenAI-shaped) are offered to the model as
        :func:`~llmopt.runtime.chat_template.render_chat` explains."""
        text = render_chat(self.tokenizer, messages, tools, tool_choice)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *,
                 chat: bool = False, **overrides: Any) -> GenerationResult:
        """Generate a completion of one prompt (its text decoded once, at the end)."""
        return self.generate_batch([prompt], params, chat=chat, **overrides)[0]

    def chat(self, messages: str | Sequence[dict[str, str]], params: SamplingParams | None = None,
             **overrides: Any) -> GenerationResult:
        """Generate the assistant's reply to chat messages (or one user message)."""
        return self.generate(messages, params, chat=True, **overrides)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *,
               chat: bool = False, **overrides: Any) -> TextStream:
        """Like :meth:`generate`, but an iterator of text deltas."""
        params = _params(params, overrides)
        self.check_params(params)
        started = time.perf_counter()
        tokens = self.encode(prompt, chat=chat)
        self.check_context(tokens)
        holder: list[GenerationResult] = []

        def deltas() -> Iterator[str]:
            queue: list[str] = []
            run = self._run([tokens], [params], started, lambda row, delta: queue.append(delta))
            while True:
                try:
                    next(run)
                except StopIteration as done:
                    holder.extend(done.value)
                    break
                yield from queue
                queue.clear()
            yield from queue

        return TextStream(deltas(), holder)

    def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams | None = None, *,
                       chat: bool = False, **overrides: Any) -> list[GenerationResult]:
        """Generate completions of several prompts in one batch."""
        if not prompts:
            raise InvalidInputError("no prompts given", fix="pass at least one prompt")
        params = _params(params, overrides)
        self.check_params(params)
        started = time.perf_counter()
        tokens = [self.encode(p, chat=chat) for p in prompts]
        for t in tokens:
            self.check_context(t)
        run = self._run(tokens, [params] * len(tokens), started, None)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return list(done.value)

    def check_params(self, params: SamplingParams) -> None:
        """Refuse options this model cannot honour (ids or top_k beyond its vocabulary)."""
        params.check_vocabulary(self.vocab_size)

    def check_context(self, tokens: list[int]) -> None:
        if len(tokens) >= self.context_length:
            raise InvalidInputError(
                f"the prompt has {len(tokens)} tokens; the model's context is "
                f"{self.context_length}",
                fix=f"shorten the prompt below {self.context_length} tokens",
            )

    def _run(self, prompts: list[list[int]], params: list[SamplingParams], started: float,
             on_delta: Callable[[int, str], None] | None
             ) -> Generator_[tuple[int, ...], None, list[GenerationResult]]:
        """The decode loop; yields each row's count of generated tokens after each step (so
        streams can hand out text, and a step that confirmed drafts shows its tokens), and
        returns the results."""
        batch = len(prompts)

        def sink(row: int) -> Callable[[str], None] | None:
            return None if on_delta is None else (lambda delta: on_delta(row, delta))

        states = [DecodeState(t, p, self.tokenizer, self.eos_token_ids, self.context_length,
                              started, sink(row))
                  for row, (t, p) in enumerate(zip(prompts, params, strict=True))]
        ids, mask = left_pad(prompts, self.pad_token_id)
        history = ids  # every token so far, for a LongRoPE re-prefill (kv.DecoderModel.reprefills)
        positions = position_ids(mask)
        # room for the prompt and the longest answer (an in-place cache never regrows)
        capacity = ids.shape[1] + max(s.limit for s in states)
        # every step's mask is a prefix of one array (the prompt's mask, then ones): growing it
        # makes a view, not a new array per step (allocated on the cold caches between steps,
        # see kv.StepInputs)
        masks = np.ones((batch, capacity), np.int64)
        masks[:, :mask.shape[1]] = mask
        mask = masks[:, :mask.shape[1]]
        cache = self.model.cache(batch, capacity, self.placement)
        prefill_started = time.perf_counter()
        for state in states:
            state.prefill_started = prefill_started
        reusing = self.prefixes is not None and batch == 1
        if reusing:  # the prompt's cached prefix goes in, the rest runs on top of it
            cached = self._cached_prefix(prompts[0], cache)
            states[0].cached_tokens = cached
            ids, positions = ids[:, cached:], positions[:, cached:]
        # draft tokens per step, looked up in the sequence so far (one prompt only)
        lookup = bool(params[0].drafts) and batch == 1 and self.speculates
        draft: list[int] = []
        while True:
            if draft:
                next_ids, mask, positions = self._check_draft(states[0], draft, ids, mask,
                                                              positions, cache)
            else:
                logits = self.model.step(ids, mask, positions, cache)
                next_ids = np.full(batch, self.pad_token_id, dtype=np.int64)
                for row, state in enumerate(states):
                    if not state.done:
                        next_ids[row] = state.step(logits[row, -1])
            yield tuple(len(state.generated) for state in states)
            if all(state.done for state in states):
                break
            ids = next_ids[:, None]
            if self.model.rope_long_after is not None:  # kept only where it can re-prefill
                history = np.concatenate([history, ids], axis=1)
            positions = positions[:, -1:] + 1
            mask = masks[:, :mask.shape[1] + 1]
            if self.model.reprefills(mask.shape[1]):  # the cache restarts from position 0
                ids, positions = history, position_ids(mask)
            elif lookup:
                draft = lookup_draft(states[0])
                if draft:  # the last token runs with its drafts after it
                    ids = np.array([[int(next_ids[0]), *draft]], np.int64)
                    positions = positions[:, -1:] + np.arange(1 + len(draft))
                    mask = masks[:, :mask.shape[1] + len(draft)]
        if reusing:  # the cache now holds mask.shape[1] positions: the prompt, then the answer
            state = states[0]
            kept = mask.shape[1] if answers_reusable(self) else len(state.prompt)
            self._keep((state.prompt + state.generated)[:kept], cache, kept)
        return [state.result() for state in states]

    def _check_draft(self, state: DecodeState, draft: list[int], ids: np.ndarray,
                     mask: np.ndarray, positions: np.ndarray, cache: KVCache
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step of the last token and its ``draft`` on the decode session (whose rows
        compute as one-token steps do): the tokens chosen from its rows while they confirm the
        draft. Returns the last choice (not yet run) and the mask and positions without the
        rejected drafts, whose cache positions the next step rewrites."""
        logits = self.model.step(ids, mask, positions, cache, all_logits=True, prompt=False)
        token, accepted = verify_draft(state, logits[0], draft)
        rejected = len(draft) - accepted
        if rejected:
            mask, positions = mask[:, :-rejected], positions[:, :-rejected]
            rewind(cache, mask.shape[1])
        return np.array([token], np.int64), mask, positions

    @property
    def speculates(self) -> bool:
        """Whether ``SamplingParams.prompt_lookup`` applies here: where one step of several
        tokens computes each of them as one-token steps do (the prefix cache's condition,
        :func:`~llmopt.runtime.prefix_cache.unreusable`)."""
        return unreusable(self) is None

    def _cached_prefix(self, prompt: list[int], cache: KVCache) -> int:
        """Write the longest cached prefix of ``prompt`` into ``cache``; its length (0: none)."""
        assert self.prefixes is not None
        with self._prefix_lock:
            match = self.prefixes.match(prompt)
        if match is None:
            return 0
        if isinstance(cache, InPlaceCache):
            cache.load(match.kv)
        else:
            assert isinstance(cache, CopyingCache)
            cache.past = list(match.kv)
        return match.length

    def _keep(self, tokens: list[int], cache: KVCache, length: int) -> None:
        """Keep the first ``length`` positions of ``cache`` as the keys and values of
        ``tokens``."""
        assert self.prefixes is not None
        if len(tokens) != length or length < self.prefixes.min_tokens:
            return
        if isinstance(cache, InPlaceCache):
            kv = cache.arrays(length)
        else:
            assert isinstance(cache, CopyingCache)
            kv = [np.array(a[:, :, :length]) for a in cache.arrays()]
        with self._prefix_lock:
            self.prefixes.add(tokens, kv)


def prompt_lookup(tokens: Sequence[int] | np.ndarray, count: int, longest: int = 3
                  ) -> list[int]:
    """Up to ``count`` draft tokens: those that followed the latest earlier occurrence of the
    sequence's last ``n`` tokens (``n`` from ``longest`` down to 2), or none."""
    if count < 1 or len(tokens) < 3:
        return []
    seq = np.asarray(tokens, np.int64)
    last = len(seq) - 1
    ends = np.flatnonzero(seq[:-1] == seq[last])  # earlier places of the last token
    for n in range(min(longest, last), 1, -1):
        hits = ends[ends >= n - 1]  # where the n tokens ending there equal the last n
        for back in range(1, n):
            hits = hits[seq[hits - back] == seq[last - back]]
        if hits.size:
            start = int(hits[-1]) + 1
            return [int(t) for t in seq[start:start + count]]
    return []


def lookup_draft(state: DecodeState) -> list[int]:
    """The draft for ``state``'s next step: up to its ``drafts`` tokens (``prompt_lookup``, or
    a prediction's default), fewer where its token limit is nearer, looked up
    (:func:`prompt_lookup`) in its prediction, prompt and what it generated (the prediction
    first: the sequence's last tokens are its own, and a later match wins)."""
    count = min(state.params.drafts, state.limit - len(state.generated) - 1)
    if count < 1:
        return []
    if state.lookup_base is None:  # what does not change from step to step, as an array once
        state.lookup_base = np.asarray(state.prediction + state.prompt, np.int64)
    return prompt_lookup(np.concatenate([state.lookup_base,
                                         np.asarray(state.generated, np.int64)]), count)


def verify_draft(state: DecodeState, logits: np.ndarray, draft: list[int]) -> tuple[int, int]:
    """Choose tokens from a step's rows (``logits [1 + len(draft), vocab]``) while each choice
    equals the draft token the next row was computed on: the last choice (not yet run) and how
    many drafts were confirmed."""
    token, accepted = 0, 0
    for j, row in enumerate(logits):
        token = state.step(row)
        if state.done or j == len(draft) or token != draft[j]:
            break
        accepted += 1
    state.accepted_drafts += accepted
    state.rejected_drafts += len(draft) - accepted
    return token, accepted


def rewind(cache: KVCache, length: int) -> None:
    """Keep the first ``length`` positions: an in-place cache's later ones are masked and
    rewritten by the next step; a copying cache's are cut."""
    if isinstance(cache, CopyingCache):
        cache.past = [np.ascontiguousarray(a[:, :, :length]) for a in cache.arrays()]


def _params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    params = params or SamplingParams()
    if overrides:
        if "stop" in overrides and isinstance(overrides["stop"], str):
            overrides["stop"] = (overrides["stop"],)
        unknown = set(overrides) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(f"unknown generation option(s): {', '.join(sorted(unknown))}",
                                    fix="valid: " + ", ".join(SamplingParams.__dataclass_fields__))
        for key in ("stop", "eos_token_ids"):
            if isinstance(overrides.get(key), list):
                overrides[key] = tuple(overrides[key])
        params = replace(params, **overrides)
    return params
