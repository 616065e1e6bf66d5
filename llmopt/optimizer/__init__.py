"""Optimize: a package in, a faster package out (graph fusion, fp16), validated against it.

Levels (presets), each a superset of the one before:

- 0: no change (a validated copy; useful as a baseline in benchmarks).
- 1: ONNX Runtime's basic offline optimizations (constant folding, redundant-node and shape
  cleanup), saved into the graph.
- 2: llmopt's fusions, re-emitting the graph from the package's own weights: residual+norm,
  norm, rotary + attention (with the KV cache and grouped-query heads), GELU.
- 3: level 2 in float16 (for GPUs; norms, softmax and logits stay float32).

``target="cuda"`` (``llmopt optimize --target cuda``, ``OptimizeOptions.for_cuda()``) is level 3
with ``GroupQueryAttention`` in float16 instead of opset-23 ``Attention``: ONNX Runtime's CUDA
provider implements GroupQueryAttention for float16/bfloat16 only (a float32 one runs every
layer on CPU), and GroupQueryAttention is what lets the Generator bind one KV buffer on the
device as both past and present, updated in place.

A package made by the traced builder has no weights under llmopt's names to re-emit from: its
level 2 is ONNX Runtime's extended graph fusions (layer norms, residual + norm, GELU, ...),
saved offline, and reported per fusion like the native ones.

``fusions`` picks individual fusions instead of all of the level's; a requested fusion that
does not apply to the model (rotary on GPT-2) is reported, not silently dropped. ``moe``
(ONNX Runtime's MoE op for mixture-of-experts MLPs) is opt-in: on CPU it measured slower than
the exported per-expert graph (bench/results/moe_cpu.md), so no level turns it on by itself.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from llmopt.errors import InvalidInputError, UnsupportedError
from llmopt.package import Package

__all__ = ["FUSIONS", "OptimizeOptions", "optimize"]

log = logging.getLogger("llmopt.optimize")
LEVELS = (0, 1, 2, 3)
TARGETS = ("cpu", "cuda")
FUSIONS = ("norm", "skip_norm", "attention", "activation", "moe")
OPT_IN = frozenset({"moe"})  # only where asked for by name (slower on CPU: see above)


@dataclass(frozen=True)
class OptimizeOptions:
    """How to optimize. ``fusions=None`` means every fusion the level includes."""

    level: int = 2
    fusions: tuple[str, ...] | None = None
    fp16: bool | None = None  # None: only at level 3
    validate: bool = True
    tolerance: float | None = None
    generation_tokens: int = 32
    target: str = "cpu"  # "cuda": float16 GroupQueryAttention (see the module docstring)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InvalidInputError(f"unknown optimize target {self.target!r}",
                                    fix=f"use one of {', '.join(TARGETS)}")
        if self.target == "cuda" and (self.level < 2 or self.fp16 is False or (
                self.fusions is not None and "attention" not in self.fusions)):
            raise InvalidInputError(
                "--target cuda emits float16 GroupQueryAttention: it needs level 2 or 3, the "
                "attention fusion and float16",
                fix="drop --level/--fusion/--no-fp16, or use --target cpu")
        if self.level not in LEVELS:
            raise InvalidInputError(
                f"optimize level {self.level!r} does not exist",
                fix=f"use one of {', '.join(map(str, LEVELS))} (see `llmopt optimize --help`)",
            )
        unknown = set(self.fusions or ()) - set(FUSIONS)
        if unknown:
            raise InvalidInputError(f"unknown fusion(s): {', '.join(sorted(unknown))}",
                                    fix=f"choose from: {', '.join(FUSIONS)}")

    @classmethod
    def O1(cls) -> OptimizeOptions:
        return cls(level=1)

    @classmethod
    def O2(cls) -> OptimizeOptions:
        return cls(level=2)

    @classmethod
    def O3(cls) -> OptimizeOptions:
        return cls(level=3)

    @classmethod
    def for_cuda(cls) -> OptimizeOptions:
        return cls(level=3, target="cuda")

    @property
    def float16(self) -> bool:
        if self.fp16 is None:
            return self.level == 3 or self.target == "cuda"
        return self.fp16

    @property
    def group_query_attention(self) -> bool | None:
        """The fused attention op: GroupQueryAttention on CUDA; None lets the dtype choose."""
        return True if self.target == "cuda" else None

    def selected_fusions(self) -> frozenset[str]:
        if self.fusions is not None:
            return frozenset(self.fusions)
        return frozenset(FUSIONS) - OPT_IN if self.level >= 2 else frozenset()


def optimize(package: str | os.PathLike[str] | Package, out_dir: str | os.PathLike[str],
             options: OptimizeOptions | None = None) -> Package:
    """Write an optimized copy of ``package`` to ``out_dir``, validated against ``package``."""
    from llmopt.optimizer.graphs import ort_basic, ort_fusions, reemit

    options = options or OptimizeOptions()
    parent = package if isinstance(package, Package) else Package.open(package)
    _refuse_quantized(parent)
    started = time.perf_counter()
    fusions = options.selected_fusions()
    dtype = "float16" if options.float16 else parent.manifest.dtype
    traced = parent.builder == "traced"
    if traced and dtype != parent.manifest.dtype:
        raise UnsupportedError(
            f"{parent.path} was made by the traced builder; float16 optimization needs a "
            "native one",
            fix="optimize at level 2 (float32), or export with --builder native where the "
            "architecture has one",
        )
    if traced and fusions:
        proto, report = ort_fusions(_load(parent), fusions)
    elif fusions or dtype != parent.manifest.dtype:
        proto, report = reemit(parent, fusions, dtype, options.group_query_attention)
    else:
        proto, report = _load(parent), {"fusions": {}}
    if options.level >= 1 and dtype == "float32":
        # on fp16 graphs the CPU provider would insert its own casts into the saved graph
        proto = ort_basic(proto)
    report["nodes_before"] = _node_count(parent)
    report["nodes_after"] = len(proto.graph.node)
    # GroupQueryAttention updates a cache buffer bound as both past and present in place
    shared = any(node.op_type == "GroupQueryAttention" for node in proto.graph.node)
    result = Package.derive(parent, out_dir, "optimize", proto, dtype=dtype,
                            kv_cache={"shared_buffer": shared}, options=asdict(options),
                            **report)
    del proto
    if options.validate:
        from llmopt.optimizer.check import check_against

        check_against(result, parent, dtype, options.tolerance, options.generation_tokens)
    result.update_step(seconds=round(time.perf_counter() - started, 2))
    log.info("optimized: %s nodes -> %s nodes", report["nodes_before"], report["nodes_after"])
    return result


def _refuse_quantized(package: Package) -> None:
    if package.manifest.quantization is not None:
        raise UnsupportedError(
            f"{package.path} is quantized; optimize before quantizing",
            fix="optimize the float package, then quantize the result",
        )


def _load(package: Package) -> Any:
    import onnx

    return onnx.load(str(package.model_path))


def _node_count(package: Package) -> int:
    import onnx

    return len(onnx.load(str(package.model_path), load_external_data=False).graph.node)
