"""Fidelity measurements: what optimizing or quantizing a package cost in accuracy.

Decoders: perplexity on a fixed evaluation text (shipped with llmopt), top-1 agreement of
next-token predictions with a reference package over that text, and greedy agreement over 64
generated tokens on several prompts. Encoders: cosine similarity of pooled embeddings with a
reference package on varied sentences. ``llmopt eval PKG [--against PKG]`` runs the same code.
"""

from __future__ import annotations

import math
import os
from importlib import resources
from typing import Any

import numpy as np

from llmopt.package import Package

EVAL_PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "What are three tips for learning a new language?",
    "Describe the water cycle in simple terms.",
)
EVAL_SENTENCES = (
    "A man is eating food.", "A man is riding a horse.", "The new movie is awesome.",
    "The cat sits outside.", "Quantum computers use qubits instead of bits.",
    "Paris is the capital of France.", "I love pizza with extra cheese!",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "東京は日本の首都です。",
    "Stock prices fell sharply on Monday 📉", "How do I reset my password?",
    "The mitochondria is the powerhouse of the cell.", "Please send the report by 5 pm.",
    "She sells sea shells by the sea shore.", "It rained all day, so we stayed in.",
    "Neural networks learn representations from data.", "¿Dónde está la biblioteca?",
    "The invoice total is $1,234.56 including tax.", "Open the pod bay doors, HAL.",
    "A short one.",
)


def eval_text() -> str:
    return resources.files("llmopt.data").joinpath("eval.txt").read_text(encoding="utf-8")


def evaluate(package: str | os.PathLike[str] | Package,
             against: str | os.PathLike[str] | Package | None = None, *,
             max_length: int = 512, greedy_tokens: int = 64) -> dict[str, Any]:
    """Measure ``package`` (and its agreement with ``against``, if given) on CPU."""
    import llmopt
    from llmopt.errors import InvalidInputError

    if greedy_tokens < 0 or max_length < 2:
        raise InvalidInputError(
            f"greedy_tokens must be >= 0 and max_length >= 2, not {greedy_tokens} and "
            f"{max_length}", fix="pass greedy_tokens=0 to skip the greedy answers")
    pkg = package if isinstance(package, Package) else Package.open(package)
    ref = None if against is None else against if isinstance(against, Package) \
        else Package.open(against)
    runner = llmopt.load(pkg, ["cpu"])
    ref_runner = None if ref is None else llmopt.load(ref, ["cpu"])
    result: dict[str, Any] = {"package": str(pkg.path), "size_bytes": pkg.size_bytes()}
    if ref is not None:
        result["against"] = str(ref.path)
        result["against_size_bytes"] = ref.size_bytes()
    if pkg.is_decoder:
        result.update(_decoder_metrics(runner, ref_runner, max_length, greedy_tokens))
    else:
        result.update(_encoder_metrics(runner, ref_runner))
    return result


def _window_logits(model: Any, tokens: list[int], max_length: int) -> list[np.ndarray]:
    from llmopt.runtime.kv import position_ids

    out = []
    for start in range(0, len(tokens) - 1, max_length):
        window = np.array([tokens[start:start + max_length]], dtype=np.int64)
        if window.shape[1] < 2:
            break
        mask = np.ones_like(window)
        logits, _ = model.forward(window, mask, position_ids(mask), model.empty_past(1))
        out.append(logits[0].astype(np.float64))
    return out


def _scores(model: Any, tokens: list[int], max_length: int
            ) -> tuple[float, int, list[np.ndarray]]:
    """Negative log-likelihood of ``tokens`` in windows of ``max_length``, the scored token
    count and each window's next-token predictions."""
    nll, count = 0.0, 0
    predictions = []
    for i, logits in enumerate(_window_logits(model, tokens, max_length)):
        targets = np.array(tokens[i * max_length + 1: i * max_length + logits.shape[0] + 1])
        scores = logits[: len(targets)]
        logz = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
        nll += float((logz - scores[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        predictions.append(logits.argmax(-1))
    return nll, count, predictions


def perplexity(model: Any, tokenizer: Any, max_length: int = 512) -> dict[str, Any]:
    """Perplexity of any decoder with llmopt's ``forward(ids, mask, positions, past)`` and
    ``empty_past(batch)`` (a package's model, or an adapter over another runtime's graph) on
    the evaluation text, tokenized by ``tokenizer``: the number ``evaluate`` reports."""
    tokens = list(tokenizer(eval_text())["input_ids"])
    nll, count, _ = _scores(model, tokens, max_length)
    return {"perplexity": math.exp(nll / count), "eval_tokens": count}


# A reference package's measurements, kept while its model file is unchanged: quantizing one
# fused package several ways (as the tests and the benchmarks do) measures it once.
_REFERENCE_CACHE: dict[tuple[str, int, int, int, int], dict[str, Any]] = {}


def _measure(runner: Any, max_length: int, greedy_tokens: int, cache: bool) -> dict[str, Any]:
    """Perplexity, next-token predictions over the evaluation text and greedy answers."""
    model_file = runner.package.model_path
    stat = model_file.stat()
    key = (str(model_file.resolve()), stat.st_mtime_ns, stat.st_size, max_length, greedy_tokens)
    if cache and key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    tokens = list(runner.tokenizer(eval_text())["input_ids"])
    nll, count, predictions = _scores(runner.model, tokens, max_length)
    answers = []
    if greedy_tokens:
        kwargs = {"chat": bool(getattr(runner.tokenizer, "chat_template", None)),
                  "max_new_tokens": greedy_tokens, "ignore_eos": True}
        answers = [runner.generate(prompt, **kwargs).token_ids for prompt in EVAL_PROMPTS]
    result = {"perplexity": math.exp(nll / count), "eval_tokens": count,
              "predictions": predictions, "answers": answers}
    if cache:
        _REFERENCE_CACHE[key] = result
    return result


def _decoder_metrics(runner: Any, ref: Any, max_length: int, greedy_tokens: int
                     ) -> dict[str, Any]:
    got = _measure(runner, max_length, greedy_tokens if ref is not None else 0, cache=False)
    metrics: dict[str, Any] = {"perplexity": got["perplexity"], "eval_tokens": got["eval_tokens"]}
    if ref is None:
        return metrics
    want = _measure(ref, max_length, greedy_tokens, cache=True)
    agree = sum(int((a == b).sum()) for a, b in
                zip(got["predictions"], want["predictions"], strict=True))
    positions = sum(len(a) for a in got["predictions"])
    prefixes = [next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
                     min(len(mine), len(theirs)))
                for mine, theirs in zip(got["answers"], want["answers"], strict=True)]
    metrics.update({
        "reference_perplexity": want["perplexity"],
        "perplexity_delta_pct": 100.0 * (got["perplexity"] / want["perplexity"] - 1),
        "top1_agreement": agree / positions,
    })
    if greedy_tokens:  # 0: no greedy answers compared
        metrics["greedy_agreement"] = {
            "tokens": greedy_tokens,
            "identical_prefix": prefixes,
            "mean_fraction": float(np.mean(prefixes)) / greedy_tokens,
            "prompts_identical": sum(p == greedy_tokens for p in prefixes),
            "prompts": len(prefixes),
        }
    return metrics


def _encoder_metrics(runner: Any, ref: Any) -> dict[str, Any]:
    if ref is None or runner.output != "last_hidden_state":
        return {}
    got = runner.embed(list(EVAL_SENTENCES), normalize=True)
    want = ref.embed(list(EVAL_SENTENCES), normalize=True)
    cosine = np.sum(got * want, axis=1)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "sentences": len(EVAL_SENTENCES)}


def format_fidelity(result: dict[str, Any]) -> list[str]:
    lines = [f"package      {result['package']}  ({result['size_bytes'] / 1e6:.1f} MB)"]
    if "against" in result:
        lines.append(f"against      {result['against']}  "
                     f"({result['against_size_bytes'] / 1e6:.1f} MB)")
    if "perplexity" in result:
        ppl = f"perplexity   {result['perplexity']:.3f} on {result['eval_tokens']} tokens"
        if "reference_perplexity" in result:
            ppl += (f" (reference {result['reference_perplexity']:.3f}, "
                    f"{result['perplexity_delta_pct']:+.2f}%)")
        lines.append(ppl)
    if "top1_agreement" in result:
        g = result["greedy_agreement"]
        lines.append(f"top-1        {100 * result['top1_agreement']:.2f}% of next-token "
                     "predictions agree")
        lines.append(f"greedy       {g['prompts_identical']}/{g['prompts']} prompts identical "
                     f"over {g['tokens']} tokens; identical prefixes {g['identical_prefix']}")
    if "cosine_mean" in result:
        lines.append(f"cosine       mean {result['cosine_mean']:.6f}, min "
                     f"{result['cosine_min']:.6f} over {result['sentences']} sentences")
    return lines
