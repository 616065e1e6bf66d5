"""The Generator: prefill, then decode with the KV cache kept in ONNX Runtime values.

Each step binds the previous step's ``present.*`` OrtValues straight back as
``past_key_values.*`` (IO binding), so the cache is never copied into numpy between steps.
Batches of prompts are left-padded, with attention mask and position ids that skip the padding,
so a prompt decodes the same tokens alone or in a batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as Generator_
from dataclasses import replace
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.runtime.chat_template import render_chat
from llmopt.runtime.kv import DecoderModel, left_pad, position_ids
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import DecodeState, GenerationResult
from llmopt.runtime.session import GPU_PROVIDERS, SessionInfo

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

    def __init__(self, package: Any, session: Any, info: SessionInfo, tokenizer: Any) -> None:
        self.package = package
        self.session = session
        self.session_info = info
        self.tokenizer = tokenizer
        self.model = DecoderModel(session, package.kv_cache)
        generation = package.manifest.get("generation") or {}
        self.eos_token_ids = tuple(int(e) for e in generation.get("eos_token_ids") or ())
        self.pad_token_id = int(generation.get("pad_token_id") or 0)
        self.context_length = int(generation.get("context_length") or self.model.max_positions)
        on_gpu = bool(info.active) and info.active[0] in GPU_PROVIDERS
        self.device = "cuda" if on_gpu else "cpu"
        self.device_id = info.device_id if on_gpu else 0  # every KV binding and allocation
        self.shared_kv = bool(package.kv_cache.get("shared_buffer"))

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
        return int(str(self.package.manifest["signature"]["outputs"][0]["shape"][-1]))

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
        """Generate a completion of one prompt."""
        stream = self.stream(prompt, params, chat=chat, **overrides)
        for _ in stream:
            pass
        return stream.result

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
             ) -> Generator_[None, None, list[GenerationResult]]:
        """The decode loop; yields after each step so streams can hand out text, and returns
        the results."""
        batch = len(prompts)

        def sink(row: int) -> Callable[[str], None] | None:
            return None if on_delta is None else (lambda delta: on_delta(row, delta))

        states = [DecodeState(t, p, self.tokenizer, self.eos_token_ids, self.context_length,
                              started, sink(row))
                  for row, (t, p) in enumerate(zip(prompts, params, strict=True))]
        ids, mask = left_pad(prompts, self.pad_token_id)
        history = ids  # every token so far, for a LongRoPE re-prefill (kv.DecoderModel.reprefills)
        positions = position_ids(mask)
        forward: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
        if self.shared_kv:  # room for the prompt and the longest answer
            capacity = ids.shape[1] + max(s.limit for s in states)
            forward = InPlaceCache(self, batch, capacity).forward
        else:
            forward = self._copying(batch)
        prefill_started = time.perf_counter()
        for state in states:
            state.prefill_started = prefill_started
        while True:
            logits = forward(ids, mask, positions)
            next_ids = np.full(batch, self.pad_token_id, dtype=np.int64)
            for row, state in enumerate(states):
                if not state.done:
                    next_ids[row] = state.step(logits[row, -1])
            yield
            if all(state.done for state in states):
                break
            ids = next_ids[:, None]
            history = np.concatenate([history, ids], axis=1)
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            if self.model.reprefills(mask.shape[1]):  # the cache restarts from position 0
                ids, positions = history, position_ids(mask)
        return [state.result() for state in states]

    # -- ONNX Runtime calls ----------------------------------------------------------------------

    def _empty_past(self, batch: int) -> list[Any]:
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id)
                for a in self.model.empty_past(batch)]

    def _copying(self, batch: int) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        """Steps whose present (past plus the new tokens) becomes the next step's past."""
        past = self._empty_past(batch)

        def forward(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
            nonlocal past
            if ids.shape[1] == mask.shape[1]:  # the whole sequence: a prefill on an empty cache
                past = self._empty_past(batch)
            logits, past = self._forward(ids, mask, positions, past)
            return logits

        return forward

    def _forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                 past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One step on past-sized cache tensors; returns the logits and the presents."""
        binding = self.session.io_binding()
        _bind_tokens(binding, self.model, ids, mask, positions)
        for name, value in zip(self.model.past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.model.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])


class InPlaceCache:
    """The KV cache of a ``shared_buffer`` package: one [batch, kv_heads, capacity, head_dim]
    buffer per cache tensor, bound once as both past and present, which the graph updates in
    place; each step binds only the token inputs again. ``initial`` fills the first positions
    (an existing cache, e.g. after the engine regrouped its batch)."""

    def __init__(self, generator: Generator, batch: int, capacity: int,
                 initial: list[np.ndarray] | None = None) -> None:
        import onnxruntime as ort

        model = generator.model
        self.model = model
        self.session = generator.session
        self.capacity = capacity
        shape = [batch, model.num_kv_heads, capacity, model.head_dim]
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits", "cpu")  # first: get_outputs() keeps that order
        self.buffers = []
        for i, (past, present) in enumerate(zip(model.past_names, model.present_names,
                                                strict=True)):
            if initial is None:
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, model.kv_dtype, generator.device, generator.device_id)
            else:
                array = np.zeros(shape, model.kv_dtype)
                array[:, :, :initial[i].shape[2]] = initial[i]
                buffer = ort.OrtValue.ortvalue_from_numpy(array, generator.device,
                                                          generator.device_id)
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)
            self.buffers.append(buffer)

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One step; the cache then holds ``mask.shape[1]`` positions. Returns the logits."""
        _bind_tokens(self.binding, self.model, ids, mask, positions)
        self.binding.bind_output("logits", "cpu")  # a new shape each step: unallocated again
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()

    def arrays(self, length: int) -> list[np.ndarray]:
        """The first ``length`` positions of every cache tensor."""
        return [np.ascontiguousarray(b.numpy()[:, :, :length]) for b in self.buffers]


_LAST_ONLY = np.array(1, np.int64)


def _bind_tokens(binding: Any, model: DecoderModel, ids: np.ndarray, mask: np.ndarray,
                 positions: np.ndarray) -> None:
    """The step's token inputs; logits of the last position only, all generation needs."""
    binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
    binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
    binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
    if model.keeps_logits:
        binding.bind_cpu_input("logits_to_keep", _LAST_ONLY)


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
