"""Calibration data for static int8 and GPTQ: token windows from a text file or a built-in
corpus, fed as the package's own inputs (prefill, empty KV cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import InvalidInputError
from llmopt.package import Package
from llmopt.quantizer.options import QuantizeOptions


def calibration_text(options: QuantizeOptions) -> str:
    if options.calibration_file is None:
        from importlib import resources

        from llmopt.evaluate import EVAL_SENTENCES

        corpus = resources.files("llmopt.data").joinpath("calibration.txt").read_text("utf-8")
        return corpus + "\n" + "\n".join(EVAL_SENTENCES)
    path = Path(options.calibration_file)
    if not path.is_file():
        raise InvalidInputError(f"calibration file {path} does not exist",
                                fix="pass a UTF-8 text file, or omit it to use the built-in "
                                "corpus")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InvalidInputError(f"calibration file {path} is empty", fix="pass some text")
    return text


def reader_for(package: Package, options: QuantizeOptions) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    from llmopt.runtime import load_tokenizer
    from llmopt.runtime.kv import ALL_POSITIONS, position_ids

    tokenizer = load_tokenizer(package.path)
    if tokenizer is None:
        raise InvalidInputError("the package has no tokenizer to calibrate with",
                                fix="re-export it with its tokenizer")
    text = calibration_text(options)
    tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = options.calibration_length
    windows = [tokens[i:i + n] for i in range(0, max(len(tokens) - n, 1), n)]
    windows = [w for w in windows if len(w) >= 8][: options.calibration_samples]
    inputs = set(package.manifest.input_names)
    feeds: list[dict[str, np.ndarray]] = []
    kv = package.kv_cache
    for window in windows:
        ids = np.array([window], dtype=np.int64)
        mask = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": mask}
        if package.is_decoder:
            feed["position_ids"] = position_ids(mask)
            feed["logits_to_keep"] = ALL_POSITIONS
            empty = np.zeros((1, kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
            for i in range(int(kv["num_layers"])):
                feed[kv["past_key"].format(i=i)] = empty
                feed[kv["past_value"].format(i=i)] = empty
        elif "token_type_ids" in inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        feeds.append({k: v for k, v in feed.items() if k in inputs})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

        def rewind(self) -> None:
            self.items = iter(feeds)

    return Reader()


def calibration_sentences(options: QuantizeOptions, limit: int = 256) -> list[str]:
    """The calibration text cut into sentences (an encoder sees whole, [CLS]...[SEP]-framed
    inputs; windows cut from a token stream would miss the special tokens' outliers)."""
    import re

    text = calibration_text(options)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
    return sentences[:limit]


def activation_amax(package: Package, model: Any, tensors: list[str],
                    options: QuantizeOptions) -> dict[str, np.ndarray]:
    """Largest ``|value|`` per channel (last axis) of each named float tensor of ``model``
    (an in-memory ONNX encoder), over the calibration sentences' real (unpadded) tokens."""
    import onnx
    import onnxruntime as ort

    import llmopt
    from llmopt.runtime.embedder import Embedder

    tensors = list(dict.fromkeys(tensors))  # q, k and v may read one input
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    listed = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in listed:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), session_options,
                                   providers=["CPUExecutionProvider"])
    runner = llmopt.load(package, ["cpu"])
    assert isinstance(runner, Embedder), "activation_amax is for encoder packages"
    sentences = calibration_sentences(options)
    amax: dict[str, np.ndarray] = {}
    for start in range(0, len(sentences), 8):
        feed = runner.tokenize(sentences[start:start + 8])
        real = feed["attention_mask"].astype(bool) if "attention_mask" in feed \
            else np.ones(feed["input_ids"].shape, bool)
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            rows = value[real] if value.shape[:2] == real.shape else value
            seen = np.abs(rows.reshape(-1, value.shape[-1])).max(axis=0)
            amax[name] = np.maximum(amax[name], seen) if name in amax else seen
    return amax
