"""The Generator on tiny exported decoders: equality with transformers, batching, sampling,
stop strings, streaming and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmopt
from llmopt.exporter import export
from llmopt.optimizer import optimize
from llmopt.runtime.generator import Generator
from tests import tiny_decoders

PROMPTS = ["the quick brown fox", "hello world , how are you ?", "one two three four five six",
           "a"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama-optimized"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Path, Generator]:
    """``-optimized``: the fused float32 graph, whose KV cache is one buffer per tensor that
    GroupQueryAttention updates in place (``shared_buffer``)."""
    arch, _, optimized = request.param.partition("-")
    root = tmp_path_factory.mktemp(request.param)
    source = tiny_decoders.build(arch, root / "source")
    package = export(source, root / "package")
    if optimized:
        package = optimize(package, root / "optimized")
    generator = llmopt.load(package.path)
    assert isinstance(generator, Generator)
    assert generator.shared_kv == bool(optimized)
    return source, generator


def _torch_greedy(source: Path, prompt: str, n: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_equals_transformers_generate(tiny: tuple[Path, Generator]) -> None:
    source, generator = tiny
    for prompt in PROMPTS[:2]:
        result = generator.generate(prompt, max_new_tokens=20, ignore_eos=True)
        assert result.token_ids == _torch_greedy(source, prompt, 20)
        assert result.finish_reason == "length"
        assert result.stats.generated_tokens == 20
        assert result.stats.prompt_tokens == len(generator.encode(prompt))
        assert result.stats.ttft_s > 0 and result.stats.decode_tokens_per_s > 0


def test_batch_of_different_lengths_equals_each_alone(tiny: tuple[Path, Generator]) -> None:
    _, generator = tiny
    batch = generator.generate_batch(PROMPTS, max_new_tokens=12, ignore_eos=True)
    alone = [generator.generate(p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert len({len(generator.encode(p)) for p in PROMPTS}) == len(PROMPTS)


def test_seeded_sampling_is_reproducible(tiny: tuple[Path, Generator]) -> None:
    _, generator = tiny
    kwargs = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16, "ignore_eos": True}
    first = generator.generate(PROMPTS[0], seed=7, **kwargs).token_ids
    assert generator.generate(PROMPTS[0], seed=7, **kwargs).token_ids == first
    others = {tuple(generator.generate(PROMPTS[0], seed=s, **kwargs).token_ids)
              for s in range(8, 12)}
    assert others != {tuple(first)}


def test_stream_concatenates_to_the_result(tiny: tuple[Path, Generator]) -> None:
    _, generator = tiny
    stream = generator.stream(PROMPTS[1], max_new_tokens=15, ignore_eos=True)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text
    assert stream.result.text == generator.tokenizer.decode(stream.result.token_ids,
                                                            skip_special_tokens=True)


def test_generate_decodes_the_text_once_and_streams_the_same(
        tiny: tuple[Path, Generator], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a stream or stop strings the text is decoded once, at the end: the same text a
    stream gives."""
    from llmopt.runtime.detokenize import Streamer

    _, generator = tiny
    calls: list[int] = []
    original = Streamer._decode

    def counting(self: Streamer, tokens: list[int]) -> str:
        calls.append(len(tokens))
        return original(self, tokens)

    monkeypatch.setattr(Streamer, "_decode", counting)
    result = generator.generate(PROMPTS[1], max_new_tokens=15, ignore_eos=True)
    assert calls == [15]
    streamed = "".join(generator.stream(PROMPTS[1], max_new_tokens=15, ignore_eos=True))
    assert result.text == streamed == generator.tokenizer.decode(result.token_ids,
                                                                 skip_special_tokens=True)


def test_stop_string_cuts_before_it(tiny: tuple[Path, Generator]) -> None:
    _, generator = tiny
    full = generator.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True)
    words = full.text.split()
    assert len(words) > 4
    stop = " " + words[3]  # a word in the middle of the greedy answer
    cut = full.text.index(stop)
    stream = generator.stream(PROMPTS[0], max_new_tokens=24, ignore_eos=True, stop=[stop])
    text = "".join(stream)
    assert text == full.text[:cut] == stream.result.text
    assert stream.result.finish_reason == "stop"


def test_eos_ends_generation(tiny: tuple[Path, Generator]) -> None:
    _, generator = tiny
    free = generator.generate(PROMPTS[2], max_new_tokens=8, ignore_eos=True)
    eos = free.token_ids[2]  # pretend the third token is end-of-sequence
    result = generator.generate(PROMPTS[2], max_new_tokens=8, eos_token_ids=(eos,))
    assert result.finish_reason == "eos"
    assert result.token_ids == free.token_ids[: free.token_ids.index(eos)]


def test_chat_messages_use_the_chat_template(tiny: tuple[Path, Generator]) -> None:
    _, generator = tiny
    ids = generator.encode([{"role": "user", "content": "hello"}])
    text = generator.tokenizer.decode(ids)
    assert "<|user|>" in text and text.rstrip().endswith("<|assistant|>")
    assert generator.chat("hello", max_new_tokens=3).stats.prompt_tokens == len(ids)


@pytest.mark.parametrize("prompt, kwargs, match", [
    ("", {}, "empty"),
    ("   ", {}, "empty"),
    ([], {}, "empty"),
    ([10**9], {}, "outside the vocabulary"),
    ([{"role": "user"}], {}, "content"),
    ("hello", {"temperature": -1}, "temperature"),
    ("hello", {"top_k": -1}, "top_k"),
    ("hello", {"top_k": 2**32 - 1}, "top_k .* beyond the vocabulary"),
    ("hello", {"eos_token_ids": (-1,)}, "eos_token_ids .* outside the vocabulary"),
    ("hello", {"eos_token_ids": (10**12,)}, "eos_token_ids .* outside the vocabulary"),
    ([{"role": "wizard", "content": "hi"}], {}, "unknown chat role 'wizard'"),
    ("hello", {"max_new_tokens": 0}, "max_new_tokens"),
    ("hello", {"bogus": 1}, "unknown generation option"),
])
def test_bad_input_is_a_clear_error(tiny: tuple[Path, Generator], prompt, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    _, generator = tiny
    with pytest.raises(llmopt.InvalidInputError, match=match):
        generator.generate(prompt, **kwargs)


def test_prompt_past_the_context_is_refused(tiny: tuple[Path, Generator]) -> None:
    _, generator = tiny
    with pytest.raises(llmopt.InvalidInputError, match="context is 256"):
        generator.generate(" ".join(["word"] * 300))


def test_generation_stops_at_the_context_limit(tiny: tuple[Path, Generator]) -> None:
    _, generator = tiny
    prompt = [5] * 250
    result = generator.generate(prompt, max_new_tokens=50, ignore_eos=True)
    assert result.stats.generated_tokens == 6 and result.finish_reason == "context"
