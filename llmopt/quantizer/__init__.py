"""Quantize: int8 dynamic, int8 static (QDQ, calibrated) and int4 weight-only (MatMulNBits),
each measured for what it costs (perplexity, agreement, cosine) and recorded in the manifest."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmopt.errors import InvalidInputError, UnsupportedError
from llmopt.package import Package, graph_signature, now_iso, write_derived
from llmopt.quantizer.options import QuantizeOptions

__all__ = ["QuantizeOptions", "quantize"]

log = logging.getLogger("llmopt.quantize")


def quantize(package: str | os.PathLike[str] | Package, out_dir: str | os.PathLike[str],
             options: QuantizeOptions | None = None) -> Package:
    """Write a quantized copy of ``package`` to ``out_dir`` and measure its fidelity."""
    import onnx

    options = options or QuantizeOptions.int8()
    parent = package if isinstance(package, Package) else Package.open(package)
    done = [s for s in parent.manifest.get("steps", []) if s.get("stage") == "quantize"]
    if done:
        raise UnsupportedError(
            f"{parent.path} is already quantized ({done[-1].get('method')})",
            fix="quantize the float package it came from",
        )
    if parent.manifest["onnx"].get("dtype") == "float16":
        raise UnsupportedError("quantizing a float16 package is not supported",
                               fix="quantize the float32 package (optimize level 2, not 3)")
    if options.method == "int4" and _gguf_blocks_usable(parent, options):
        from llmopt.quantizer.gguf import quantize_from_gguf

        return quantize_from_gguf(parent, out_dir, options.accuracy_level, options.evaluate)
    started = time.perf_counter()
    proto = onnx.load(str(parent.model_path))
    targets, kept = weight_matmuls(proto, options.keep_float)
    if not targets:
        raise UnsupportedError("no weight MatMul left to quantize",
                               fix="keep fewer weights in float (keep_float)")
    if options.method in ("int4", "int8"):
        _check_blocks(proto, targets, options.block_size)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(src), save_as_external_data=True, location="model.onnx.data")
        del proto
        quantized = _run(options, src, Path(tmp) / "quantized.onnx", targets, kept, parent)
    manifest = dict(parent.manifest)
    manifest["signature"] = graph_signature(quantized)
    manifest["steps"] = [*parent.manifest.get("steps", []), {
        "stage": "quantize", "time": now_iso(), "method": options.method,
        "options": asdict(options),
        "parent": str(parent.path), "quantized_matmuls": len(targets), "kept_float": kept,
    }]
    manifest["validation"] = None
    manifest["fidelity"] = None
    result = write_derived(parent, out_dir, quantized, manifest)
    del quantized
    step = result.manifest["steps"][-1]
    step["size_bytes"] = {"before": parent.size_bytes(), "after": result.size_bytes()}
    if options.evaluate:
        from llmopt.evaluate import evaluate

        log.info("measuring fidelity against %s", parent.path)
        result.manifest["fidelity"] = evaluate(result, parent)
    step["seconds"] = round(time.perf_counter() - started, 2)
    result.write_manifest()
    return result


def weight_matmuls(proto: Any, keep_float: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Names of MatMul nodes whose second input is a weight, split into (quantize, keep)."""
    weights = {t.name for t in proto.graph.initializer}
    targets: list[str] = []
    kept: list[str] = []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        (kept if any(k in node.input[1] for k in keep_float) else targets).append(node.name)
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
         parent: Package) -> Any:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if options.method == "int8_dynamic":
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"],
                         per_channel=options.per_channel, weight_type=QuantType.QInt8,
                         nodes_to_quantize=targets, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True,
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(str(dst))
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
        return onnx.load(str(dst))
    return _nbits(options, src, kept, parent)


def _gguf_blocks_usable(parent: Package, options: QuantizeOptions) -> bool:
    """Whether int4 reuses the GGUF source's blocks: only when asked (``algorithm="gguf"``).

    Exact, but Q4_1's float zero points take ONNX Runtime's slow MatMulNBits path on CPU
    (measured 3-5x slower than fp32), so ``auto`` uses HQQ, which lands on nearly the same
    grid (+0.07% perplexity on SmolLM2) with integer zero points and the fast kernel.
    """
    del parent
    return options.algorithm == "gguf"


def _nbits(options: QuantizeOptions, src: Path, kept: list[str], parent: Package) -> Any:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    ops: tuple[str, ...] = ("MatMul", "Gather") if options.quantize_embeddings else ("MatMul",)
    bits = 8 if options.method == "int8" else 4
    algorithm = "hqq" if options.algorithm == "auto" and bits == 4 else options.algorithm
    algo: Any
    if algorithm == "hqq" and bits == 4:
        algo = nbits.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4,
                                              op_types_to_quantize=ops)
    elif algorithm == "gptq" and bits == 4:
        from llmopt.quantizer.calibration import reader_for

        algo = nbits.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=reader_for(parent, options),
            block_size=options.block_size, op_types_to_quantize=ops)
    else:
        algo = nbits.DefaultWeightOnlyQuantConfig(
            block_size=options.block_size, is_symmetric=options.symmetric,
            accuracy_level=options.accuracy_level, op_types_to_quantize=ops, bits=bits)
    model = onnx.load(str(src))
    quantizer = nbits.MatMulNBitsQuantizer(
        model, bits=bits, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, nodes_to_exclude=kept,
        op_types_to_quantize=ops, algo_config=algo)
    quantizer.process()
    result = quantizer.model.model
    if algorithm in ("hqq", "gptq"):  # their configs take no accuracy level: set it here
        for node in result.graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = options.accuracy_level
                if not any(a.name == "accuracy_level" for a in node.attribute):
                    node.attribute.append(onnx.helper.make_attribute(
                        "accuracy_level", options.accuracy_level))
    return result
