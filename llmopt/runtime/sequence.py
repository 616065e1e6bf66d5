"""One request's decoding state: token choice, stop conditions, streamed text and timings.

Shared by the Generator's batch loop and the continuous-batching engine, so both stop, sample
and stream exactly alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.runtime.constraints import TokenConstraint
from llmopt.runtime.detokenize import Streamer
from llmopt.runtime.sampling import SamplingParams, log_softmax, next_token

FINISH_REASONS = ("eos", "stop", "length", "context", "cancelled", "deadline")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0  # leading prompt tokens whose cache was reused, not prefilled
    accepted_draft_tokens: int = 0  # generated tokens that prompt lookup drafted (no own step)
    rejected_draft_tokens: int = 0  # drafted tokens the model's own choices did not confirm
    ttft_s: float = 0.0  # request start -> first token chosen (queueing, tokenization, prefill)
    total_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0  # tokens after the first / time after the first

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the raw logits (before penalties, temperature
    or any mask), and the ``top`` most likely tokens of that step as ``(id, logprob)``."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # one of FINISH_REASONS
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for


class DecodeState:
    """Feed it one row of logits per step; it picks the token and knows when to stop."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, tokenizer: object,
                 default_eos: Sequence[int], context_length: int, started: float | None = None,
                 on_delta: Callable[[str], None] | None = None) -> None:
        self.prompt = list(prompt)
        self.params = params
        eos = params.eos_token_ids if params.eos_token_ids is not None else default_eos
        self.eos = set() if params.ignore_eos else set(eos)
        self.rng = None if params.greedy else np.random.default_rng(params.seed)
        self.streamer = Streamer(tokenizer, params.stop)
        # built here, in the submitting thread: a grammar that fails fails its own request
        self.constraint = None if params.response_format is None else TokenConstraint(
            params.response_format, tokenizer, sorted(self.eos))
        self.limit = min(params.max_new_tokens, context_length - len(self.prompt))
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.finish_reason: str | None = None
        self.on_delta = on_delta
        self.started = time.perf_counter() if started is None else started
        self.prefill_started: float | None = None
        self.cached_tokens = 0  # leading prompt tokens the prefill took from the prefix cache
        self.accepted_drafts = 0  # prompt-lookup draft tokens the model's own choices confirmed
        self.rejected_drafts = 0  # drafted tokens they did not
        # tokens of the text the answer is expected to resemble, searched for drafts too
        self.prediction = _prediction_tokens(params.prediction, tokenizer)
        self.lookup_base: np.ndarray | None = None  # prediction + prompt, built at the 1st draft
        self.first_token_at: float | None = None
        self.ended_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self, logits: np.ndarray) -> int:
        """Choose the next token from ``logits [vocab]``; returns it (the last input next step)."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        allowed = None if self.constraint is None else self.constraint.allowed(logits.shape[-1])
        seen = self.prompt + self.generated if self.params.repetition_penalty != 1.0 else ()
        token = next_token(logits, self.params, seen, self.rng, self.generated, allowed)
        if token in self.eos:
            self._finish("eos")
            return token
        self.generated.append(token)
        if self.logprobs is not None:
            self.logprobs.append(_logprob(logits, token, self.params.logprobs or 0))
        if self.constraint is not None:
            self.constraint.consume(token)
        if self.on_delta is None and not self.streamer.stop:  # the text is wanted at the end
            self.streamer.add(token)
        else:
            delta = self.streamer.push(token)
            if delta and self.on_delta:
                self.on_delta(delta)
        if self.streamer.stopped:
            self._finish("stop")
        elif self.constraint is not None and self.constraint.complete:
            self._finish("eos")  # the grammar allows nothing but end-of-sequence: skip that step
        elif len(self.generated) >= self.limit:
            self._finish("length" if self.limit == self.params.max_new_tokens else "context")
        return token

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.done:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.ended_at = time.perf_counter()
        tail = self.streamer.finish()
        if tail and self.on_delta:
            self.on_delta(tail)

    def result(self) -> GenerationResult:
        self.streamer.catch_up()  # a result asked for before the end: the text so far
        ended = self.ended_at or time.perf_counter()
        first = self.first_token_at or ended
        n = len(self.generated)
        prefill_s = first - (self.prefill_started or self.started)
        stats = GenerationStats(
            prompt_tokens=len(self.prompt),
            generated_tokens=n,
            cached_prompt_tokens=self.cached_tokens,
            accepted_draft_tokens=self.accepted_drafts,
            rejected_draft_tokens=self.rejected_drafts,
            ttft_s=first - self.started,
            total_s=ended - self.started,
            prefill_tokens_per_s=(len(self.prompt) - self.cached_tokens) / prefill_s
            if prefill_s > 0 else 0.0,
            decode_tokens_per_s=(n - 1) / (ended - first) if n > 1 and ended > first else 0.0,
        )
        return GenerationResult(self.streamer.emitted, list(self.generated),
                                self.finish_reason or "length", stats,
                                None if self.logprobs is None else list(self.logprobs))


def _prediction_tokens(prediction: str | None, tokenizer: object) -> list[int]:
    if not prediction:
        return []
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise InvalidInputError("a prediction is text, and this package has no tokenizer",
                                fix="leave prediction out (prompt_lookup drafts from the "
                                "token ids so far)")
    return list(encode(prediction, add_special_tokens=False))


def _logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    logprobs = log_softmax(logits)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        order = np.argpartition(-logprobs, top - 1)[:top]
        order = order[np.argsort(-logprobs[order], kind="stable")]
        best = tuple((int(i), float(logprobs[i])) for i in order)
    return TokenLogprob(token, float(logprobs[token]), best)
