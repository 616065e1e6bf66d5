"""The streamer's incremental detokenization: the same text as decoding the whole sequence, at
the cost of a short window per token."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmopt.runtime.detokenize import CONTEXT, Streamer
from tests import tiny_tokenizers


def metaspace_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer: pieces that begin a word carry "▁", which decodes to a
    space except at the start of the text."""
    pieces = ["<unk>", "<s>", "</s>", *(f"\u2581{w}" for w in tiny_tokenizers.WORDS[:60]),
              *tiny_tokenizers.WORDS[60:90], *tiny_tokenizers.PUNCTUATION, "\u2581"]
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module", params=["word_level", "byte_level", "metaspace"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp(request.param)
    return {"word_level": tiny_tokenizers.decoder_tokenizer,
            "byte_level": tiny_tokenizers.byte_level_tokenizer,
            "metaspace": metaspace_tokenizer}[request.param](folder)


def streamed(tokenizer: Any, ids: list[int], stop: tuple[str, ...] = ()) -> str:
    streamer = Streamer(tokenizer, stop)
    deltas = [streamer.push(i) for i in ids]
    return "".join(deltas) + streamer.finish()


def test_the_deltas_add_up_to_the_whole_decode(tokenizer: Any) -> None:
    """Random sequences over the whole vocabulary, special tokens and (byte-level) pieces of
    multi-byte characters included."""
    rng = random.Random(0)
    vocabulary = len(tokenizer)
    for _ in range(200):
        ids = [rng.randrange(vocabulary) for _ in range(rng.randrange(1, 40))]
        assert streamed(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_each_push_decodes_a_window_not_the_sequence(tokenizer: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    text = " ".join(tiny_tokenizers.WORDS[:200])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:200]
    decoded: list[int] = []
    original = Streamer._decode

    def counting(self: Streamer, tokens: list[int]) -> str:
        decoded.append(len(tokens))
        return original(self, tokens)

    monkeypatch.setattr(Streamer, "_decode", counting)
    assert streamed(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(decoded) <= CONTEXT + 1 + CONTEXT  # never the whole sequence past the start
    assert sum(decoded) < len(ids) * (2 * CONTEXT + 2)


def test_a_stop_string_across_tokens_still_cuts(tokenizer: Any) -> None:
    words = tiny_tokenizers.WORDS[10:20]  # in every test vocabulary
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    middle = full.index(words[5])
    stop = full[middle - 2:middle + 2]  # the end of one token and the start of the next
    assert streamed(tokenizer, ids, (stop,)) == full[:full.index(stop)]


def test_added_tokens_are_decoded_once_at_the_end(tokenizer: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Text nobody streams (no delta sink, no stop string) is decoded at finish, not per token;
    a push after adds (or a catch-up mid-way) gives the text pushes alone would."""
    rng = random.Random(1)
    vocabulary = len(tokenizer)
    ids = [rng.randrange(vocabulary) for _ in range(120)]
    want = tokenizer.decode(ids, skip_special_tokens=True)
    calls: list[int] = []
    original = Streamer._decode

    def counting(self: Streamer, tokens: list[int]) -> str:
        calls.append(len(tokens))
        return original(self, tokens)

    monkeypatch.setattr(Streamer, "_decode", counting)
    streamer = Streamer(tokenizer)
    for i in ids:
        streamer.add(i)
    assert calls == []
    assert streamer.finish() == want
    assert calls == [len(ids)]

    mixed = Streamer(tokenizer)
    deltas = []
    for n, i in enumerate(ids):
        if n % 7 < 3:
            mixed.add(i)
        else:
            deltas.append(mixed.push(i))
        if n % 11 == 0:
            deltas.append(mixed.catch_up())
    assert "".join(deltas) + mixed.finish() == want
