"""GGUF sources for every architecture that transformers reads from GGUF and llmopt exports
(``tests/tiny_gguf.MODELS``): a tiny random model written as llama.cpp writes it -> ``export``
-> validation passes -> the Generator's greedy tokens equal transformers' ``generate`` on the
same GGUF file. Most in Q8_0 (breadth), a few in Q4_0 (the 4-bit blocks int4 reuses).

Under transformers 4.57 every architecture it reads is exported (natively or traced); the
architectures 4.57 cannot read from GGUF are skipped by name, and those its GGUF loader reads
as another model are refused from the header (``tiny_gguf.NEEDS_TRANSFORMERS_5``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

import llmopt
from llmopt.errors import UnsupportedError
from llmopt.exporter import ExportOptions
from tests import tiny_gguf
from tests.exporter.test_matrix import expected_builder, torch_greedy

Q4_0 = frozenset({"qwen3", "gemma2"})  # the rest in Q8_0
# architectures whose test takes ~20-30 s on two busy CPU cores (wide experts, six layers)
SLOW = frozenset({"qwen2_moe", "gemma3_text"})
PROMPT_IDS = [1, 25, 9, 30, 7, 11, 40, 22, 8, 50, 60, 13]


def unreadable(arch: str) -> str | None:
    """Why the installed transformers cannot read ``arch`` from GGUF, or None."""
    import transformers
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    gguf_arch = tiny_gguf.GGUF_ARCH.get(arch, arch)
    if arch in GGUF_CONFIG_MAPPING or gguf_arch in GGUF_CONFIG_MAPPING:
        return None
    return f"transformers {transformers.__version__} does not read {gguf_arch!r} GGUF files"


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a
                                  for a in tiny_gguf.MODELS])
def test_gguf_architecture_exports_and_generates_like_transformers(arch: str,
                                                                   tmp_path: Path) -> None:
    reason = unreadable(arch)
    if reason:
        pytest.skip(reason)
    qtype = "Q4_0" if arch in Q4_0 else "Q8_0"
    path = tiny_gguf.build(arch, tmp_path / f"tiny-{arch}.{qtype}.gguf", qtype)
    builder = expected_builder(arch)
    if arch in tiny_gguf.NEEDS_TRANSFORMERS_5 and transformers.__version__.startswith("4."):
        with pytest.raises(UnsupportedError, match=tiny_gguf.NEEDS_TRANSFORMERS_5[arch]):
            llmopt.export(path, tmp_path / "package")
        return
    package = llmopt.export(path, tmp_path / "package", ExportOptions(generation_tokens=8))
    manifest = package.manifest
    assert manifest["source"]["kind"] == "gguf" and manifest["model_type"] == arch
    assert manifest["builder"] == builder
    assert manifest["validation"]["passed"], manifest["validation"]
    assert all(g["match"] for g in manifest["validation"]["generation"])

    result = llmopt.load(package.path).generate(PROMPT_IDS, max_new_tokens=10, ignore_eos=True)
    assert result.token_ids == torch_greedy(tmp_path, PROMPT_IDS, 10, gguf_file=path.name)



# what transformers reads from GGUF that MODELS leaves out, and why
LEFT_OUT = {
    "general": "not an architecture", "tokenizer": "not an architecture",
    "mistral": "llama.cpp writes Mistral as 'llama' (tested as llama)",
    "t5": "encoder-decoder: refused from the header", "umt5": "encoder-decoder: refused",
    "mamba": "recurrent state: refused", "lfm2": "recurrent state: refused",
    "deci": "no transformers model class (repository code)",
    "gpt_oss": "not written yet: its expert layout (tiny_gguf) does not round-trip",
    "gemma4": "not written yet", "minimax_m2": "not written yet",
}


def test_every_architecture_transformers_reads_from_gguf_is_tested_or_left_out_by_name(
        ) -> None:
    """A transformers upgrade that reads a new architecture from GGUF fails here until the
    architecture is in MODELS (tested) or in LEFT_OUT (with its reason)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    tested = set(tiny_gguf.MODELS) | {tiny_gguf.GGUF_ARCH.get(a, a) for a in tiny_gguf.MODELS}
    assert set(GGUF_CONFIG_MAPPING) - tested - set(LEFT_OUT) == set()
