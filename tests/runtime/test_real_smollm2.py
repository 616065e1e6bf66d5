"""SmolLM2-135M-Instruct (real weights, from its GGUF file): export, generation, streaming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import llmopt
from llmopt.runtime.detokenize import REPLACEMENT, Streamer
from llmopt.runtime.engine import Engine, EngineConfig
from llmopt.runtime.generator import Generator
from llmopt.runtime.sampling import SamplingParams

pytestmark = pytest.mark.real_model

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits.",
]
UTF8_TEXT = "你好！我是AI助手，有什么可以帮助您的吗？ 🚀🎉 naïve café — 日本語もOK 👩‍💻"


@pytest.fixture(scope="module")
def generator(smollm2_package: Path) -> Generator:
    runner = llmopt.load(smollm2_package, ["cpu"])
    assert isinstance(runner, Generator)
    return runner


def test_gguf_export_is_validated_with_greedy_generation(smollm2_package: Path) -> None:
    manifest = json.loads((smollm2_package / "llmopt.json").read_text())
    assert manifest["source"]["kind"] == "gguf"
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["kv_cache"]["num_kv_heads"] == 3 < manifest["kv_cache"]["num_attention_heads"]
    validation = manifest["validation"]
    assert validation["passed"]
    # the default 16 tokens on each prompt (32 through the CLI: see the test below)
    full = [g for g in validation["generation"] if g["match"] and g["tokens"] == 16]
    assert len(full) >= 3, validation["generation"]
    assert manifest["generation"]["chat_template"]


def _torch_chat_greedy(model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_cli_generate_equals_transformers_token_for_token(smollm2_package: Path,
                                                          smollm2_torch: Any,
                                                          generator: Generator) -> None:
    for prompt in CHAT_PROMPTS[:3]:
        result = subprocess.run(
            [sys.executable, "-m", "llmopt.cli.main", "generate", str(smollm2_package), prompt,
             "--max-new-tokens", "32", "--json"],
            capture_output=True, text=True, timeout=300, check=True)
        ours = json.loads(result.stdout)
        want = _torch_chat_greedy(smollm2_torch, generator.tokenizer, prompt, 32)
        assert ours["token_ids"] == want, prompt
        assert ours["providers"][0] == "cpu"


def test_batch_of_four_prompts_equals_each_alone(generator: Generator) -> None:
    lengths = {len(generator.encode(p, chat=True)) for p in CHAT_PROMPTS}
    assert len(lengths) == 4
    batch = generator.generate_batch(CHAT_PROMPTS, chat=True, max_new_tokens=32)
    alone = [generator.generate(p, chat=True, max_new_tokens=32) for p in CHAT_PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]


def test_chinese_and_emoji_stream_byte_safely(generator: Generator) -> None:
    tokenizer = generator.tokenizer
    ids = tokenizer(UTF8_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(UTF8_TEXT) // 2  # byte-level pieces: characters span tokens
    streamer = Streamer(tokenizer)
    deltas = [streamer.push(t) for t in ids] + [streamer.finish()]
    assert "".join(deltas) == tokenizer.decode(ids) == UTF8_TEXT
    assert not any(REPLACEMENT in d for d in deltas)
    # and through the model: the greeting the product grew out of
    stream = generator.stream("你好！我是AI助手，有什么可以帮助您的吗？", chat=True,
                              max_new_tokens=40)
    parts = list(stream)
    assert "".join(parts) == stream.result.text
    assert not any(REPLACEMENT in p for p in parts)


def test_stop_strings_cut_a_real_answer(generator: Generator) -> None:
    full = generator.generate("List three fruits.", chat=True, max_new_tokens=40)
    assert "\n" in full.text or "," in full.text
    stop = "\n" if "\n" in full.text else ","
    cut = generator.generate("List three fruits.", chat=True, max_new_tokens=40, stop=[stop])
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(generator: Generator) -> None:
    kwargs = {"chat": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95,
              "repetition_penalty": 1.1, "max_new_tokens": 24}
    a = generator.generate("Tell me a story.", seed=42, **kwargs)
    b = generator.generate("Tell me a story.", seed=42, **kwargs)
    assert a.token_ids == b.token_ids and a.text == b.text


EDIT = ("Fix the spelling mistakes in this text and write it out in full:\n\nOur shop opens at "
        "nine in the moring and closes at five in the evning. We repair evry kind of bicycle.")


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_prompt_lookup_gives_a_real_answer_identically_in_fewer_steps(
        kind: str, generator: Generator, smollm2_demo: dict[str, Any]) -> None:
    """SmolLM2 restating a paragraph: drafts from the prompt are confirmed, and the answer is
    the plain one token for token (the unfused fp32 graph's copying cache, the int4 package's
    in-place cache and kernels)."""
    runner = generator if kind == "fp32" else llmopt.load(
        Path(smollm2_demo["out"]) / "packages" / "int4", ["cpu"])
    assert isinstance(runner, Generator)
    plain = runner.chat(EDIT, max_new_tokens=48)
    drafted = runner.chat(EDIT, max_new_tokens=48, prompt_lookup=4)
    assert drafted.token_ids == plain.token_ids and drafted.text == plain.text
    assert drafted.stats.accepted_draft_tokens >= len(drafted.token_ids) // 4
    # the serving engine's lone row drafts too (its slot store, not the Generator's cache)
    engine = Engine(runner, EngineConfig(prefix_cache_bytes=0)).start()
    try:
        served = engine.submit(EDIT, SamplingParams(max_new_tokens=48, prompt_lookup=4),
                               chat=True).result(timeout=300)
    finally:
        engine.close()
    assert served.token_ids == plain.token_ids and served.text == plain.text
    assert served.stats.accepted_draft_tokens == drafted.stats.accepted_draft_tokens
