"""The transformers 4.x shims the traced builder applies while it traces
(:mod:`llmopt.exporter.traced_compat`): broadcast masks equal to transformers' own, every expert
run with zero weight where not chosen, each restored afterwards, and the mixture-of-experts
families they cannot cover refused from the config."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import masking_utils

import llmopt
from llmopt.exporter import ExportOptions, export, traced_compat
from tests import tiny_decoders, tiny_families
from tests.exporter.test_decoders import _unreadable_weights
from tests.test_docs import _errors as schema_errors

TRANSFORMERS_4 = int(transformers.__version__.split(".", 1)[0]) < 5
ONLY_4 = pytest.mark.skipif(not TRANSFORMERS_4,
                            reason="transformers 5 needs no shim here (masks broadcast, experts "
                            "trace with batched_mm)")


def _loop_mask(mask_function: object, batch: int, q: torch.Tensor, kv: torch.Tensor
               ) -> torch.Tensor:
    """The mask, one position at a time: what vmap and broadcasting must both give."""
    out = torch.zeros(batch, 1, len(q), len(kv), dtype=torch.bool)
    for b, i, j in itertools.product(range(batch), range(len(q)), range(len(kv))):
        out[b, 0, i, j] = bool(mask_function(torch.tensor(b), torch.tensor(0), q[i], kv[j]))
    return out


def test_broadcast_masks_equal_transformers_mask_functions() -> None:
    """Causal, sliding-window, chunked (with left padding) and padding patterns, with a cache
    offset so query and key positions differ."""
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    left = torch.tensor([2, 0])
    functions = {
        "causal": masking_utils.causal_mask_function,
        "sliding": masking_utils.sliding_window_causal_mask_function(3),
        "chunked": masking_utils.and_masks(masking_utils.chunked_overlay(2, left),
                                           masking_utils.causal_mask_function),
        "padded": masking_utils.and_masks(masking_utils.causal_mask_function,
                                          masking_utils.padding_mask_function(padding)),
    }
    q, kv = torch.arange(4, 7), torch.arange(7)
    for name, function in functions.items():
        got = traced_compat.broadcast_for_bhqkv(function)(torch.arange(2), torch.arange(1), q, kv)
        assert got.shape == (2, 1, 3, 7), name
        assert torch.equal(got, _loop_mask(function, 2, q, kv)), name
    flat = traced_compat.broadcast_for_bhqkv(masking_utils.causal_mask_function,
                                             bh_indices=False)(None, None, q, kv)
    assert torch.equal(flat, _loop_mask(masking_utils.causal_mask_function, 1, q, kv)[0, 0])


@ONLY_4
def test_broadcast_masks_swaps_vmap_and_restores_it_on_error() -> None:
    vmapped = masking_utils._vmap_for_bhqkv  # type: ignore[attr-defined]
    indexing = masking_utils.TransformGetItemToIndex  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="inside"), traced_compat.broadcast_masks():
        assert masking_utils._vmap_for_bhqkv is traced_compat.broadcast_for_bhqkv  # type: ignore[attr-defined]
        raise RuntimeError("inside")
    assert masking_utils._vmap_for_bhqkv is vmapped  # type: ignore[attr-defined]
    assert masking_utils.TransformGetItemToIndex is indexing  # type: ignore[attr-defined]


def _tiny_moe(model_type: str) -> torch.nn.Module:
    if model_type in tiny_decoders.CONFIGS:
        model_class, make_config = tiny_decoders.CONFIGS[model_type]
        return tiny_decoders.random_model(model_class, make_config(64), seed=0).eval()
    class_name, config_name, kwargs = tiny_families.DECODERS[model_type]
    config = getattr(transformers, config_name)(vocab_size=64, **kwargs)
    return tiny_decoders.random_model(getattr(transformers, class_name), config, seed=0).eval()


@ONLY_4
@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_every_expert_computes_what_the_expert_loop_computes(model_type: str) -> None:
    """Same output for a routing that leaves experts without tokens (one token), and the
    block's own forward back afterwards, also when the block raises."""
    model = _tiny_moe(model_type)
    blocks = [m for m in model.modules()
              if type(m).__name__ in traced_compat.SOFTMAX_TOP_K_BLOCKS.values()]
    assert len(blocks) == 2
    seeded = torch.Generator().manual_seed(0)
    for tokens in (1, 9):
        hidden = torch.randn(1, tokens, 64, generator=seeded)
        with torch.no_grad():
            want, want_logits = blocks[0](hidden)
            with traced_compat.every_expert(model):
                got, got_logits = blocks[0](hidden)
        # every expert summed in a different order: float32 rounding, never a wrong expert
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_logits, want_logits)
    with pytest.raises(RuntimeError), traced_compat.every_expert(model):
        blocks[1](torch.randn(1, 2, 7))  # wrong width: the dense forward raises
    assert all("forward" not in vars(block) for block in blocks)


def test_moe_export_validates_for_routings_the_example_never_took(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """Eight experts, one per token: the trace's six example tokens cannot reach them all, so a
    graph that kept only the example's experts fails validation (shown under 4.x by tracing
    without the shim); with every expert traced it validates."""
    kwargs = {**tiny_families.DECODERS["qwen2_moe"][2], "num_experts": 8,
              "num_experts_per_tok": 1}
    monkeypatch.setitem(tiny_families.DECODERS, "qwen2_moe",
                        ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", kwargs))
    source = tiny_families.build_decoder("qwen2_moe", tmp_path / "source")
    package = export(source, tmp_path / "package", ExportOptions(generation_tokens=4))
    assert package.manifest["builder"] == "traced"
    assert package.manifest["validation"]["passed"], package.manifest["validation"]
    if TRANSFORMERS_4:
        from contextlib import nullcontext

        monkeypatch.setattr(traced_compat, "every_expert", lambda model: nullcontext())
        with pytest.raises(llmopt.ValidationError) as info:
            export(source, tmp_path / "frozen", ExportOptions(generation_tokens=4))
        report = info.value.report
        assert not report["passed"]
        # the frozen graph raises on shapes the example lacked: recorded, not a traceback
        failed = [case for case in report["cases"] if "error" in case]
        assert failed and "failed to run" in str(info.value)
        manifest = json.loads((tmp_path / "frozen" / "llmopt.json").read_text())
        assert not schema_errors(manifest)


def test_moe_family_the_shim_cannot_cover_is_refused_from_the_config(tmp_path: Path) -> None:
    """Under 4.x a mixture-of-experts router other than softmax/top-k is refused before any
    weight is read (the weights file is garbage), naming transformers 5 as the fix."""
    source = _unreadable_weights(tmp_path / "granitemoe", {
        "model_type": "granitemoe", "vocab_size": 64, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "intermediate_size": 32})
    if not TRANSFORMERS_4:
        config = transformers.AutoConfig.from_pretrained(source)
        traced_compat.check_experts(config)  # traced with batched_mm: nothing to refuse
        return
    with pytest.raises(llmopt.UnsupportedError, match="mixture-of-experts") as info:
        export(source, tmp_path / "package")
    assert "transformers>=5" in str(info.value.fix)
    assert not (tmp_path / "package").exists()
