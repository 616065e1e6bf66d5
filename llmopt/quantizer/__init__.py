"""Quantize: int8 dynamic, int8 static (QDQ, calibrated), int8 per token (encoders) and int4
weight-only (MatMulNBits), each measured for what it costs (perplexity, agreement, cosine) and
recorded in the manifest."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmopt.errors import InvalidInputError, UnsupportedError
from llmopt.package import Package, save_model
from llmopt.quantizer.options import QuantizeOptions

__all__ = ["QuantizeOptions", "default_options", "quantize"]

log = logging.getLogger("llmopt.quantize")


def quantize(package: str | os.PathLike[str] | Package, out_dir: str | os.PathLike[str],
             options: QuantizeOptions | None = None) -> Package:
    """Write a quantized copy of ``package`` to ``out_dir`` and measure its fidelity.
    Without ``options``: :meth:`QuantizeOptions.int8` (:func:`default_options`)."""
    import onnx

    parent = package if isinstance(package, Package) else Package.open(package)
    options = options or default_options(parent)
    if parent.manifest.quantization is not None:
        raise UnsupportedError(
            f"{parent.path} is already quantized ({parent.manifest.quantization})",
            fix="quantize the float package it came from",
        )
    if parent.manifest.dtype == "float16":
        raise UnsupportedError("quantizing a float16 package is not supported",
                               fix="quantize the float32 package (optimize level 2, not 3)")
    if options.method == "int4" and _gguf_blocks_usable(parent, options):
        from llmopt.quantizer.gguf import quantize_from_gguf

        return quantize_from_gguf(parent, out_dir, options.accuracy_level, options.evaluate,
                                  options.lm_head_bits)
    started = time.perf_counter()
    proto = onnx.load(str(parent.model_path))
    keep = options.keep_float
    if options.method in ("int4", "int8") and options.lm_head_bits is None:
        keep = (*keep, "lm_head")
    targets, kept = weight_matmuls(proto, keep)
    if not targets:
        raise UnsupportedError("no weight MatMul left to quantize",
                               fix="keep fewer weights in float (keep_float)")
    if options.method in ("int4", "int8"):
        _check_blocks(proto, targets, options.block_size)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        save_model(proto, src, external_data=True)
        del proto
        quantized, details = _run(options, src, Path(tmp) / "quantized.onnx", targets, kept,
                                  parent)
    result = Package.derive(parent, out_dir, "quantize", quantized, method=options.method,
                            options=asdict(options), **details, quantized_matmuls=len(targets),
                            kept_float=kept)
    del quantized
    result.manifest.update_step(size_bytes={"before": parent.size_bytes(),
                                            "after": result.size_bytes()})
    if options.evaluate:
        from llmopt.evaluate import evaluate

        log.info("measuring fidelity against %s", parent.path)
        result.manifest.fidelity = evaluate(result, parent)
    result.update_step(seconds=round(time.perf_counter() - started, 2))
    return result


def default_options(package: Package) -> QuantizeOptions:
    """The int8 preset: weight-only int8 in blocks of 32 (int8 compute) for decoders and
    encoders alike. A decoder step is bandwidth-bound (fewer bytes per token); an encoder is
    compute-bound, and on llmopt's CPU kernels (:mod:`llmopt.runtime.kernels`) the same
    package's integer products with int8 activations per block of 32 make it both the most
    faithful int8 and the fastest (all-MiniLM-L6-v2, Zen 4: cosine min 0.9995, 2x fp32's
    sentences/s at batch 32; bench/results/vs_optimum_encoder). On a CPU without AVX-512 VNNI
    (the kernels' AVX2 build, or ONNX Runtime's), :meth:`QuantizeOptions.int8_encoder` is the
    faster encoder int8 (Zen 3, batch 32: int8() 0.76x fused fp32's sentences/s,
    int8_encoder 1.08x; bench/results/vs_optimum_encoder_zen3)."""
    return QuantizeOptions.int8()


# mixture-of-experts routers: a few columns whose rounding flips which experts run
ROUTERS = (".gate.weight", ".router.weight", "shared_expert_gate.weight")


def weight_matmuls(proto: Any, keep_float: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Names of MatMul nodes whose second input is a weight, split into (quantize, keep).
    Routers stay float whatever ``keep_float`` says."""
    weights = {t.name: t for t in proto.graph.initializer}
    targets: list[str] = []
    kept: list[str] = []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        name = node.input[1]
        router = name.endswith(ROUTERS) and len(weights[name].dims) == 2 \
            and weights[name].dims[1] < 256
        keep = router or any(k in name for k in keep_float)
        (kept if keep else targets).append(node.name)
    return targets, kept


def _check_blocks(proto: Any, targets: list[str], block: int) -> None:
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.name in targets:
            k = shapes[node.input[1]][0]
            if k % block:
                raise InvalidInputError(
                    f"int4 block size {block} does not divide the input size {k} of "
                    f"{node.input[1]}",
                    fix=f"use a block size that divides {k}, e.g. "
                    f"{max(b for b in (16, 32, 64, 128) if k % b == 0)}",
                )


def _run(options: QuantizeOptions, src: Path, dst: Path, targets: list[str], kept: list[str],
         parent: Package) -> tuple[Any, dict[str, Any]]:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if options.method == "int8_dynamic":
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"],
                         per_channel=options.per_channel, weight_type=QuantType.QInt8,
                         nodes_to_quantize=targets, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True,
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(str(dst)), {}
    if options.method == "int8_static":
        from onnxruntime.quantization import CalibrationMethod

        from llmopt.quantizer.calibration import reader_for

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[options.calibration]
        quantize_static(src, dst, reader_for(parent, options), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=options.per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=targets, use_external_data_format=True,
                        calibrate_method=method,
                        extra_options={"MatMulConstBOnly": True,
                                       "DefaultTensorType": onnx.TensorProto.FLOAT,
                                       "CalibPercentile": options.percentile,
                                       "CalibTensorRangeSymmetric": False})
        return onnx.load(str(dst)), {}
    if options.method == "int8_per_token":
        return _per_token(options, src, targets, parent)
    return _nbits(options, src, targets, kept, parent)


def _per_token(options: QuantizeOptions, src: Path, targets: list[str],
               parent: Package) -> tuple[Any, dict[str, Any]]:
    """Per-token int8 activations x per-channel int8 weights, SmoothQuant-scaled when
    ``options.smooth_alpha`` is set (activation ranges from the calibration sentences)."""
    import onnx
    from onnx import numpy_helper

    from llmopt.quantizer import blockwise, per_token

    if parent.is_decoder:
        raise UnsupportedError("int8 per token is built for encoders",
                               fix="use int8 (weight-only) or int4 for a decoder")
    model = onnx.load(str(src))
    names = set(targets)
    matmuls = [n for n in model.graph.node if n.name in names]
    amax: dict[str, Any] = {}
    if options.smooth_alpha is not None:
        from llmopt.quantizer.calibration import activation_amax

        amax = activation_amax(parent, model, [n.input[0] for n in matmuls], options)
    inits = {t.name: t for t in model.graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes: list[Any] = []
    added: list[Any] = []
    for node in model.graph.node:
        if node.name not in names:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        smooth = None if options.smooth_alpha is None else \
            per_token.smoothing(amax[node.input[0]], weight, options.smooth_alpha)
        replace = per_token.replace_matmul_split if options.split_activations else \
            per_token.replace_matmul
        more, new = replace(node, weight, smooth, opset)
        nodes += more
        added += new
    blockwise.set_nodes(model, nodes, added)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model, {"smooth_alpha": options.smooth_alpha,
                   "split_activations": options.split_activations}


def _gguf_blocks_usable(parent: Package, options: QuantizeOptions) -> bool:
    """Whether int4 reuses the GGUF source's blocks: when asked (``algorithm="gguf"``), or for
    ``auto`` when the package was exported from a GGUF file that is still on disk and the
    weights were not changed since (a fused package keeps them; the block check is exact)."""
    if parent.builder != "native":
        if options.algorithm == "gguf":
            raise UnsupportedError(
                "reusing GGUF blocks needs a package made by a native builder",
                fix="use algorithm auto/hqq/rtn, or export with --builder native")
        return False
    if options.algorithm == "gguf":
        return True
    if options.algorithm != "auto" or options.block_size != 32 or options.symmetric:
        return False
    source = parent.manifest.source
    path = Path(source["reference"])
    if source["kind"] != "gguf" or not path.is_file():
        return False
    from llmopt.quantizer.gguf import reusable

    return reusable(path)


def _nbits(options: QuantizeOptions, src: Path, targets: list[str], kept: list[str],
           parent: Package) -> tuple[Any, dict[str, Any]]:
    """Weight-only MatMulNBits: the layers by ``options.algorithm``, the LM head in
    ``options.lm_head_bits`` (symmetric, clipping search), embeddings by ONNX Runtime's RTN."""
    import onnx

    from llmopt.quantizer import blockwise

    model = onnx.load(str(src))
    bits = 8 if options.method == "int8" else 4
    algorithm = options.algorithm
    if algorithm == "auto":  # 8 bits: the clipping search gains ~10% MSE for 5x the time
        algorithm = "hqq" if bits == 4 else "rtn"
    if bits == 8 and algorithm not in ("rtn", "mse"):
        algorithm = "rtn"
    names = set(targets)
    weights = {t.name for t in model.graph.initializer}
    heads = {n.name for n in model.graph.node
             if n.name in names and blockwise.is_lm_head(n, weights)}
    body = names - heads
    details: dict[str, Any] = {"algorithm_used": algorithm, "bits": bits,
                               "lm_head_bits": options.lm_head_bits if heads else None}
    if algorithm in ("rtn", "mse"):
        _blockwise(model, body, bits, options.block_size, options.symmetric or bits == 8,
                   algorithm, options.accuracy_level)
    else:
        _onnxruntime_nbits(model, options, algorithm, exclude=[*kept, *heads], parent=parent)
        details["zero_point_corrections"] = blockwise.correct_float_zero_points(model)
    if heads and options.lm_head_bits:
        _blockwise(model, heads, options.lm_head_bits, options.block_size, True, "mse",
                   options.accuracy_level)
    if options.quantize_embeddings:
        _onnxruntime_embeddings(model, options)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model, details


def _blockwise(model: Any, names: set[str], bits: int, block: int, symmetric: bool,
               method: str, accuracy_level: int) -> None:
    """Replace the named weight MatMuls with llmopt's own MatMulNBits (integer zero points)."""
    from onnx import numpy_helper

    from llmopt.quantizer import blockwise

    inits = {t.name: t for t in model.graph.initializer}
    nodes: list[Any] = []
    added: list[Any] = []
    for node in model.graph.node:
        if node.name not in names:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        blocks = blockwise.quantize(weight, bits=bits, block=block, symmetric=symmetric,
                                    method=method)
        more, new = blockwise.replace_matmul(node, blocks, accuracy_level)
        nodes += more
        added += new
    blockwise.set_nodes(model, nodes, added)


def _onnxruntime_nbits(model: Any, options: QuantizeOptions, algorithm: str,
                       exclude: list[str], parent: Package) -> None:
    """HQQ or GPTQ through ONNX Runtime's MatMulNBits quantizer, in place."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    algo: Any
    if algorithm == "hqq":
        algo = nbits.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4,
                                              op_types_to_quantize=("MatMul",))
    else:
        from llmopt.quantizer.calibration import reader_for

        algo = nbits.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=reader_for(parent, options),
            block_size=options.block_size, op_types_to_quantize=("MatMul",))
    quantizer = nbits.MatMulNBitsQuantizer(
        model, bits=4, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",), algo_config=algo)
    quantizer.process()
    result = quantizer.model.model
    for node in result.graph.node:  # their configs take no accuracy level: set it here
        if node.op_type == "MatMulNBits":
            for attr in list(node.attribute):
                if attr.name == "accuracy_level":
                    node.attribute.remove(attr)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level",
                                                             options.accuracy_level))
    if result is not model:
        model.CopyFrom(result)


def _onnxruntime_embeddings(model: Any, options: QuantizeOptions) -> None:
    """Token embeddings (Gather) to GatherBlockQuantized, round to nearest, in place."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    algo = nbits.DefaultWeightOnlyQuantConfig(
        block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, op_types_to_quantize=("Gather",), bits=4)
    quantizer = nbits.MatMulNBitsQuantizer(
        model, bits=4, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, op_types_to_quantize=("Gather",),
        algo_config=algo)
    quantizer.process()
    if quantizer.model.model is not model:
        model.CopyFrom(quantizer.model.model)
