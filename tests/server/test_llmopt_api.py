"""llmopt's own API through llmopt.Client and AsyncClient against a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llmopt
from llmopt.runtime.embedder import Embedder
from llmopt.runtime.generator import Generator
from llmopt.server.status import DeadlineExceededError, ModelNotFoundError, ServerUnavailableError
from tests.server.conftest import CLASSIFIER, DECODER, ENCODER

PROMPTS = ["the quick brown fox", "hello world , how are you ?", "one two three"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_generation_equals_in_process(client: Any, generator: Generator,
                                               prompt: str) -> None:
    expected = generator.generate(prompt, max_new_tokens=20, ignore_eos=True)
    stream = client.stream(DECODER, prompt, max_new_tokens=20, ignore_eos=True)
    deltas = list(stream)
    result = stream.result
    assert result.token_ids == expected.token_ids
    assert "".join(deltas) == result.text == expected.text
    assert result.finish_reason == "length"
    stats = result.stats
    assert (stats.prompt_tokens, stats.generated_tokens) == (expected.stats.prompt_tokens, 20)
    assert 0 < stats.ttft_s <= stats.total_s and stats.decode_tokens_per_s > 0


def test_a_continued_prompt_reports_the_tokens_it_reused(client: Any, generator: Generator
                                                         ) -> None:
    ids = generator.encode("the quick brown fox jumps over the lazy dog . " * 4)
    first = client.generate(DECODER, ids, max_new_tokens=6, ignore_eos=True)
    follow = ids + first.token_ids + generator.encode("one two three")
    result = client.generate(DECODER, follow, max_new_tokens=6, ignore_eos=True)
    assert result.token_ids == generator.generate(follow, max_new_tokens=6,
                                                  ignore_eos=True).token_ids
    # the first answer's last token never ran: everything before it is cached
    assert result.stats.cached_prompt_tokens == len(ids) + len(first.token_ids) - 1
    assert first.stats.cached_prompt_tokens < len(ids)


def test_a_prediction_travels_and_its_drafts_are_counted(client: Any, generator: Generator
                                                         ) -> None:
    expected = generator.generate("the sea", max_new_tokens=12, ignore_eos=True)
    result = client.generate(DECODER, "the sea", max_new_tokens=12, ignore_eos=True,
                             prediction=expected.text)
    assert result.token_ids == expected.token_ids
    assert result.stats.accepted_draft_tokens > 6
    assert result.stats.rejected_draft_tokens >= 0


def test_chat_messages_and_token_ids(client: Any, generator: Generator) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    assert (client.chat(DECODER, messages, max_new_tokens=8).token_ids
            == generator.chat(messages, max_new_tokens=8).token_ids)
    assert (client.chat(DECODER, "hello world", max_new_tokens=8).token_ids
            == generator.generate("hello world", chat=True, max_new_tokens=8).token_ids)
    ids = generator.encode("the sea")
    assert (client.generate(DECODER, ids, max_new_tokens=6, ignore_eos=True).token_ids
            == generator.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids)


def test_sampling_options_travel(client: Any, generator: Generator) -> None:
    options = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 7, "max_new_tokens": 12,
               "repetition_penalty": 1.2, "ignore_eos": True}
    assert (client.generate(DECODER, "the sea", **options).token_ids
            == generator.generate("the sea", **options).token_ids)
    stop = generator.generate("the sea", max_new_tokens=12, ignore_eos=True).text.split()[2]
    result = client.generate(DECODER, "the sea", max_new_tokens=12, ignore_eos=True, stop=stop)
    assert result.finish_reason == "stop" and stop not in result.text


def test_embed_equals_in_process(client: Any, embedder: Embedder) -> None:
    texts = ["hello world", "the quick brown fox jumps", "sea"]
    remote = client.embed(ENCODER, texts)
    np.testing.assert_allclose(remote, embedder.embed(texts), rtol=1e-6, atol=1e-6)
    normalized = client.embed(ENCODER, texts, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, rtol=1e-5)


def test_tokenize_both_kinds(client: Any, generator: Generator, embedder: Embedder) -> None:
    assert client.tokenize(DECODER, "hello world").ids == generator.encode("hello world")
    chat = client.tokenize(DECODER, [{"role": "user", "content": "hi"}])
    assert chat.ids == generator.encode([{"role": "user", "content": "hi"}])
    assert len(chat.tokens) == len(chat.ids)
    tokens = client.tokenize(ENCODER, "hello world")
    assert tokens.ids == list(embedder.tokenizer("hello world")["input_ids"])
    assert tokens.tokens[0] == "[CLS]"


def test_list_and_get_models(client: Any, packages: dict[str, Path]) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {DECODER, ENCODER, CLASSIFIER}
    assert models[DECODER].task == "text-generation" and models[DECODER].state == "READY"
    details = client.get_model(DECODER)
    assert details.providers == ("cpu",) and not details.provider_fallback
    assert details.inputs[0].name == "input_ids" and details.inputs[0].shape == ("batch",
                                                                                  "sequence")
    assert details.manifest["task"] == "text-generation"
    assert details.limits["context_length"] == 256 and details.limits["max_batch_size"] == 8
    encoder = client.get_model(ENCODER)
    assert encoder.outputs[0].shape == ("batch", "sequence", 32)


@pytest.mark.parametrize(("call", "error", "text"), [
    (lambda c: c.generate("nope", "hi"), ModelNotFoundError, "no model named 'nope'"),
    (lambda c: c.generate("../etc", "hi"), ModelNotFoundError, "no model named"),
    (lambda c: c.generate(ENCODER, "hi"), llmopt.InvalidInputError, "is an encoder"),
    (lambda c: c.embed(DECODER, ["hi"]), llmopt.InvalidInputError, "is a decoder"),
    (lambda c: c.embed(CLASSIFIER, ["hi"]), llmopt.InvalidInputError, "text-classification"),
    (lambda c: c.embed(ENCODER, []), llmopt.InvalidInputError, "no texts"),
    (lambda c: c.embed(ENCODER, ["x"] * 9), llmopt.InvalidInputError, "at most 8"),
    (lambda c: c.generate(DECODER, "word " * 300), llmopt.InvalidInputError, "context is 256"),
    (lambda c: c.generate(DECODER, "   "), llmopt.InvalidInputError, "prompt is empty"),
    (lambda c: c.generate(DECODER, [99999]), llmopt.InvalidInputError, "outside the vocab"),
    (lambda c: c.generate(DECODER, "hi", eos_token_ids=(-1,)), llmopt.InvalidInputError,
     r"eos_token_ids \[-1\] are outside"),
    (lambda c: c.generate(DECODER, "hi", eos_token_ids=(10**12,)), llmopt.InvalidInputError,
     "eos_token_ids .* are outside"),
    (lambda c: c.generate(DECODER, "hi", top_k=2**32 - 1), llmopt.InvalidInputError,
     "beyond the vocabulary"),
    (lambda c: c.chat(DECODER, [{"role": "wizard", "content": "hi"}]),
     llmopt.InvalidInputError, "unknown chat role 'wizard'"),
    (lambda c: c.tokenize(ENCODER, [{"role": "user", "content": "x"}]),
     llmopt.InvalidInputError, "tokenizes text"),
    (lambda c: c.get_model("missing"), ModelNotFoundError, "no model named"),
])
def test_errors_come_back_typed(client: Any, call: Any, error: type, text: str) -> None:
    with pytest.raises(error, match=text) as info:
        call(client)
    assert info.value.fix  # the fix travels in the trailers


def test_client_side_validation_needs_no_call() -> None:
    client = llmopt.Client("127.0.0.1:1")
    with pytest.raises(llmopt.InvalidInputError, match="temperature"):
        client.generate(DECODER, "hi", temperature=-1)
    with pytest.raises(llmopt.InvalidInputError, match="unknown generation option"):
        client.generate(DECODER, "hi", max_tokens=3)
    with pytest.raises(ServerUnavailableError):
        client.list_models(timeout=5)


def test_deadline_is_typed(client: Any, server: Any) -> None:
    with pytest.raises(DeadlineExceededError) as info:
        client.generate(DECODER, "hello", max_new_tokens=200, ignore_eos=True, timeout=0.0001)
    assert isinstance(info.value, TimeoutError)


def test_async_client(server: Any, generator: Generator, embedder: Embedder) -> None:
    async def main() -> tuple[Any, ...]:
        async with llmopt.AsyncClient(server.address) as client:
            stream = client.stream(DECODER, PROMPTS[0], max_new_tokens=10, ignore_eos=True)
            deltas = [d async for d in stream]
            both = await asyncio.gather(
                client.generate(DECODER, PROMPTS[1], max_new_tokens=10, ignore_eos=True),
                client.embed(ENCODER, ["hello world"]))
            models = await client.list_models()
            with pytest.raises(ModelNotFoundError):
                await client.get_model("nope")
            return deltas, stream.result, both, models

    deltas, result, (second, vectors), models = asyncio.run(main())
    assert "".join(deltas) == result.text
    assert result.token_ids == generator.generate(PROMPTS[0], max_new_tokens=10,
                                                  ignore_eos=True).token_ids
    assert second.token_ids == generator.generate(PROMPTS[1], max_new_tokens=10,
                                                  ignore_eos=True).token_ids
    np.testing.assert_allclose(vectors, embedder.embed(["hello world"]), rtol=1e-6, atol=1e-6)
    assert len(models) == 3
