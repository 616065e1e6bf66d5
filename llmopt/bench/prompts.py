"""Workload inputs of exact sizes: decoder prompts of N token ids, encoder texts of ~N tokens.

Prompts are token ids cut from a fixed English text (different offsets per row, equal lengths,
so a batch has no padding), tokenized once before any clock starts; every target of a point
gets the same ids.
"""

from __future__ import annotations

from typing import Any

from llmopt.errors import InvalidInputError

TEXT = (
    "The history of computing is a story of people trying to make machines that think faster "
    "than they do. In the nineteenth century Charles Babbage designed the Analytical Engine, a "
    "mechanical computer that was never completed, and Ada Lovelace wrote what many consider "
    "the first program for it. A century later, Alan Turing described a universal machine, and "
    "during the war engineers built electronic computers to break codes and compute firing "
    "tables. Transistors replaced vacuum tubes, integrated circuits replaced transistors, and "
    "today a phone holds more computing power than all of those machines together. Networks "
    "joined the machines, and the web joined the people who used them; search engines indexed "
    "what they wrote, and statistical models learned to translate, to recognise speech and to "
    "answer questions. Language models now write code and prose, summarise long documents and "
    "hold conversations, running on accelerators in data centres and on the processors of "
    "ordinary laptops, where every millisecond of latency and every byte of memory counts. "
)
ROW_OFFSET = 7  # tokens between the starts of two rows of a batch
# Short chat questions, for the scripts in bench/ that drive a server with chat requests.
CHAT_QUESTIONS = (
    "What is the capital of France?", "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.", "List three fruits.",
    "How do airplanes fly?", "Give me a tip for learning Python.",
    "What is photosynthesis?", "Describe a cat in one paragraph.",
)


def decoder_prompts(tokenizer: Any, length: int, batch: int) -> list[list[int]]:
    """``batch`` distinct prompts of exactly ``length`` token ids."""
    ids = list(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidInputError("the tokenizer turns the bench text into no tokens",
                                fix="check the package's tokenizer")
    need = length + ROW_OFFSET * batch
    stream = ids * (need // len(ids) + 1)
    return [stream[row * ROW_OFFSET: row * ROW_OFFSET + length] for row in range(batch)]


def encoder_texts(tokenizer: Any, length: int, batch: int) -> tuple[list[str], float]:
    """``batch`` texts of at most ``length`` tokens each (special tokens included), as close
    to it as whole words allow; and their mean token count."""
    words = (TEXT * (length // 50 + 2)).split()
    texts, counts = [], []
    for row in range(batch):
        start = (row * ROW_OFFSET) % 40
        low, high = 1, len(words) - start
        while low < high:  # the most words whose tokens fit in `length`
            mid = (low + high + 1) // 2
            if len(tokenizer(" ".join(words[start:start + mid]))["input_ids"]) <= length:
                low = mid
            else:
                high = mid - 1
        text = " ".join(words[start:start + low])
        texts.append(text)
        counts.append(len(tokenizer(text)["input_ids"]))
    return texts, sum(counts) / len(counts)
