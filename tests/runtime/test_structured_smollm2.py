"""SmolLM2-135M-Instruct answers as JSON under a schema: for ten different prompts the output
parses and validates, whatever the small model would have written unconstrained."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import llmopt
from llmopt.runtime.constraints import ResponseFormat
from llmopt.runtime.generator import Generator
from llmopt.runtime.sampling import SamplingParams

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "kind": {"enum": ["person", "place", "thing", "animal", "idea"]},
        "year": {"type": "integer", "minimum": -3000, "maximum": 2100},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 48},
                  "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "kind", "year", "facts"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe the Eiffel Tower as a JSON record.",
    "Tell me about Albert Einstein in JSON.",
    "Give a JSON summary of the planet Mars.",
    "What is a cat? Answer in JSON.",
    "Summarize the idea of democracy as JSON.",
    "Describe the river Nile in JSON.",
    "Give me a JSON record about the printing press.",
    "Who was Ada Lovelace? Reply with JSON.",
    "Describe an elephant as a JSON object.",
    "Write a JSON record about the city of Rome.",
]


@pytest.fixture(scope="module")
def generator(smollm2_package: Path) -> Generator:
    runner = llmopt.load(smollm2_package, ["cpu"])
    assert isinstance(runner, Generator)
    return runner


def test_json_schema_answers_parse_and_validate(generator: Generator) -> None:
    params = SamplingParams(max_new_tokens=256, response_format=ResponseFormat.json_schema(SCHEMA))
    results = generator.generate_batch(PROMPTS, params, chat=True)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.finish_reason == "eos", (prompt, result.text)
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert len({r.text for r in results}) == len(PROMPTS)  # ten answers, not one template
