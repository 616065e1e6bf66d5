"""Mixture-of-experts MLP speed: ONNX Runtime's ``MoE`` op (optimize's ``moe`` fusion) against
the per-expert primitive form it replaces, on a random decoder (no checkpoint needed).

Both graphs carry every other fusion (attention, norms), so the ratio is the experts' alone.

    python -m bench.moe_cpu [--hidden 512 --experts 8 --top-k 2 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from llmopt.exporter.decoder_graph import FUSIONS, build_decoder
from llmopt.exporter.ops import Linear
from llmopt.exporter.weights import DecoderDims, DecoderWeights, LayerWeights, MoeWeights, Norm


def random_model(hidden: int, experts: int, top_k: int, layers: int, inter: int,
                 vocab: int = 1024, heads: int = 8, kv_heads: int = 2) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def m(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)

    dims = DecoderDims(
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        hidden=hidden, vocab=vocab, eps=1e-5, activation="silu", max_positions=4096,
        sliding_window=None, rotary_dim=head_dim, attention_scale=head_dim ** -0.5,
        layer_scales=(1.0,) * layers, num_experts=experts, experts_per_token=top_k)
    ones = Norm(np.ones(hidden, np.float32))
    qkv_out = (heads + 2 * kv_heads) * head_dim
    weights = DecoderWeights(
        embed=m(vocab, hidden), position_embed=None,
        layers=[LayerWeights(ones, Linear(m(hidden, qkv_out), None),
                             Linear(m(hidden, hidden), None), ones, None, None, True,
                             moe=MoeWeights(Linear(m(hidden, experts), None),
                                            m(experts, hidden, 2 * inter),
                                            m(experts, inter, hidden)))
                for _ in range(layers)],
        final_norm=ones, lm_head=Linear(m(hidden, vocab), None),
        inv_freq=1.0 / 10000 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    return dims, weights


def time_steps(proto: Any, dims: Any, threads: int, batch: int, prompt: int,
               repeats: int) -> dict[str, float]:
    """Median milliseconds of a prefill of ``prompt`` tokens and of one decode step after it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    ids = rng.integers(0, dims.vocab, size=(batch, prompt + 1))
    empty = np.zeros((batch, dims.num_kv_heads, 0, dims.head_dim), np.float32)
    names = [o.name for o in session.get_outputs()]

    def feed(start: int, stop: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"input_ids": ids[:, start:stop],
                "attention_mask": np.ones((batch, stop), np.int64),
                "position_ids": np.tile(np.arange(start, stop), (batch, 1)),
                "logits_to_keep": np.array(1, np.int64), **past}

    zero = {f"past_key_values.{i}.{k}": empty for i in range(dims.num_layers)
            for k in ("key", "value")}
    out: dict[str, list[float]] = {"prefill_ms": [], "decode_ms": []}
    for _ in range(repeats):
        started = time.perf_counter()
        result = dict(zip(names, session.run(None, feed(0, prompt, zero)), strict=True))
        out["prefill_ms"].append((time.perf_counter() - started) * 1e3)
        past = {f"past_key_values.{i}.{k}": result[f"present.{i}.{k}"]
                for i in range(dims.num_layers) for k in ("key", "value")}
        started = time.perf_counter()
        session.run(None, feed(prompt, prompt + 1, past))
        out["decode_ms"].append((time.perf_counter() - started) * 1e3)
    return {k: round(statistics.median(v[1:]), 3) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--inter", type=int, default=1792)  # Mixtral's 3.5 x hidden
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    dims, weights = random_model(args.hidden, args.experts, args.top_k, args.layers, args.inter)
    forms = {"moe_op": frozenset(FUSIONS), "primitive": frozenset(FUSIONS) - {"moe"}}
    protos = {name: build_decoder(dims, weights, "rms", np.float32, f)
              for name, f in forms.items()}
    rows = []
    for batch in args.batch:
        timed = {name: time_steps(proto, dims, args.threads, batch, args.prompt, args.repeats)
                 for name, proto in protos.items()}
        rows.append({"batch": batch, **{f"{n}_{k}": v for n, t in timed.items()
                                        for k, v in t.items()},
                     **{f"speedup_{k}": round(timed["primitive"][k] / timed["moe_op"][k], 2)
                        for k in ("prefill_ms", "decode_ms")}})
    print(json.dumps({"config": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
