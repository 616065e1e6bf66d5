"""The added latency per token of constrained (JSON schema) decoding vs free decoding.

    python bench/structured.py --package PKG [--repeats 5] [--out bench/results/structured.md]

Batch 1, greedy, chat prompts asking for a JSON record. Per prompt and repetition, interleaved:
the constrained run writes N tokens (until the schema completes); the free run then decodes
the same N tokens with EOS held off, so both time the same number of forward passes on the same
prompt. Reported: decode ms/token (time after the first token / (N - 1)) of each, their
difference, the time spent inside the grammar (mask + consume) per token, measured directly,
and the one-off costs (llguidance's tokenizer view, built once per package; the grammar,
compiled once per request). Medians over all runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import llmopt
from llmopt.runtime import constraints
from llmopt.runtime.constraints import ResponseFormat, TokenConstraint
from llmopt.runtime.generator import Generator

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "number"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40},
                      "maxItems": 3},
    },
    "required": ["name", "country", "population_millions", "landmarks"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo"]


class GrammarClock:
    """Time spent in TokenConstraint.allowed and .consume (the grammar's share of a step)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def install(self) -> None:
        for name in ("allowed", "consume"):
            original = getattr(TokenConstraint, name)

            def timed(self_, *args, _original=original, _name=name):  # type: ignore[no-untyped-def]
                start = time.perf_counter()
                try:
                    return _original(self_, *args)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.calls += _name == "allowed"

            setattr(TokenConstraint, name, timed)


def per_token_ms(result) -> float:  # type: ignore[no-untyped-def]
    s = result.stats
    return 1000.0 / s.decode_tokens_per_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, help="a decoder package (SmolLM2 int4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/structured.md")
    args = parser.parse_args()

    generator = llmopt.load(args.package, ["cpu"])
    assert isinstance(generator, Generator)
    start = time.perf_counter()
    constraints.grammar_tokenizer(generator.tokenizer, generator.eos_token_ids)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    fmt = ResponseFormat.json_schema(SCHEMA)
    TokenConstraint(fmt, generator.tokenizer, generator.eos_token_ids)
    compile_ms = (time.perf_counter() - start) * 1000
    clock = GrammarClock()
    clock.install()
    generator.prefix_cache_bytes = 0  # the same prompts run constrained and free: prefill both
    generator.generate("Hi", max_new_tokens=8)  # warm-up
    free_ms, constrained_ms, tokens, outputs, finishes = [], [], [], [], []
    for _ in range(args.repeats):
        for city in CITIES:
            prompt = f"Describe {city} as a JSON record with its country, population and landmarks."
            constrained = generator.chat(prompt, max_new_tokens=300, response_format=fmt)
            n = len(constrained.token_ids)
            free = generator.chat(prompt, max_new_tokens=n, ignore_eos=True)
            constrained_ms.append(per_token_ms(constrained))
            free_ms.append(per_token_ms(free))
            tokens.append(n)
            outputs.append(constrained.text)
            finishes.append(constrained.finish_reason)
    free, constrained = statistics.median(free_ms), statistics.median(constrained_ms)
    grammar_ms = clock.seconds / clock.calls * 1000
    rows = {
        "free decode ms/token": free,
        "constrained decode ms/token": constrained,
        "added ms/token (constrained - free)": constrained - free,
        "added %": 100 * (constrained - free) / free,
        "grammar ms/token (mask + consume, measured inside)": grammar_ms,
    }
    command = "python bench/structured.py " + " ".join(sys.argv[1:])
    lines = [
        "# Constrained JSON decoding: added latency per token", "",
        f"Command: `{command}`", "",
        f"Package: `{Path(args.package).name}`; "
        f"CPU: {platform.processor() or platform.machine()}, providers {generator.providers}; "
        f"{len(tokens)} runs ({args.repeats} x {len(CITIES)} prompts), median "
        f"{statistics.median(tokens):.0f} tokens per JSON answer, batch 1, greedy.", "",
        "| measure | value |", "|---|---|",
        *[f"| {name} | {value:.3f} |" for name, value in rows.items()],
        f"| llguidance tokenizer view, once per package (s) | {tokenizer_s:.3f} |",
        f"| grammar compile, once per request (ms) | {compile_ms:.2f} |",
        "", f"Constrained outputs that parse as JSON: {sum(map(_parses, outputs))} of "
        f"{len(outputs)} (finish reasons: {dict(Counter(finishes))}; an answer cut by "
        "max_new_tokens finishes 'length'). First output: " f"`{outputs[0]}`", "",
    ]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"command": command, "rows": rows, "tokenizer_s": tokenizer_s, "compile_ms": compile_ms,
         "free_ms": free_ms, "constrained_ms": constrained_ms, "tokens": tokens,
         "outputs": outputs, "finish_reasons": finishes}, indent=2))
    print("\n".join(lines))
    return 0


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
