"""Decoding parameters and next-token selection (greedy, temperature, top-k, top-p,
repetition penalty with transformers' semantics; presence and frequency penalties with
OpenAI's), in numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.runtime.constraints import ResponseFormat

MAX_NEW_TOKENS_LIMIT = 1_000_000
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_PROMPT_LOOKUP = 7  # draft tokens per step: with the last token, 8 rows (one kernel pass)
PREDICTION_LOOKUP = 4  # draft tokens per step where a prediction sets no prompt_lookup
MAX_PREDICTION_CHARS = 1_000_000


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` is greedy decoding.

    ``eos_token_ids=None`` uses the package's; ``stop`` strings end generation before them.
    ``response_format`` constrains the output to a JSON schema, regex or grammar (a
    :class:`~llmopt.runtime.constraints.ResponseFormat`, or OpenAI's ``response_format`` dict).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0   # OpenAI's: subtracted once from each generated token
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generation
    logprobs: int | None = None     # record each chosen token's logprob and this many top ones
    response_format: ResponseFormat | None = None
    # draft tokens looked up in the sequence so far and checked in one step (0: off); the same
    # tokens as without, fewer steps where the answer repeats its prompt (the Generator's single
    # prompt; the engine's row while it runs alone in its batch)
    prompt_lookup: int = 0
    # text the answer is expected to resemble (OpenAI's Predicted Outputs): drafts are looked up
    # in it too, PREDICTION_LOOKUP per step unless prompt_lookup says; the same tokens as without
    prediction: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.response_format, dict):  # OpenAI's shape, as a convenience
            object.__setattr__(self, "response_format",
                               ResponseFormat.from_openai(self.response_format))
        _check(self.response_format is None or isinstance(self.response_format, ResponseFormat),
               f"response_format must be a ResponseFormat, not {self.response_format!r}",
               "e.g. response_format=ResponseFormat.json_object()")
        _check(not (self.ignore_eos and self.response_format is not None),
               "ignore_eos cannot combine with response_format: a complete output ends with "
               "end-of-sequence", "drop ignore_eos")
        _check(isinstance(self.max_new_tokens, int)
               and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
               f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, "
               f"not {self.max_new_tokens!r}", "e.g. max_new_tokens=128")
        _check(_finite(self.temperature) and 0.0 <= self.temperature <= 100.0,
               f"temperature must be between 0 and 100, not {self.temperature!r}",
               "use 0 for greedy decoding, 0.7 for typical sampling")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be a non-negative integer, not {self.top_k!r}",
               "use 0 to disable, or e.g. top_k=50")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0,
               f"top_p must be in (0, 1], not {self.top_p!r}", "use 1.0 to disable, or e.g. 0.9")
        _check(_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
               f"repetition_penalty must be in (0, 10], not {self.repetition_penalty!r}",
               "use 1.0 to disable, or e.g. 1.1")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
               f"seed must be a non-negative integer, not {self.seed!r}", "e.g. seed=0")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop strings must be non-empty strings", 'e.g. stop=("\\n\\n",)')
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2.0 <= value <= 2.0,
                   f"{name} must be between -2 and 2, not {value!r}", f"use 0 to disable {name}")
        check_prompt_lookup(self.prompt_lookup)
        _check(self.prediction is None or (isinstance(self.prediction, str)
                                           and len(self.prediction) <= MAX_PREDICTION_CHARS),
               f"prediction must be a string of at most {MAX_PREDICTION_CHARS} characters",
               "pass the text the answer is expected to resemble, or leave it out")
        _check(self.logprobs is None or (isinstance(self.logprobs, int)
                                         and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
               f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, not {self.logprobs!r}",
               "use None for no logprobs, 0 for the chosen token's only")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse token ids and a ``top_k`` that a model of ``vocab_size`` tokens cannot have
        (an eos id it never emits would silently never stop generation)."""
        bad = [t for t in self.eos_token_ids or () if not 0 <= t < vocab_size]
        _check(not bad, f"eos_token_ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})",
               "pass ids from this model's tokenizer, or leave eos_token_ids unset")
        _check(self.top_k <= vocab_size,
               f"top_k {self.top_k} is beyond the vocabulary of {vocab_size} tokens",
               f"use 0 to disable, or at most {vocab_size}")

    @property
    def drafts(self) -> int:
        """Draft tokens per step: ``prompt_lookup``, else PREDICTION_LOOKUP with a prediction,
        else 0 (no drafting)."""
        return self.prompt_lookup or (PREDICTION_LOOKUP if self.prediction else 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def check_prompt_lookup(value: object) -> None:
    """Refuse a prompt-lookup draft length that is not an integer from 0 to
    :data:`MAX_PROMPT_LOOKUP` (requests' and the engine's default alike)."""
    _check(isinstance(value, int) and not isinstance(value, bool)
           and 0 <= value <= MAX_PROMPT_LOOKUP,
           f"prompt_lookup must be an integer from 0 to {MAX_PROMPT_LOOKUP}, not {value!r}",
           "use 0 to turn it off, or e.g. prompt_lookup=4")


def _check(ok: bool, message: str, fix: str) -> None:
    if not ok:
        raise InvalidInputError(message, fix=fix)


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[int], penalty: float) -> None:
    """transformers' rule, in place: divide positive, multiply negative logits of seen tokens."""
    if penalty == 1.0 or not len(seen):
        return
    index = np.unique(np.asarray(seen, dtype=np.int64))
    values = logits[index]
    logits[index] = np.where(values < 0, values * penalty, values / penalty)


def apply_openai_penalties(logits: np.ndarray, generated: Sequence[int], presence: float,
                           frequency: float) -> None:
    """OpenAI's rule, in place: ``logit -= presence * [count > 0] + frequency * count`` over
    the tokens generated so far (the prompt is not counted, as in OpenAI's and vLLM's)."""
    if (presence == 0.0 and frequency == 0.0) or not len(generated):
        return
    tokens, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    logits[tokens] -= presence + frequency * counts


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())


def next_token(logits: np.ndarray, params: SamplingParams, seen: Sequence[int],
               rng: np.random.Generator | None, generated: Sequence[int] = (),
               allowed: np.ndarray | None = None) -> int:
    """Pick the next token from one row of logits ``[vocab]``; ``seen`` is prompt and
    generation (repetition penalty), ``generated`` the generation alone (OpenAI penalties),
    ``allowed`` a bool mask from a response format's grammar where given."""
    if (params.greedy or rng is None) and allowed is None and params.repetition_penalty == 1.0 \
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0:
        return int(np.argmax(logits))  # float64 would pick the same: widening keeps the order
    logits = logits.astype(np.float64, copy=True)
    if allowed is not None:
        logits[~allowed] = -np.inf
    apply_repetition_penalty(logits, seen, params.repetition_penalty)
    apply_openai_penalties(logits, generated, params.presence_penalty, params.frequency_penalty)
    if params.greedy or rng is None:
        return int(np.argmax(logits))
    logits /= params.temperature
    if params.top_k and params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - np.max(logits))
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff = int(np.searchsorted(cumulative, params.top_p)) + 1
        keep = order[:cutoff]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))
