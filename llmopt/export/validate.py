"""Validation: does the exported graph compute what the PyTorch model computes?

Decoders are checked on several shapes (batch 1 and 2, one-token and longer prompts, past
length 0 and > 0, left padding) by comparing ONNX logits and presents with a PyTorch forward
pass over the same tokens, then by greedy generation through the graph's own KV cache against
``model.generate``. Differences are reported relative to the reference's scale:
``max|onnx - torch| <= tolerance * max(1, max|torch|)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llmopt.runtime.kv import DecoderModel, greedy, left_pad, position_ids

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
)


class Report:
    """Collects cases and their per-output differences."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.cases: list[dict[str, Any]] = []

    def compare(self, case: str, outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        diffs: dict[str, float] = {}
        passed = True
        for name, (got, want) in outputs.items():
            diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
            scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
            diffs[name] = diff
            passed = passed and bool(np.isfinite(diff)) and diff <= self.tolerance * scale
        self.cases.append({"case": case, "max_abs_diff": diffs, "passed": passed})

    def result(self, generation: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        gen_ok = all(g["match"] for g in generation or [])
        return {
            "passed": all(c["passed"] for c in self.cases) and gen_ok,
            "tolerance": self.tolerance,
            "rule": "max|onnx - torch| <= tolerance * max(1, max|torch|)",
            "cases": self.cases,
            "generation": generation or [],
        }


def prompt_tokens(tokenizer: Any, vocab: int, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of the prompts, or seeded random ids where there is no tokenizer."""
    if tokenizer is not None:
        tokens = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        if all(tokens) and max(max(t) for t in tokens) < vocab:
            return tokens
    rng = np.random.default_rng(0)
    return [list(rng.integers(3, vocab, size=5 + 3 * i)) for i in range(len(prompts))]


def validate_decoder(model: Any, session: Any, kv_cache: dict[str, Any], tokenizer: Any,
                     tolerance: float, generation_tokens: int,
                     prompts: Sequence[str] = DEFAULT_PROMPTS) -> dict[str, Any]:
    import torch

    onnx_model = DecoderModel(session, kv_cache)
    report = Report(tolerance)
    tokens = prompt_tokens(tokenizer, int(model.config.vocab_size), prompts)
    long, short = tokens[0], tokens[1]

    def torch_forward(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(position_ids(mask)), use_cache=True)
        cache = out.get("cache")  # transformers >= 5.2 name; older ones use past_key_values
        if cache is None:
            cache = out.get("past_key_values")
        return out.logits.float().numpy(), _cache_arrays(cache)

    def check(case: str, prompts_: list[list[int]], split: int) -> None:
        """Prefill the first ``split`` columns, then run the rest with the cache."""
        ids, mask = left_pad(prompts_)
        want_logits, want_cache = torch_forward(ids, mask)
        valid = mask.astype(bool)
        past = onnx_model.empty_past(len(prompts_))
        got_parts = []
        for start, stop in ((0, split), (split, ids.shape[1])):
            if stop <= start:
                continue
            logits, past = onnx_model.forward(ids[:, start:stop], mask[:, :stop],
                                              position_ids(mask)[:, start:stop], past)
            got_parts.append(logits)
        got_logits = np.concatenate(got_parts, axis=1)
        outputs = {"logits": (got_logits[valid], want_logits[valid])}
        if want_cache:
            keep = valid[:, None, :, None]
            for name, got, want in zip(onnx_model.present_names, past, want_cache, strict=False):
                shape = np.broadcast_shapes(keep.shape, got.shape)
                sel = np.broadcast_to(keep, shape)
                outputs[name] = (got[sel], want[sel])
        report.compare(case, outputs)

    check("batch 1, prompt, past 0", [long], len(long))
    check("batch 1, one-token prompt, past 0", [long[:1]], 1)
    check("batch 1, one token, past > 0", [long], len(long) - 1)
    check("batch 1, three tokens, past > 0", [long], max(1, len(long) - 3))
    check("batch 2, left padding, past 0", [long, short], max(len(long), len(short)))
    check("batch 2, left padding, past > 0", [long, short], max(len(long), len(short)) - 2)

    generation = []
    eos = _eos_ids(model)
    for text, prompt in zip(prompts, tokens, strict=True):
        want = _torch_greedy(model, prompt, generation_tokens, eos)
        got = greedy(onnx_model, [prompt], generation_tokens, eos)[0]
        mismatch = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                        None if len(got) == len(want) else min(len(got), len(want)))
        generation.append({"prompt": text, "tokens": len(want), "match": mismatch is None,
                           "first_mismatch": mismatch})
    return report.result(generation)


def _torch_greedy(model: Any, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                             pad_token_id=eos[0] if eos else 0)
    tokens = [int(t) for t in out[0, len(prompt):]]
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def _eos_ids(model: Any) -> list[int]:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


def _cache_arrays(cache: Any) -> list[np.ndarray]:
    """Keys and values of a transformers cache, in layer order, across cache API versions."""
    if cache is None:
        return []
    pairs: list[tuple[Any, Any]] = []
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    elif isinstance(cache, list | tuple):
        pairs = [(k, v) for k, v in cache]
    return [t.float().numpy() for pair in pairs for t in pair]
