"""What the traced builder changes in transformers 4.x while it traces, so one TorchScript trace
computes what the eager model computes for any input, as it does under transformers 5.

Two things in 4.57's modelling code do not survive a trace:

- attention masks: ``masking_utils`` turns its per-position mask functions into a 4-D mask with
  ``torch.vmap``, which the TorchScript tracer cannot follow. :func:`broadcast_masks` builds the
  same mask by broadcasting index tensors ``[B,1,1,1]``, ``[1,H,1,1]``, ``[1,1,Q,1]``,
  ``[1,1,1,KV]`` through the same functions (transformers 5 does the same).
- mixture-of-experts blocks: they loop over the experts the example tokens picked and gather
  those tokens (``.nonzero()``, ``torch.where``), so a trace keeps the example's experts and
  drops the rest. :func:`every_expert` runs every expert on every token with a routing weight of
  zero where the router did not choose it: the same sum for any routing, at the price of
  computing all experts (transformers 5's ``batched_mm`` gathers the chosen ones instead).

Each is a context manager that restores what it changed, also on error, and changes nothing
under a transformers that needs no change. Mixture-of-experts families with other routers are
refused from the config under 4.x (:func:`check_experts`), before any weight is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from types import MethodType
from typing import Any

from llmopt.errors import UnsupportedError

# transformers 4.x mixture-of-experts blocks whose router is softmax -> top-k -> (optionally)
# renormalized weights, over a ModuleList of experts, with an optional sigmoid-gated shared
# expert: model type -> block class
SOFTMAX_TOP_K_BLOCKS = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
    "flex_olmo": "FlexOlmoSparseMoeBlock",
}
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@contextmanager
def tracing_compat(model: Any) -> Iterator[None]:
    """Every shim this transformers needs while ``model`` is traced."""
    with ExitStack() as stack:
        stack.enter_context(broadcast_masks())
        stack.enter_context(every_expert(model))
        yield


def loops_over_experts(config: Any) -> bool:
    """Whether this transformers routes ``config``'s experts with a Python loop (4.x); 5.x
    configs carry ``_experts_implementation`` and trace with ``batched_mm``."""
    has_experts = any(getattr(config, name, None) for name in EXPERT_COUNTS)
    return has_experts and not hasattr(config, "_experts_implementation")


def check_experts(config: Any) -> None:
    """Refuse, from the config, a 4.x mixture-of-experts family :func:`every_expert` cannot
    make traceable."""
    model_type = str(config.model_type)
    if loops_over_experts(config) and model_type not in SOFTMAX_TOP_K_BLOCKS:
        import transformers

        raise UnsupportedError(
            f"{model_type} is a mixture-of-experts model whose experts transformers "
            f"{transformers.__version__} runs in a loop over the tokens each one received, which "
            "a trace would freeze to the example's routing",
            fix="pip install 'transformers>=5' (its experts trace for any routing); under 4.x "
            f"the traced builder handles {', '.join(sorted(SOFTMAX_TOP_K_BLOCKS))}",
        )


# ---------------------------------------------------------------------------------------------
# attention masks


def broadcast_for_bhqkv(mask_function: Callable[..., Any],
                        bh_indices: bool = True) -> Callable[..., Any]:
    """A stand-in for transformers 4.x's ``masking_utils._vmap_for_bhqkv``: the mask function
    applied once to broadcast index tensors, giving ``[B,H,Q,KV]`` (``[Q,KV]`` without batch and
    head indices), the shape and values vmap gives."""

    def mask(batch: Any, head: Any, q: Any, kv: Any) -> Any:
        if not bh_indices:
            return mask_function(None, None, q[:, None], kv[None, :]).expand(len(q), len(kv))
        out = mask_function(batch[:, None, None, None], head[None, :, None, None],
                            q[None, None, :, None], kv[None, None, None, :])
        return out.expand(batch.shape[0], head.shape[0], q.shape[0], kv.shape[0])

    return mask


@contextmanager
def broadcast_masks() -> Iterator[None]:
    """transformers 4.x builds its 4-D masks by broadcasting inside the block, not by vmap, and
    indexes tensors with Python's ``[]`` (its ``TransformGetItemToIndex`` mode, there for vmap,
    routes indexing through an autograd function the tracer cannot record)."""
    from transformers import masking_utils

    if not hasattr(masking_utils, "_vmap_for_bhqkv"):  # transformers 5 broadcasts already
        yield
        return
    shims = {"_vmap_for_bhqkv": broadcast_for_bhqkv, "TransformGetItemToIndex": nullcontext}
    before = {name: getattr(masking_utils, name, None) for name in shims}
    for name, shim in shims.items():
        setattr(masking_utils, name, shim)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                delattr(masking_utils, name)
            else:
                setattr(masking_utils, name, value)


# ---------------------------------------------------------------------------------------------
# mixture of experts


def dense_softmax_top_k(block: Any, hidden_states: Any) -> tuple[Any, Any]:
    """A softmax/top-k mixture-of-experts block's forward with every expert run on every token,
    weighted by its routing weight where chosen and by zero elsewhere.

        hidden [T,H] -> gate -> softmax -> top-k (-> / sum) -> scatter -> weights [T,E]
        hidden [T,H] -> expert e -> [T,H] * weights[:, e]  --- summed over e ---> [T,H]
                                                  (+ sigmoid(shared gate) * shared expert)
    """
    import torch
    import torch.nn.functional as F

    batch, sequence, width = hidden_states.shape
    tokens = hidden_states.reshape(-1, width)
    router_logits = block.gate(tokens)
    probabilities = F.softmax(router_logits, dim=1, dtype=torch.float)
    top, chosen = torch.topk(probabilities, block.top_k, dim=-1)
    if getattr(block, "norm_topk_prob", True):  # Mixtral always renormalizes
        top = top / top.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probabilities).scatter(1, chosen, top).to(tokens.dtype)
    out = torch.zeros_like(tokens)
    for index, expert in enumerate(block.experts):
        out = out + expert(tokens) * weights[:, index:index + 1]
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        out = out + F.sigmoid(block.shared_expert_gate(tokens)) * shared(tokens)
    return out.reshape(batch, sequence, width), router_logits


@contextmanager
def every_expert(model: Any) -> Iterator[None]:
    """``model``'s 4.x softmax/top-k mixture-of-experts blocks run every expert on every token
    inside the block (:func:`dense_softmax_top_k`), and their own forward after it."""
    import torch

    names = set(SOFTMAX_TOP_K_BLOCKS.values())
    blocks = [m for m in model.modules()
              if type(m).__name__ in names and isinstance(m.experts, torch.nn.ModuleList)]
    for block in blocks:  # an instance attribute shadows the class's forward
        block.forward = MethodType(dense_softmax_top_k, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
