"""ONNX Runtime GenAI model folders as bench packages (``runtime: genai`` in a config).

A folder made by ``onnxruntime_genai.models.builder`` (``bench/reference_genai.py`` builds
them) holds ``genai_config.json``, ``model.onnx`` and the tokenizer. The bench measures its
speed through GenAI itself, in GenAI's own environment (:mod:`llmopt.bench.targets.genai`),
and reads everything else here, in llmopt's: what the folder is (:func:`read_genai_config`), its
bytes per token (:func:`genai_traffic`) and its logits, through plain ONNX Runtime
(:class:`GenaiOnnxModel`), so its perplexity is computed by the same code as a package's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.bench.traffic import Traffic, model_traffic
from llmopt.errors import PackageError

CONFIG_FILE = "genai_config.json"


@dataclass(frozen=True)
class GenaiDecoder:
    """The decoder section of a genai_config.json: file, names and cache shape."""

    path: Path           # the model folder
    filename: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    num_layers: int
    num_kv_heads: int
    head_size: int
    context_length: int

    @property
    def model_path(self) -> Path:
        return self.path / self.filename

    @property
    def past_names(self) -> list[str]:
        keys, values = self.inputs["past_key_names"], self.inputs["past_value_names"]
        return [name % i for i in range(self.num_layers) for name in (keys, values)]

    @property
    def present_names(self) -> list[str]:
        keys, values = self.outputs["present_key_names"], self.outputs["present_value_names"]
        return [name % i for i in range(self.num_layers) for name in (keys, values)]


def read_genai_config(path: str | os.PathLike[str]) -> GenaiDecoder:
    folder = Path(path)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise PackageError(f"{folder} has no {CONFIG_FILE}, so it is no ONNX Runtime GenAI "
                           "model folder", fix="build one with `python bench/reference_genai.py`"
                           " or fix the path in the config")
    try:
        model = json.loads(file.read_text())["model"]
        decoder = model["decoder"]
        return GenaiDecoder(
            path=folder, filename=str(decoder.get("filename", "model.onnx")),
            inputs=dict(decoder["inputs"]), outputs=dict(decoder["outputs"]),
            num_layers=int(decoder["num_hidden_layers"]),
            num_kv_heads=int(decoder["num_key_value_heads"]),
            head_size=int(decoder["head_size"]),
            context_length=int(model.get("context_length") or 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{file} lacks the decoder field {exc}",
                           fix="rebuild the folder with onnxruntime_genai.models.builder") from None


def genai_precision(path: str | os.PathLike[str]) -> str:
    """int4 when the folder's graph holds MatMulNBits, else fp32."""
    import onnx

    graph = onnx.load(str(read_genai_config(path).model_path), load_external_data=False).graph
    return "int4" if any(n.op_type == "MatMulNBits" for n in graph.node) else "fp32"


def genai_traffic(path: str | os.PathLike[str]) -> Traffic:
    """Bytes per token of a GenAI folder's model (its cache's head size is symbolic)."""
    decoder = read_genai_config(path)
    return model_traffic(decoder.model_path, {"kv_cache_dim": decoder.head_size})


class GenaiOnnxModel:
    """A GenAI folder's model.onnx in plain ONNX Runtime, behind the ``forward`` /
    ``empty_past`` of llmopt's decoder model, so :func:`llmopt.evaluate.perplexity` scores it.

    Name mapping comes from genai_config.json (``past_key_values.%d.key`` in,
    ``present.%d.key`` out); position ids are not fed: GenAI's graphs derive positions from
    the attention mask inside GroupQueryAttention.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 session: Any = None) -> None:
        self.decoder = read_genai_config(path)
        if session is None:
            from llmopt.runtime.session import cpu_session

            session = cpu_session(self.decoder.model_path, threads)
        self.session = session
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_names = [self.decoder.outputs["logits"], *self.decoder.present_names]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.decoder.num_kv_heads, 0, self.decoder.head_size)
        return [np.zeros(shape, np.float32) for _ in self.decoder.past_names]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, past: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        names = self.decoder.inputs
        feed = {names["input_ids"]: input_ids, names["attention_mask"]: attention_mask}
        if "position_ids" in names and names["position_ids"] in self.input_names:
            feed[names["position_ids"]] = position_ids
        feed.update(zip(self.decoder.past_names, past, strict=True))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present
