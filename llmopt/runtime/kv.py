"""The decoder graph's calling convention and its one step: inputs, KV cache, padding and
positions.

:meth:`DecoderModel.step` is the only place a decoder session runs: the Generator, the serving
engine (prefill and decode) and export validation all call it, each with a
:class:`~llmopt.runtime.kv_cache.KVCache` that says where the past comes from and where the
present goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llmopt.runtime.kv_cache import (
    HOST,
    ROW_LENGTHS,
    CopyingCache,
    InPlaceCache,
    KVCache,
    KVLayout,
    KVPlacement,
)

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
ALL_POSITIONS = np.array(0, np.int64)  # logits_to_keep: every position's logits
LAST_POSITION = np.array(1, np.int64)  # logits_to_keep: the last position's, all decoding needs


class GraphRunError(RuntimeError):
    """The graph failed on its inputs (a shape or value it cannot take). ONNX Runtime raises its
    typed errors (Fail, InvalidArgument) from ``run`` but a bare RuntimeError from
    ``run_with_iobinding``; this names the case so callers can tell it from other failures."""


class DecoderModel:
    """One decoder session and its KV-cache layout."""

    def __init__(self, session: Any, kv_cache: dict[str, Any], prompt_session: Any = None
                 ) -> None:
        self.session = session
        # prompt steps run here when given: the same graph and cache, other kernels
        # (an int4 package's 4-bit MatMuls in float32 on CPU: llmopt.runtime.prompt_graph)
        self.prompt_session = prompt_session
        self.num_layers = int(kv_cache["num_layers"])
        self.num_kv_heads = int(kv_cache["num_kv_heads"])
        self.head_dim = int(kv_cache["head_dim"])
        self.max_positions = int(kv_cache.get("max_positions") or 0)
        self.kv_dtype = np.dtype(kv_cache.get("dtype", "float32"))
        self.rope_long_after = kv_cache.get("rope_long_after")  # LongRoPE's switch point
        # GroupQueryAttention updates one buffer bound as both past and present
        self.shared_buffer = bool(kv_cache.get("shared_buffer"))
        # rows of different lengths share a step unpadded: right-aligned masks, own seqlens_k
        metadata = session.get_modelmeta().custom_metadata_map
        self.ragged = (self.shared_buffer and metadata.get(ROW_LENGTHS) == "1"
                       and not kv_cache.get("sliding_window"))
        self.past_names = [
            name
            for i in range(self.num_layers)
            for name in (kv_cache["past_key"].format(i=i), kv_cache["past_value"].format(i=i))
        ]
        self.present_names = [
            name
            for i in range(self.num_layers)
            for name in (kv_cache["present_key"].format(i=i),
                         kv_cache["present_value"].format(i=i))
        ]
        self.layout = KVLayout(tuple(self.past_names), tuple(self.present_names),
                               self.num_kv_heads, self.head_dim, self.kv_dtype)
        # packages exported before logits_to_keep existed compute every position's logits
        self.keeps_logits = "logits_to_keep" in {i.name for i in session.get_inputs()}
        # logits written straight into an array of ours, where the graph says their type and
        # vocabulary: a step on an in-place cache then reads no output back from the binding
        logits = next((o for o in session.get_outputs() if o.name == "logits"), None)
        vocab = logits.shape[-1] if logits is not None and logits.shape else None
        self._logits_type = _NUMPY_TYPES.get(logits.type) if logits is not None else None
        self._vocab = vocab if isinstance(vocab, int) else None

    # -- caches ----------------------------------------------------------------------------------

    def copying_cache(self, batch: int, placement: KVPlacement = HOST,
                      past: list[Any] | None = None) -> CopyingCache:
        """A cache whose presents become the next step's past (``past``: its start, else
        empty)."""
        return CopyingCache(self.session, self.layout, batch, placement, past)

    def cache(self, batch: int, capacity: int, placement: KVPlacement = HOST
              ) -> KVCache:
        """The cache a generation of ``batch`` rows and at most ``capacity`` positions runs on:
        in place where the graph shares its buffer, else copying."""
        if self.shared_buffer:
            return InPlaceCache(self.session, self.layout, batch, capacity, placement)
        return self.copying_cache(batch, placement)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in self.past_names]

    def reprefills(self, total: int) -> bool:
        """Whether a decode step that grows the sequence to ``total`` tokens must run the whole
        sequence again on an empty cache: LongRoPE's first step past its switch point, where the
        cached keys were rotated with the short factors. transformers' generate drops its cache
        on exactly that step (``Phi3ForCausalLM.prepare_inputs_for_generation``); later steps
        reuse the long-factor cache."""
        after = self.rope_long_after
        return after is not None and total - 1 == int(after)

    # -- the step --------------------------------------------------------------------------------

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray, cache: KVCache, all_logits: bool = False,
             prompt: bool | None = None) -> np.ndarray:
        """Run ``input_ids`` (prefill, a prefill chunk or one decode token per row) on top of
        ``cache``, which then holds ``attention_mask.shape[1]`` positions. Returns the last
        position's logits ([B, 1, vocab]), or every position's with ``all_logits`` (packages
        exported without ``logits_to_keep`` always return every position's); on an in-place
        cache they are the binding's own array, which the cache's next step of that shape
        writes over (copy what must outlive it). A step whose ``input_ids`` are the whole
        sequence starts the cache afresh.

        ``prompt``: the step runs prompt tokens, so it goes to :attr:`prompt_session` where
        there is one (default: when it runs the whole sequence or more than one token per
        row). Callers that prefill in chunks say so, so a one-token chunk runs where the rest
        of its prompt ran."""
        restart = input_ids.shape[1] == attention_mask.shape[1]
        if prompt is None:
            prompt = restart or input_ids.shape[1] > 1
        session = self.prompt_session if prompt and self.prompt_session is not None \
            else self.session
        binding = cache.binding(restart, session)
        inputs = _inputs(binding, cache.placement.on_host)
        inputs.feed(binding, "input_ids", input_ids)
        inputs.feed(binding, "position_ids", position_ids)
        # a view of the caller's (a growing mask's prefix is one): bound as it is, uncopied
        binding.bind_cpu_input("attention_mask",
                               np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self.keeps_logits:
            inputs.keep(binding, all_logits)
        logits = inputs.logits(binding, self._logits_shape(input_ids.shape, all_logits),
                               self._logits_type) if cache.in_place else None
        if logits is None:
            binding.bind_output("logits", "cpu")  # a new shape each step: unallocated again
        try:
            session.run_with_iobinding(binding)
        except RuntimeError as exc:  # ONNX Runtime's own error types do not survive IOBinding
            raise GraphRunError(str(exc)) from exc
        if logits is not None:  # the presents are the cache's own buffers
            return logits
        outputs = binding.get_outputs()
        cache.advance(list(outputs[1:]))
        return np.asarray(outputs[0].numpy())

    def _logits_shape(self, input_shape: tuple[int, ...], all_logits: bool
                      ) -> tuple[int, ...] | None:
        """This step's logits shape ([B, positions, vocab]), or None where the graph does not
        say their vocabulary or type. Written into an array of ours, bound as the output, a
        step reads no output back from the binding (``get_outputs`` wraps each of the 2 x
        layers presents)."""
        if self._vocab is None or self._logits_type is None:
            return None
        positions = 1 if self.keeps_logits and not all_logits else input_shape[1]
        return (input_shape[0], positions, self._vocab)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, past: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """:meth:`step` on a copying cache that starts at ``past``: every position's logits and
        the presents as host arrays (scoring, calibration, comparisons). It runs on the decode
        session, never the prompt session: a scored position gets the logits a generated token
        would (perplexity measures what decoding computes)."""
        cache = self.copying_cache(input_ids.shape[0], past=past)
        logits = self.step(input_ids, attention_mask, position_ids, cache, all_logits=True,
                           prompt=False)
        return logits, cache.arrays()


class StepInputs:
    """What a step binds besides the cache, held with the IO binding it is bound on, so a
    cache that keeps its binding across steps (in place) rebinds only what changed: token ids
    and positions are written into the arrays already bound while their shape stays,
    ``logits_to_keep`` is bound when it changes, and the logits go to one array per shape.

    Each decode step streams the weights (100+ MB for SmolLM2 int4) through the CPU's caches,
    so the few microseconds of Python and ONNX Runtime between two steps run on cold memory:
    binding an input then costs 43-90 us instead of 1-3, and allocating a logits array and
    binding it as the output 136 (``bench/results/step_overhead.md``)."""

    def __init__(self, writes_reach_the_run: bool = True) -> None:
        # on a CPU session a bound host array is read where it is at each run; ONNX Runtime
        # copies one bound for a GPU's nodes at binding time, so there every step rebinds
        self.writes_reach_the_run = writes_reach_the_run
        self.arrays: dict[str, np.ndarray] = {}
        self.kept: bool | None = None  # logits_to_keep as bound: all positions or the last
        self.outputs: dict[tuple[int, ...], np.ndarray] = {}  # the last few shapes' logits
        self.bound: np.ndarray | None = None  # the one bound now

    def feed(self, binding: Any, name: str, value: np.ndarray) -> None:
        """Bind ``value`` (int64) as ``name``: into the bound array where the shape matches."""
        bound = self.arrays.get(name)
        if bound is not None and bound.shape == value.shape and self.writes_reach_the_run:
            np.copyto(bound, value)
            return
        bound = self.arrays[name] = np.array(value, dtype=np.int64)  # ours, C-contiguous
        binding.bind_cpu_input(name, bound)  # bound by reference: later writes count

    def keep(self, binding: Any, all_logits: bool) -> None:
        if self.kept is not all_logits:
            binding.bind_cpu_input("logits_to_keep",
                                   ALL_POSITIONS if all_logits else LAST_POSITION)
            self.kept = all_logits

    def logits(self, binding: Any, shape: tuple[int, ...] | None, dtype: Any
               ) -> np.ndarray | None:
        """The array the step's logits are written into (bound as the output), or None for
        ``shape`` None."""
        if shape is None:
            return None
        logits = self.outputs.get(shape)
        if logits is None:  # the binding's own: a run on it never writes to freed memory
            if len(self.outputs) >= 4:  # prompts or drafts of many lengths: keep the bound one
                self.outputs = {} if self.bound is None else {self.bound.shape: self.bound}
            logits = self.outputs[shape] = np.empty(shape, dtype)
        if self.bound is not logits:
            binding.bind_output("logits", "cpu", 0, logits.dtype, list(shape),
                                logits.ctypes.data)
            self.bound = logits
        return logits


def _inputs(binding: Any, on_host: bool) -> StepInputs:
    """The :class:`StepInputs` of ``binding`` (a session on the host when ``on_host``), kept on
    it: it lives as long as the binding, and holds no reference back (a copying cache's
    binding, and the presents it holds, go with the step)."""
    inputs = getattr(binding, "_llmopt_inputs", None)
    if inputs is None:
        inputs = binding._llmopt_inputs = StepInputs(on_host)
    return inputs


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask`` (int64)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
    return ids, mask


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding, as transformers computes them (pads get 1)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


def greedy(model: DecoderModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           eos_ids: Sequence[int] = (), pad_id: int = 0,
           placement: KVPlacement = HOST) -> list[list[int]]:
    """Greedy decoding through :meth:`DecoderModel.step` on the cache the Generator picks
    (:meth:`DecoderModel.cache`); each row stops after its first EOS token. Export validation
    decodes with it, so what it checks is the step production runs."""
    ids, mask = left_pad(prompts, pad_id)
    history = ids
    positions = position_ids(mask)
    cache = model.cache(len(prompts), ids.shape[1] + max_new_tokens, placement)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    eos = set(eos_ids)
    for _ in range(max_new_tokens):
        logits = model.step(ids, mask, positions, cache)
        next_ids = logits[:, -1, :].argmax(axis=-1)
        for row, token in enumerate(next_ids):
            if not done[row]:
                outputs[row].append(int(token))
                done[row] = int(token) in eos
        if done.all():
            break
        ids = next_ids[:, None].astype(np.int64)
        history = np.concatenate([history, ids], axis=1)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        if model.reprefills(mask.shape[1]):
            ids, positions = history, position_ids(mask)
    return outputs
