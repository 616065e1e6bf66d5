"""all-MiniLM-L6-v2 (real weights): int8 keeps embeddings at cosine >= 0.99 of fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmopt.exporter import ExportOptions, export
from llmopt.quantizer import QuantizeOptions, quantize

pytestmark = pytest.mark.real_model


def test_int8_embeddings_stay_close(minilm_dir: Path, tmp_path: Path) -> None:
    """The default int8 preset; the embedding table (half of MiniLM's weights) stays float."""
    fp32 = export(minilm_dir, tmp_path / "fp32", ExportOptions(task="feature-extraction"))
    result = quantize(fp32, tmp_path / "int8", QuantizeOptions.int8())
    fidelity = result.manifest["fidelity"]
    assert fidelity["sentences"] >= 20
    assert fidelity["cosine_min"] >= 0.99, fidelity
    assert fidelity["size_bytes"] < 0.7 * fidelity["against_size_bytes"]
    print("int8 cosine mean", fidelity["cosine_mean"], "min", fidelity["cosine_min"])
