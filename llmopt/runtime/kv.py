"""The decoder graph's calling convention: inputs, KV cache, padding and positions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ALL_POSITIONS = np.array(0, np.int64)  # logits_to_keep: every position's logits


class DecoderModel:
    """One decoder session and its KV-cache layout: ``forward`` runs prefill or decode and
    returns every position's logits."""

    def __init__(self, session: Any, kv_cache: dict[str, Any]) -> None:
        self.session = session
        self.num_layers = int(kv_cache["num_layers"])
        self.num_kv_heads = int(kv_cache["num_kv_heads"])
        self.head_dim = int(kv_cache["head_dim"])
        self.max_positions = int(kv_cache.get("max_positions") or 0)
        self.kv_dtype = np.dtype(kv_cache.get("dtype", "float32"))
        self.rope_long_after = kv_cache.get("rope_long_after")  # LongRoPE's switch point
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
        self.output_names = ["logits", *self.present_names]
        # packages exported before logits_to_keep existed compute every position's logits
        self.keeps_logits = "logits_to_keep" in {i.name for i in session.get_inputs()}

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

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, past: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": position_ids}
        if self.keeps_logits:
            feed["logits_to_keep"] = ALL_POSITIONS
        feed.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present


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
           eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Greedy decoding with the KV cache; each row stops after its first EOS token."""
    ids, mask = left_pad(prompts, pad_id)
    history = ids
    positions = position_ids(mask)
    past = model.empty_past(len(prompts))
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    eos = set(eos_ids)
    for _ in range(max_new_tokens):
        logits, past = model.forward(ids, mask, positions, past)
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
            ids, positions, past = history, position_ids(mask), model.empty_past(len(prompts))
    return outputs
