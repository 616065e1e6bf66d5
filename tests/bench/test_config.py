"""Bad input fails before anything runs, in one line that says how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmopt.bench import load_config, parse_config, plan
from llmopt.bench.config import with_overrides
from llmopt.cli.main import main
from llmopt.errors import InvalidInputError, PackageError, ProviderError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    return path


def test_a_good_config_expands_to_its_points(tiny_package: Path, tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, f"""
packages: {{tiny: {tiny_package}}}
matrix: {{targets: [pytorch, inprocess], batch_sizes: [1, 2], prompt_lengths: [8],
          new_tokens: [4]}}
sweeps:
  - {{}}
  - {{targets: [inprocess, pytorch], concurrency: [1, 3]}}
"""))
    assert config.name == "bench"
    _, points = plan(config)
    ids = [p.id for p in points]
    assert "pytorch/tiny/torch-cpu/b2/p8/n4/c1" in ids
    assert "inprocess/tiny/cpu/b1/p8/n4/c3" in ids
    assert not any(p.target == "pytorch" and p.concurrency > 1 for p in points)
    assert len(ids) == len(set(ids)) == 6  # 2 pytorch + 2 inprocess c1 + 2 inprocess c3


@pytest.mark.parametrize(("text", "error", "words"), [
    ("packages: {a: X}\nbatch_size: [1]\n", InvalidInputError, "unknown key(s) batch_size"),
    ("packages: {a: X}\nmatrix: {batch: [1]}\n", InvalidInputError, "matrix: unknown key(s) batch"),
    ("packages: {a: X}\nrun: {repeats: 3}\n", InvalidInputError, "run: unknown key(s) repeats"),
    ("packages: {a: X}\nproviders: [quantum]\n", ProviderError, "unknown execution provider"),
    ("packages: {a: X}\nproviders: [{name: cpu, options: {threads: 2}}]\n", ProviderError,
     "unknown cpu option(s): threads"),
    ("packages: {a: X}\nmatrix: {targets: [tensorflow]}\n", InvalidInputError,
     "unknown target 'tensorflow'"),
    ("packages: {a: X}\nmatrix: {batch_sizes: [0]}\n", InvalidInputError, "integers >= 1"),
    ("packages: {a: X}\nmatrix: {packages: [b]}\n", InvalidInputError, "packages b not defined"),
    ("packages: {a: X}\nrun: {repetitions: three}\n", InvalidInputError,
     "repetitions must be int"),
    ("packages: {a: X}\nmatrix: {request_rates: [-1]}\n", InvalidInputError, "positive"),
    ("packages: {a: X}\nrun: {settle_s: -1}\n", InvalidInputError, "settle_s between 0 and 60"),
    ("matrix: {}\n", InvalidInputError, "no packages"),
    ("packages: {a: {path: X, runtime: tensorrt-llm}}\n", InvalidInputError,
     "runtime 'tensorrt-llm' is unknown"),
    ("packages: {a: {path: X, runtime: genai, prepare: {export: m}}}\n", InvalidInputError,
     "cannot prepare"),
    ("packages: {a: X}\nanalysis: {perplexity: yes please}\n", InvalidInputError,
     "perplexity must be true or false"),
    ("packages: {a: X}\nanalysis: {compare: {a: genai}}\n", InvalidInputError,
     "genai not defined"),
    ("packages: {a: X}\nanalysis: {reference: b}\n", InvalidInputError, "b not defined"),
    ("packages: {a: X}\nanalysis: {speed: true}\n", InvalidInputError,
     "analysis: unknown key(s) speed"),
    ("packages: [a\n", InvalidInputError, "not valid YAML"),
])
def test_bad_configs_fail_with_the_fix(tmp_path: Path, text: str, error: type,
                                       words: str) -> None:
    with pytest.raises(error) as caught:
        load_config(_write(tmp_path, text))
    assert words in str(caught.value)
    assert caught.value.fix


def test_a_missing_package_fails_before_running(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, f"packages: {{gone: {tmp_path / 'nope'}}}\n"))
    with pytest.raises(PackageError, match=r"package 'gone'.*does not exist") as caught:
        plan(config)
    assert "llmopt export" in str(caught.value.fix)
    packages, points = plan(config, allow_missing=True)  # --skip-missing: recorded as skipped
    assert packages["gone"].missing and points


def test_a_workload_past_the_context_fails_before_running(tiny_package: Path) -> None:
    config = parse_config({"packages": {"t": str(tiny_package)},
                           "matrix": {"prompt_lengths": [250], "new_tokens": [64]}})
    with pytest.raises(InvalidInputError, match="exceed t's context of 256"):
        plan(config)


def test_cli_flags_override_every_sweep() -> None:
    data = {"packages": {"a": "x"}, "matrix": {"batch_sizes": [1, 2]},
            "sweeps": [{"batch_sizes": [8]}, {"concurrency": [2]}], "run": {"warmup": 2}}
    merged = with_overrides(data, {"matrix": {"batch_sizes": [4]}, "run": {"repetitions": 1}})
    assert merged["matrix"]["batch_sizes"] == [4]
    assert merged["sweeps"] == [{}, {"concurrency": [2]}]
    assert merged["run"] == {"warmup": 2, "repetitions": 1}
    assert data["sweeps"][0] == {"batch_sizes": [8]}  # the input is left alone


@pytest.mark.parametrize(("args", "words"), [
    (["bench", "{cfg}"], "unknown key(s) colour"),
    (["bench", "--package", "{missing}"], "does not exist"),
    (["bench", "--package", "{pkg}", "--provider", "warp-drive"], "unknown execution provider"),
    (["bench"], "no config file and no --package"),
    (["bench", "compare", "only-one.json"], "compare takes two results files"),
])
def test_cli_bad_input_is_one_line_with_the_fix(tiny_package: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                args: list[str], words: str) -> None:
    cfg = _write(tmp_path, f"packages: {{t: {tiny_package}}}\ncolour: blue\n")
    filled = [a.format(cfg=cfg, missing=tmp_path / "missing", pkg=tiny_package) for a in args]
    assert main(filled) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert words in err and "(fix: " in err


def test_cli_dry_run_lists_points(tiny_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--package", f"t={tiny_package}", "--target", "inprocess",
                 "--batch-sizes", "1,4", "--prompt-lengths", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "inprocess/t/cpu/b1/p8/n64/c1" in out and "inprocess/t/cpu/b4/p8/n64/c1" in out


def test_a_genai_folder_is_a_package_only_the_genai_target_runs(tiny_package: Path,
                                                                 tmp_path: Path) -> None:
    from tests.bench.genai_fixtures import write_genai_folder

    folder = write_genai_folder(tmp_path / "genai")
    config = load_config(_write(tmp_path, f"""
packages:
  tiny: {tiny_package}
  theirs: {{path: {folder}, runtime: genai}}
matrix: {{targets: [pytorch, inprocess, genai], prompt_lengths: [8], new_tokens: [4]}}
analysis: {{perplexity: true, reference: tiny, compare: {{tiny: theirs}}}}
"""))
    assert config.packages["theirs"].runtime == "genai"
    assert config.analysis.compare == {"tiny": "theirs"} and config.analysis.enabled
    packages, points = plan(config)
    assert packages["theirs"].runtime == "genai" and packages["theirs"].is_decoder
    assert packages["theirs"].context_length == 64
    assert sorted(p.id for p in points) == ["genai/theirs/cpu/b1/p8/n4/c1",
                                            "inprocess/tiny/cpu/b1/p8/n4/c1",
                                            "pytorch/tiny/torch-cpu/b1/p8/n4/c1"]


@pytest.mark.parametrize(("steps", "dtype", "precision"), [
    # a fusion report that mentions float16 in a reason does not make the package float16
    ([{"stage": "export"},
      {"stage": "optimize", "options": {"level": 2, "fp16": None},
       "fusions": {"skip_layer_norm": {"fired": False, "reason": "float16 graphs fuse it"}}}],
     "float32", "fp32"),
    ([{"stage": "optimize", "options": {"fp16": True}}], "float16", "fp16"),
    ([{"stage": "optimize", "options": {"fp16": None}},
      {"stage": "quantize", "method": "int8_dynamic", "options": {}}], "float32", "int8_dynamic"),
])
def test_a_package_is_labelled_by_its_quantize_method_else_its_float_type(
        steps: list[dict[str, object]], dtype: str, precision: str) -> None:
    from llmopt.bench.matrix import _precision
    from llmopt.manifest import Manifest

    assert _precision(Manifest({"steps": steps, "onnx": {"dtype": dtype}})) == precision
