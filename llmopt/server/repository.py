"""A model repository: a folder whose subfolders are model packages, served by name.

Every package loads at start; any can be (re)loaded or unloaded at run time (KServe's
repository extension). A package that fails to load is UNAVAILABLE with the reason, and the
others serve on. A reload swaps in the new model once it is ready and lets the old one finish
its requests in the background; a failed reload leaves the old one serving.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.errors import InvalidInputError, LlmoptError, PackageError
from llmopt.package import MANIFEST_NAME, Package
from llmopt.server.config import ModelConfig, load_model_config
from llmopt.server.models import Decoder, Encoder, ServedModel, load_model
from llmopt.server.status import ModelNotFoundError, ModelNotReadyError

log = logging.getLogger("llmopt.server")
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class Entry:
    name: str
    state: str
    reason: str = ""
    wanted: bool = True  # False once unloaded on request: it no longer counts for readiness
    fix: str | None = None  # what the failed load's own error said to do

    @property
    def detail(self) -> str:
        """The reason with its fix, as the repository index shows it."""
        return f"{self.reason} (fix: {self.fix})" if self.fix else self.reason


class ModelRepository:
    def __init__(self, root: str | Path, defaults: ModelConfig | None = None,
                 on_state: Callable[[str, bool], None] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise PackageError(f"model repository {self.root} is not a directory",
                               fix="pass a folder holding one package directory per model")
        self.defaults = defaults or ModelConfig()
        self._on_state = on_state or (lambda name, ready: None)
        self._entries: dict[str, Entry] = {}
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    # -- discovery ------------------------------------------------------------------------------

    def package_names(self) -> list[str]:
        """Subfolders holding a package manifest, sorted."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _NAME.fullmatch(p.name) and (p / MANIFEST_NAME).is_file())

    def directory(self, name: str) -> Path:
        """The package folder of ``name``; NOT_FOUND for anything else. A name is one path
        component (no separators, no leading dot), so only the operator's own links lead out."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ModelNotFoundError(f"no model named {name[:100]!r}" if isinstance(name, str)
                                     else "no model name given",
                                     fix=f"models here: {', '.join(self.package_names())}")
        path = self.root / name
        if not (path / MANIFEST_NAME).is_file():
            raise ModelNotFoundError(f"no model named {name!r} in the repository",
                                     fix=f"models here: {', '.join(self.package_names()) or '-'}")
        return path

    def knows(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    # -- loading --------------------------------------------------------------------------------

    def load_all(self) -> None:
        for name in self.package_names():
            try:
                self.load(name)
            except LlmoptError as exc:
                log.error("model %s did not load: %s", name, exc)

    def load(self, name: str, overrides: Mapping[str, Any] | None = None) -> ServedModel:
        """Load (or reload) ``name``; raises why it failed and records it as the reason."""
        directory = self.directory(name)
        with self._load_lock:
            with self._lock:
                self._entries[name] = Entry(name, LOADING)
            try:
                config = load_model_config(directory, self.defaults)
                if overrides:
                    config = config.merged(overrides, f"load parameters of {name}")
                model = load_model(name, directory, config)
            except LlmoptError as exc:
                self._failed(name, exc.message, exc.fix)
                raise
            except Exception as exc:
                log.exception("model %s failed to load", name)
                self._failed(name, f"{type(exc).__name__}: {exc}")
                raise PackageError(f"model {name!r} failed to load: {type(exc).__name__}: {exc}",
                                   fix="check the package with `llmopt inspect`") from None
            with self._lock:
                old = self._models.get(name)
                self._models[name] = model
                self._entries[name] = Entry(name, READY)
        self._on_state(name, True)
        if old is not None:
            threading.Thread(target=old.close, args=(60.0,), daemon=True).start()
        log.info("model %s ready (%s on %s)", name, model.kind, model.session_info.active[0])
        return model

    def unload(self, name: str, grace: float | None = 30.0) -> None:
        self.directory(name)
        with self._lock:
            model = self._models.pop(name, None)
            self._entries[name] = Entry(name, UNAVAILABLE, "unloaded", wanted=False)
        self._on_state(name, False)
        if model is not None:
            model.close(grace)

    def close(self, grace: float | None = None) -> None:
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
        for model in models:
            model.close(grace)

    def _failed(self, name: str, reason: str, fix: str | None = None) -> None:
        """Record a failed load; a model already loaded keeps serving its old version."""
        with self._lock:
            if name in self._models:
                self._entries[name] = Entry(name, READY, f"the last reload failed: {reason}",
                                            fix=fix)
                return
            self._entries[name] = Entry(name, UNAVAILABLE, reason, fix=fix)
        self._on_state(name, False)

    # -- lookup ---------------------------------------------------------------------------------

    def get(self, name: str) -> ServedModel:
        """The ready model ``name``: NOT_FOUND if there is none, UNAVAILABLE if not loaded."""
        with self._lock:
            model = self._models.get(name)
            entry = self._entries.get(name)
        if model is not None:
            return model
        self.directory(name)  # NOT_FOUND for a name the repository does not hold
        state = entry.state if entry else UNAVAILABLE
        reason = (entry.reason if entry else "") or "not loaded"
        fix = entry.fix if entry and entry.fix else \
            "load it (RepositoryModelLoad) or wait until it is ready"
        raise ModelNotReadyError(f"model {name!r} is {state}: {reason}", fix=fix)

    def decoder(self, name: str) -> Decoder:
        model = self.get(name)
        if not isinstance(model, Decoder):
            raise InvalidInputError(f"model {name!r} is an encoder; it does not generate text",
                                    fix="call Embed, or pick a text-generation model")
        return model

    def encoder(self, name: str) -> Encoder:
        model = self.get(name)
        if not isinstance(model, Encoder):
            raise InvalidInputError(f"model {name!r} is a decoder; it has no embeddings",
                                    fix="call Generate, or pick a feature-extraction model")
        return model

    def package(self, name: str) -> Package:
        """The package of ``name``, loaded or not."""
        with self._lock:
            model = self._models.get(name)
        return model.package if model is not None else Package.open(self.directory(name))

    def loaded(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    def index(self) -> list[Entry]:
        """Every package on disk and every model known, with its state."""
        with self._lock:
            entries = dict(self._entries)
        for name in self.package_names():
            entries.setdefault(name, Entry(name, UNAVAILABLE, "not loaded", wanted=False))
        return [entries[n] for n in sorted(entries)]

    def ready(self) -> bool:
        """Every model that should be loaded is (a failed load keeps the server unready)."""
        with self._lock:
            return all(e.state == READY for e in self._entries.values() if e.wanted)
