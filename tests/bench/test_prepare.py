"""--prepare builds a config's missing packages in dependency order: export, optimize, quantize."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmopt.bench import parse_config
from llmopt.bench.prepare import _make_one, prepare_packages
from llmopt.errors import InvalidInputError
from tests.tiny_decoders import build


def _config(root: Path, packages: dict) -> object:
    return parse_config({"packages": {label: {"path": str(root / label), "prepare": prepare}
                                      for label, prepare in packages.items()}})


def test_export_optimize_quantize_chain(tmp_path: Path) -> None:
    source = build("llama", tmp_path / "source")
    config = _config(tmp_path, {  # listed out of order: dependencies are made first
        "int4": {"quantize": {"from": "fused", "preset": "int4"}},
        "fused": {"optimize": {"from": "fp32", "level": 2}},
        "fp32": {"export": str(source), "options": {"generation_tokens": 4}},
    })
    progress: list[str] = []
    assert prepare_packages(config, progress.append) == {}
    stages = {label: [s["stage"] for s in json.loads(
        (tmp_path / label / "llmopt.json").read_text())["steps"]]
        for label in ("fp32", "fused", "int4")}
    assert stages == {"fp32": ["export"], "fused": ["export", "optimize"],
                      "int4": ["export", "optimize", "quantize"]}
    assert [line.split(":")[1].strip() for line in progress] == ["fp32", "fused", "int4"]
    assert prepare_packages(config, progress.append) == {}  # all there: nothing made again
    assert len(progress) == 3


@pytest.mark.parametrize("prepare, match", [
    ({"optimize": {"level": 2}}, "prepare.optimize needs from"),
    ({"optimize": {"from": "nowhere"}}, "optimize from unknown package 'nowhere'"),
    ({"quantize": {"from": "x"}}, "prepare.quantize needs from and preset"),
    ({"optimize": {"from": "x"}, "quantize": {"from": "x", "preset": "int4"}},
     "exactly one of export, optimize, quantize"),
])
def test_bad_prepare_steps_name_the_fix(tmp_path: Path, prepare: dict, match: str) -> None:
    """Reported per package (the sweep then skips or refuses it), never a traceback."""
    config = _config(tmp_path, {"x": {"export": "unused"}, "y": prepare})
    failed = prepare_packages(config, lambda line: None)
    assert match in failed["y"]
    with pytest.raises(InvalidInputError, match=match) as raised:
        _make_one(config, config.packages["y"], lambda dep: None, lambda line: None)
    assert raised.value.fix  # every message says what to do
