"""Why greedy answers changed with the load: how much a row's logits move when its batch changes.

    python bench/padding_probe.py PACKAGE [PACKAGE ...]

For one chat prompt, prefilled alone, the next decode step's logits are compared bitwise with
the same step run (a) in a batch of 8 copies of the row (no padding), (b) with the row's KV
cache left-padded by 1 and by 4 masked columns, as the shared batch pads a row that joined one
step later; and the prefill's logits alone with (c) the prefill beside another prompt of the
same length (the rows differ in one token). Prints the largest logit change of each. The
figures quoted in docs/batch_invariance.md come from this script.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def probe(path: str) -> None:
    import llmopt
    from llmopt.runtime.kv import left_pad, position_ids

    gen: Any = llmopt.load(path, ["cpu"])
    prompt = gen.encode("Write a short story about a girl who learns to paint.", chat=True)

    def prefill(prompts: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        ids, mask = left_pad(prompts, gen.pad_token_id)
        cache = gen.model.copying_cache(len(prompts))
        logits = gen.model.step(ids, mask, position_ids(mask), cache)
        return logits[:, -1], cache.arrays()

    def decode(token: int, past: list[np.ndarray], pad: int, copies: int) -> np.ndarray:
        cache = [np.concatenate([np.pad(p, [(0, 0), (0, 0), (pad, 0), (0, 0)])] * copies)
                 for p in past]
        mask = np.concatenate([np.zeros((copies, pad), np.int64),
                               np.ones((copies, len(prompt) + 1), np.int64)], axis=1)
        logits = gen.model.step(np.full((copies, 1), token, np.int64), mask,
                                np.full((copies, 1), len(prompt), np.int64),
                                gen.model.copying_cache(copies, past=cache))
        return logits[0, -1]

    alone, past = prefill([prompt])
    token = int(alone[0].argmax())
    step = decode(token, past, 0, 1)
    other = list(prompt)
    other[-5] += 1
    beside, _ = prefill([prompt, other])
    changes = {
        "decode in 8 copies": decode(token, past, 0, 8) - step,
        "decode, cache padded by 1": decode(token, past, 1, 1) - step,
        "decode, cache padded by 4": decode(token, past, 4, 1) - step,
        "prefill beside another row of its length": beside[0] - alone[0],
    }
    for name, change in changes.items():
        print(f"{path}: {name:42s} max |logit change| {float(np.abs(change).max()):.3g}")


if __name__ == "__main__":
    for package in sys.argv[1:]:
        probe(package)
