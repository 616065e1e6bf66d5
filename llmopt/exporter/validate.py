"""Validation: does the exported graph compute what the PyTorch model computes?

Decoders are checked on several shapes (batch 1 and 2, one-token and longer prompts, past
length 0 and > 0, left padding) by comparing ONNX logits and presents with a PyTorch forward
pass over the same tokens, then by greedy generation through the graph's own KV cache against
``model.generate``. The graph runs through :meth:`llmopt.runtime.kv.DecoderModel.step`, the
step the Generator and the serving engine run, greedy decoding on the cache the Generator uses.
Differences are reported relative to the reference's scale:
``max|onnx - torch| <= tolerance * max(1, max|torch|)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    def failed_to_run(self, case: str, error: BaseException) -> None:
        """The graph raised on this case's shapes (a trace that fixed a shape the example had):
        a failed case, not a crash of the validation."""
        self.cases.append({"case": case, "max_abs_diff": {}, "passed": False,
                           "error": _first_line(error)})

    def result(self, generation: list[dict[str, Any]] | None = None,
               generation_required: bool = True) -> dict[str, Any]:
        gen_ok = all(g["match"] for g in generation or []) or not generation_required
        return {
            "passed": all(c["passed"] for c in self.cases) and gen_ok,
            "generation_required": generation_required,
            "tolerance": self.tolerance,
            "rule": "max|onnx - torch| <= tolerance * max(1, max|torch|)",
            "cases": self.cases,
            "generation": generation or [],
        }


def graph_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ONNX Runtime raises when a graph fails on its inputs."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    from llmopt.runtime.kv import GraphRunError

    names = ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "InvalidGraph")
    return (GraphRunError, *(getattr(state, name) for name in names if hasattr(state, name)))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def prompt_tokens(tokenizer: Any, vocab: int, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of the prompts (as chat turns where the tokenizer has a chat template), or
    seeded random ids where there is no tokenizer."""
    if tokenizer is not None:
        tokens = [_encode(tokenizer, p) for p in prompts]
        if all(tokens) and max(max(t) for t in tokens) < vocab:
            return tokens
    rng = np.random.default_rng(0)
    lengths = (12, 7, 9, 16)
    return [list(rng.integers(3, vocab, size=lengths[i % 4])) for i in range(len(prompts))]


def _encode(tokenizer: Any, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TorchReference:
    """The PyTorch model as the reference a decoder graph is checked against."""

    name = "torch"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab = int(model.config.vocab_size)
        self.eos = _eos_ids(model)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(ids),
                             attention_mask=torch.from_numpy(mask),
                             position_ids=torch.from_numpy(position_ids(mask)), use_cache=True)
        cache = out.get("cache")  # transformers >= 5.2 name; older ones use past_key_values
        if cache is None:
            cache = out.get("past_key_values")
        return out.logits.float().numpy(), _cache_arrays(cache)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        return _torch_greedy(self.model, prompt, max_new_tokens, self.eos)


class OnnxReference:
    """Another package's decoder graph as the reference (for optimize and quantize)."""

    name = "onnx"

    def __init__(self, session: Any, kv_cache: dict[str, Any], eos: Sequence[int],
                 vocab: int) -> None:
        self.model = DecoderModel(session, kv_cache)
        self.eos = list(eos)
        self.vocab = vocab

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, present = self.model.forward(ids, mask, position_ids(mask),
                                             self.model.empty_past(ids.shape[0]))
        return logits, [np.asarray(p, dtype=np.float32) for p in present]

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        return greedy(self.model, [prompt], max_new_tokens, self.eos)[0]


def validate_decoder(reference: Any, session: Any, kv_cache: dict[str, Any], tokenizer: Any,
                     tolerance: float, generation_tokens: int,
                     prompts: Sequence[str] = DEFAULT_PROMPTS,
                     require_generation: bool | None = None) -> dict[str, Any]:
    """Compare logits and presents on six shapes, then greedy generation, with ``reference``
    (a :class:`TorchReference` or :class:`OnnxReference`).

    Greedy tokens must match exactly for float32 graphs; for float16 ones a near-tie can flip a
    token, so their agreement is recorded but not required (``require_generation`` overrides).
    """
    onnx_model = DecoderModel(session, kv_cache)
    report = Report(tolerance)
    tokens = prompt_tokens(tokenizer, reference.vocab, prompts)
    long, short = tokens[0], tokens[1]

    def check(case: str, prompts_: list[list[int]], split: int) -> None:
        """Prefill the first ``split`` columns, then run the rest with the cache."""
        ids, mask = left_pad(prompts_)
        want_logits, want_cache = reference.forward(ids, mask)
        valid = mask.astype(bool)
        cache = onnx_model.copying_cache(len(prompts_))
        got_parts = []
        for start, stop in ((0, split), (split, ids.shape[1])):
            if stop <= start:
                continue
            try:
                logits = onnx_model.step(ids[:, start:stop], mask[:, :stop],
                                         position_ids(mask)[:, start:stop], cache,
                                         all_logits=True)
            except graph_errors() as exc:
                report.failed_to_run(case, exc)
                return
            got_parts.append(logits)
        got_logits = np.concatenate(got_parts, axis=1)
        past = cache.arrays()
        outputs = {"logits": (got_logits[valid], want_logits[valid])}
        if want_cache:
            keep = valid[:, None, :, None]
            for name, got, want in zip(onnx_model.present_names, past, want_cache, strict=False):
                # a sliding-window cache in transformers keeps only the newest positions
                kept = want.shape[2]
                tail, keep_tail = got[:, :, -kept:], keep[:, :, -kept:]
                sel = np.broadcast_to(keep_tail, np.broadcast_shapes(keep_tail.shape, tail.shape))
                outputs[name] = (tail[sel], want[sel])
        report.compare(case, outputs)

    check("batch 1, prompt, past 0", [long], len(long))
    check("batch 1, one-token prompt, past 0", [long[:1]], 1)
    check("batch 1, one token, past > 0", [long], len(long) - 1)
    check("batch 1, three tokens, past > 0", [long], max(1, len(long) - 3))
    check("batch 2, left padding, past 0", [long, short], max(len(long), len(short)))
    if kv_cache.get("shared_buffer"):
        # GroupQueryAttention takes several new tokens on top of a cache for batch 1 only
        check("batch 2, left padding, one token, past > 0", [long, short],
              max(len(long), len(short)) - 1)
    else:
        check("batch 2, left padding, past > 0", [long, short], max(len(long), len(short)) - 2)

    generation = []
    for text, prompt in zip(prompts, tokens, strict=True):
        want = reference.greedy(prompt, generation_tokens)
        error = None
        try:
            got = greedy(onnx_model, [prompt], generation_tokens, reference.eos)[0]
        except graph_errors() as exc:
            got, error = [], _first_line(exc)
        mismatch = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                        None if len(got) == len(want) else min(len(got), len(want)))
        generation.append({"prompt": text, "tokens": len(want), "match": mismatch is None,
                           "first_mismatch": mismatch, **({"error": error} if error else {})})
    required = onnx_model.kv_dtype == np.float32 if require_generation is None \
        else require_generation
    result = report.result(generation, generation_required=required)
    result["reference"] = reference.name
    return result


def _torch_greedy(model: Any, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        if _longrope(model.config):
            tokens = _uncached_greedy(model, prompt, max_new_tokens)
        else:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                                 pad_token_id=eos[0] if eos else 0)
            tokens = [int(t) for t in out[0, len(prompt):]]
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def _longrope(config: Any) -> bool:
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    return isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("longrope", "su")


def _uncached_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from whole-sequence forwards, no cache. LongRoPE's reference: its cache
    made with the short factors is dropped on the first step past the switch point, which
    equals this; transformers 5's generate() gives these tokens, 4.57's does not (it re-runs
    that step with the one-token cache_position, so its earlier rows attend ahead)."""
    import torch

    sequence, tokens = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([sequence]), use_cache=False).logits
        tokens.append(int(logits[0, -1].argmax()))
        sequence.append(tokens[-1])
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


ENCODER_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Hello world!",
    "Write a haiku about the sea, 1 2 3.",
)


def validate_encoder(model: Any, session: Any, layout: dict[str, Any], tokenizer: Any,
                     tolerance: float, generation_tokens: int,
                     texts: Sequence[str] = ENCODER_TEXTS) -> dict[str, Any]:
    """Compare an encoder graph with PyTorch on batch 1, a right-padded batch with a one-token
    row, a one-token sequence and, where the graph takes token types, sentence pairs.

    ``last_hidden_state`` is compared at real (non-pad) positions only; ``logits`` for every
    row. Encoders do not generate, so ``generation`` stays empty (``generation_tokens`` is
    accepted for the architecture protocol).
    """
    import torch

    del generation_tokens

    def reference(output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = model(**{name: torch.from_numpy(a) for name, a in feeds.items()})
        want = out.logits if output == "logits" else out.last_hidden_state
        return want.float().numpy()

    return _encoder_cases(session, reference, layout=layout, tokenizer=tokenizer,
                          vocab=int(model.config.vocab_size), tolerance=tolerance, texts=texts)


def validate_encoder_against(parent: Any, result: Any, tokenizer: Any, tolerance: float,
                             texts: Sequence[str] = ENCODER_TEXTS) -> dict[str, Any]:
    """Compare ``result``'s encoder graph with its ``parent`` package's (both on ONNX Runtime's
    CPU provider) on the cases of :func:`validate_encoder`, for optimize and quantize."""
    from transformers import AutoConfig

    from llmopt.runtime.session import cpu_session

    want = cpu_session(parent.model_path)

    def reference(output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(want.run([output], feeds)[0], dtype=np.float32)

    vocab = int(AutoConfig.from_pretrained(str(parent.path)).vocab_size)
    report = _encoder_cases(cpu_session(result.model_path), reference,
                            layout=parent.manifest.encoder or {}, tokenizer=tokenizer,
                            vocab=vocab, tolerance=tolerance, texts=texts)
    report["rule"] = "max|result - parent| <= tolerance * max(1, max|parent|)"
    report["reference"] = "onnx"
    return report


def _encoder_cases(session: Any, reference: Callable[[str, dict[str, np.ndarray]], np.ndarray],
                   *, layout: dict[str, Any], tokenizer: Any, vocab: int, tolerance: float,
                   texts: Sequence[str]) -> dict[str, Any]:
    """Run the encoder validation cases on ``session`` and compare with ``reference``."""
    report = Report(tolerance)
    feeds_wanted = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name
    pad = int(layout.get("pad_token_id") or 0)
    singles = _encoder_tokens(tokenizer, vocab, pad, [(t, None) for t in texts])
    pairs = _encoder_tokens(tokenizer, vocab, pad, [(texts[0], texts[1]), (texts[2], texts[3])])

    def check(case: str, sequences: list[tuple[list[int], list[int]]]) -> None:
        ids, mask, types = _right_pad(sequences, pad)
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {name: arrays[name] for name in feeds_wanted}
        got = session.run([output], feeds)[0]
        want = reference(output, feeds)
        if output == "logits":
            report.compare(case, {output: (got, want)})
        else:
            valid = mask.astype(bool)
            report.compare(case, {output: (got[valid], want[valid])})

    first_ids, first_types = singles[0]
    check("batch 1", [singles[0]])
    check("batch 1, one token", [(first_ids[:1], first_types[:1])])
    check(f"batch {len(singles) + 1}, right padding, one-token row",
          [*singles, (first_ids[:1], first_types[:1])])
    if "token_type_ids" in feeds_wanted:
        check("batch 2, sentence pairs, right padding", pairs)
    return report.result([])


def _encoder_tokens(tokenizer: Any, vocab: int, pad: int,
                    texts: Sequence[tuple[str, str | None]]) -> list[tuple[list[int], list[int]]]:
    """(ids, token types) of each text or pair with the tokenizer's special tokens, or seeded
    random non-pad ids (types 0, then 1 for a pair's second half) without a tokenizer."""
    if tokenizer is not None:
        out = []
        for text, pair in texts:
            enc = tokenizer(text, pair) if pair is not None else tokenizer(text)
            ids = [int(t) for t in enc["input_ids"]]
            types = [int(t) for t in enc.get("token_type_ids") or [0] * len(ids)]
            out.append((ids, types))
        if all(ids and max(ids) < vocab for ids, _ in out):
            return out
    rng = np.random.default_rng(0)
    out = []
    for i, (_, pair) in enumerate(texts):
        ids = [int(t) for t in rng.integers(0, vocab - 1, size=6 + 3 * i)]
        ids = [t + 1 if t >= pad else t for t in ids]  # never the pad id
        half = len(ids) // 2 if pair is not None else len(ids)
        out.append((ids, [0] * half + [1] * (len(ids) - half)))
    return out


def _right_pad(sequences: list[tuple[list[int], list[int]]],
               pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask and token_type_ids [B,S], padded on the right."""
    length = max(len(ids) for ids, _ in sequences)
    ids = np.full((len(sequences), length), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, (tokens, token_types) in enumerate(sequences):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        types[row, : len(tokens)] = token_types
    return ids, mask, types
