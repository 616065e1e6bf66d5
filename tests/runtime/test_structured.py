"""Structured output on a tiny random decoder: whatever its weights prefer, the Generator and
the engine write text that parses and validates against the schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

import llmopt
from llmopt.errors import InvalidInputError
from llmopt.runtime.constraints import ResponseFormat
from llmopt.runtime.engine import Engine
from llmopt.runtime.generator import Generator
from llmopt.runtime.sampling import SamplingParams

# bounded, so that a random model always finishes within max_new_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["ok", "color", "count", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["hello", "the sea", "Write JSON:", "a b c d e f"]


@pytest.fixture(scope="module")
def generator(byte_level_decoder: Path) -> Generator:
    runner = llmopt.load(byte_level_decoder)
    assert isinstance(runner, Generator)
    return runner


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_output_parses_and_validates(generator: Generator, temperature: float) -> None:
    fmt = ResponseFormat.json_schema(SCHEMA)
    for seed, prompt in enumerate(PROMPTS):
        result = generator.generate(prompt, max_new_tokens=120, response_format=fmt,
                                    temperature=temperature, seed=seed)
        jsonschema.validate(json.loads(result.text), SCHEMA)
        assert result.finish_reason == "eos"  # the grammar completed and ended the sequence


def test_unconstrained_output_is_not_json(generator: Generator) -> None:
    """The constraint, not the model, makes the JSON: the same prompts unconstrained."""
    for prompt in PROMPTS:
        text = generator.generate(prompt, max_new_tokens=40).text
        with pytest.raises(ValueError):
            json.loads(text)


def test_openai_dict_regex_and_lark(generator: Generator) -> None:
    openai = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    jsonschema.validate(json.loads(generator.generate(
        "hi", max_new_tokens=120, response_format=openai).text), SCHEMA)
    date = generator.generate("hi", max_new_tokens=20,
                              response_format=ResponseFormat.regex(r"\d{4}-\d{2}-\d{2}"))
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.text) and date.finish_reason == "eos"
    answer = generator.generate("hi", response_format=ResponseFormat.lark(
        'start: "yes" | "no" | "maybe"'))
    assert answer.text in ("yes", "no", "maybe")


def test_max_new_tokens_cuts_the_json_with_finish_reason_length(generator: Generator) -> None:
    result = generator.generate("hello", max_new_tokens=5,
                                response_format=ResponseFormat.json_schema(SCHEMA))
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert result.text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(result.text)


def test_stream_and_batch_are_constrained_alike(generator: Generator) -> None:
    params = SamplingParams(max_new_tokens=120, response_format=ResponseFormat.json_schema(SCHEMA))
    singles = [generator.generate(p, params) for p in PROMPTS]
    batch = generator.generate_batch(PROMPTS, params)
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]
    stream = generator.stream(PROMPTS[0], params)
    assert "".join(stream) == stream.result.text == singles[0].text


def test_engine_masks_only_the_rows_that_ask(generator: Generator) -> None:
    constrained = SamplingParams(max_new_tokens=120,
                                 response_format=ResponseFormat.json_schema(SCHEMA))
    free = SamplingParams(max_new_tokens=30)
    expected = [generator.generate(p, constrained if i % 2 else free).token_ids
                for i, p in enumerate(PROMPTS)]
    engine = Engine(generator).start()
    try:
        requests = [engine.submit(p, constrained if i % 2 else free)
                    for i, p in enumerate(PROMPTS)]
        results = [r.result(timeout=60) for r in requests]
    finally:
        engine.close()
    assert [r.token_ids for r in results] == expected
    for result in results[1::2]:
        jsonschema.validate(json.loads(result.text), SCHEMA)


def test_a_package_whose_tokenizer_it_cannot_read_fails_at_submit(tmp_path: Path) -> None:
    from llmopt.exporter import export
    from tests import tiny_decoders

    words = llmopt.load(export(tiny_decoders.build("llama", tmp_path / "src"),
                               tmp_path / "pkg").path)
    assert isinstance(words, Generator)
    engine = Engine(words)  # not started: the error comes from submit itself
    with pytest.raises(InvalidInputError, match="cannot read this package's tokenizer"):
        engine.submit("hello", SamplingParams(response_format=ResponseFormat.json_object()))
    assert engine.queue_depth == 0
