"""Run model packages on ONNX Runtime: ``load`` returns a Generator or an Embedder."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from llmopt.errors import PackageError
from llmopt.package import Package
from llmopt.runtime import kernels
from llmopt.runtime.constraints import ResponseFormat
from llmopt.runtime.embedder import Embedder
from llmopt.runtime.generator import Generator, TextStream
from llmopt.runtime.memory import decoder_provider_options, trim_heap
from llmopt.runtime.prompt_graph import PromptGraph, float_kernel_pays, prompt_model
from llmopt.runtime.providers import CPUOptions, CUDAOptions, ShapeRange, TensorRTOptions
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.sequence import GenerationResult, GenerationStats
from llmopt.runtime.session import (
    GPU_PROVIDERS,
    ProviderSpec,
    SessionInfo,
    create_session,
    resolve_providers,
)

__all__ = [
    "CPUOptions",
    "CUDAOptions",
    "Embedder",
    "GenerationResult",
    "GenerationStats",
    "Generator",
    "ResponseFormat",
    "SamplingParams",
    "SessionInfo",
    "ShapeRange",
    "TensorRTOptions",
    "TextStream",
    "load",
]

log = logging.getLogger("llmopt.runtime")


def load(package: str | os.PathLike[str] | Package,
         providers: Sequence[ProviderSpec] | None = None, *,
         provider_options: Mapping[str, Any] | None = None,
         strict: bool = False) -> Generator | Embedder:
    """Open a package on the first of ``providers`` that loads (default ``["cpu"]``).

    ``strict=True`` raises :class:`~llmopt.errors.ProviderError` instead of falling back to a
    later provider; ``runner.session_info`` says which provider holds the session and why.
    Decoders run on CPU without ONNX Runtime's memory arena unless CPU options are given
    (:mod:`llmopt.runtime.memory`).
    """
    pkg = package if isinstance(package, Package) else Package.open(package)
    check_weights_file(pkg)
    prompt_options = prompt_graph = None
    if pkg.is_decoder:
        provider_options = decoder_provider_options(provider_options)
    kernel_graph = kernels.kernel_graph(pkg, cpu_options(providers, provider_options))
    if pkg.is_decoder:  # after the rewrite: whether to weigh a prompt session depends on it
        prompt_options = prompt_session_options(providers, provider_options)
        if kernel_graph is not None and prompt_options is not None \
                and prompt_options.float_prompts is None:
            # MatMulQ runs prompts faster than either of ONNX Runtime's 4-bit kernels (SmolLM2
            # int4, Zen 4: TTFT 67 ms, against 173 and 172 ms): no second session to weigh
            prompt_options = None
        prompt_graph = float_prompt_graph(pkg, prompt_options)
    shared = prompt_graph.values() if prompt_graph is not None else {}
    fingerprint = f"{pkg.manifest.source['sha256']}:{pkg.manifest.steps}"
    blobs = kernel_graph.values() if kernel_graph else {}
    session, info = create_session(pkg.model_path, providers, provider_options, strict,
                                   signature=pkg.manifest.signature,
                                   model_fingerprint=fingerprint,
                                   context_length=pkg.manifest.context_length,
                                   model_bytes=kernel_graph.model if kernel_graph else None,
                                   initializers={**shared, **blobs},
                                   custom_ops=kernels.library() if kernel_graph else None)
    info.kernels = kernel_graph.kernels if kernel_graph else 0
    del kernel_graph  # its serialized graph is read; ``blobs`` hold the kernels' weights
    if info.active and info.active[0] in GPU_PROVIDERS:
        warn_cpu_bound_quantization(pkg, info.active[0])
    tokenizer = load_tokenizer(pkg.path)
    if not pkg.is_decoder:
        return Embedder(pkg, session, info, tokenizer, initializers=blobs)
    prompts = None
    if prompt_graph is not None and info.active and info.active[0] == "cpu":
        prompts, _ = create_session(pkg.model_path, [("cpu", prompt_options)],
                                    model_bytes=prompt_graph.model, initializers=shared)
    del prompt_graph  # its serialized graph is read; ``shared`` holds the mapped tables
    trim_heap()
    return Generator(pkg, session, info, tokenizer, prompt_session=prompts,
                     initializers={**shared, **blobs})


def check_weights_file(package: Package) -> None:
    """ONNX Runtime (and onnx) refuse a weights file behind a symbolic link or with several
    hard links (a model repository assembled by linking package files): say so up front."""
    name = package.manifest.onnx.get("external_data")
    path = package.path / name if name else None
    if path is None or not (path.is_symlink() or (path.is_file() and path.stat().st_nlink > 1)):
        return
    raise PackageError(f"{path} is a link: ONNX Runtime refuses weights files behind symbolic "
                       "links or with several hard links",
                       fix="copy the package's files instead of linking them (a symbolic link "
                       "to the package folder itself is fine)")


def cpu_options(providers: Sequence[ProviderSpec] | None,
                provider_options: Mapping[str, Any] | None) -> CPUOptions | None:
    """The CPU options of a session whose first provider is the CPU, else None."""
    name, options = resolve_providers(providers, provider_options)[0]
    return options if name == "cpu" and isinstance(options, CPUOptions) else None


def prompt_session_options(providers: Sequence[ProviderSpec] | None,
                           provider_options: Mapping[str, Any] | None) -> CPUOptions | None:
    """The CPU options of the session that runs a decoder's prompts beside its decode session
    (:mod:`llmopt.runtime.prompt_graph`): the decode session's, without spinning (its threads
    busy-waiting after a prompt would take the decode session's cores for the first steps; a
    prompt step is long enough not to need it). None where a GPU comes first or
    ``CPUOptions(float_prompts=False)``."""
    options = cpu_options(providers, provider_options)
    if options is None or options.float_prompts is False:
        return None
    return replace(options, spin=False)


def float_prompt_graph(package: Package, options: CPUOptions | None) -> PromptGraph | None:
    """The graph of the session that runs an int4 package's prompts on CPU (its 4-bit MatMuls
    in float32), or None: no ``options`` (:func:`prompt_session_options`), another package,
    or ``float_prompts=None`` on a machine where that kernel is not the faster one
    (:func:`~llmopt.runtime.prompt_graph.float_kernel_pays`)."""
    if options is None or not package.manifest.onnx.get("external_data"):
        return None  # weights inside model.onnx: not read twice (see prompt_model)
    graph = prompt_model(package.model_path)
    if graph is None or options.float_prompts or float_kernel_pays(options.intra_op_threads):
        return graph
    return None


def warn_cpu_bound_quantization(package: Package, provider: str) -> None:
    """int8 dynamic quantization's DynamicQuantizeLinear/MatMulInteger have no CUDA kernels, so
    on a GPU those layers run on CPU with their activations copied across every step."""
    if package.manifest.quantization == "int8_dynamic":
        log.warning("%s is an int8 dynamic package: on %s its quantized MatMuls run on CPU "
                    "(ONNX Runtime has no CUDA DynamicQuantizeLinear). For a GPU, quantize "
                    "weight-only (llmopt quantize --method int4, QuantizeOptions.int4()) or "
                    "optimize to float16 (llmopt optimize --target cuda)", package.path, provider)


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The package's tokenizer as it was at export (None if it has none).

    A tokenizer saved as the generic fast class is loaded as that class: AutoTokenizer would
    otherwise pick the model type's own class, which may rebuild the pipeline differently.
    """
    import json
    from pathlib import Path

    import transformers

    config_file = Path(path) / "tokenizer_config.json"
    if not config_file.is_file() and not (Path(path) / "tokenizer.json").is_file():
        return None
    try:
        saved = json.loads(config_file.read_text()).get("tokenizer_class") \
            if config_file.is_file() else None
        if saved in GENERIC_TOKENIZERS:
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):  # unreadable: the package takes token ids only
        return None
