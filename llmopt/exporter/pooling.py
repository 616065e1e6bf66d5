"""How a source model pools token states into one sentence vector.

sentence-transformers keeps it beside the weights (``modules.json`` and the Pooling module's
``config.json``), so it is found with the source's files, locally or in the hub cache, and
written into the manifest's encoder layout for the runtime's Embedder; the graph itself stays
the same whatever the pooling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

POOLING_MODES = {  # sentence-transformers Pooling config key -> llmopt pooling name
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weighted_mean",
    "pooling_mode_lasttoken": "last",
}


def pooling(model: Any, classifier: bool) -> dict[str, Any]:
    """How the source turns token states into one vector: sentence-transformers' modules where
    the model directory has them, else ``cls`` for classifiers and ``mean`` otherwise."""
    default = {"pooling": "cls" if classifier else "mean", "normalize": False,
               "pooling_from": "default"}
    modules_file = _source_file(str(getattr(model, "name_or_path", "") or ""), "modules.json")
    if classifier or modules_file is None:
        return default
    try:
        modules = json.loads(modules_file.read_text())
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        pool = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
        if pool is None:
            return default
        config = json.loads((modules_file.parent / pool["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return default
    mode = config.get("pooling_mode")
    modes = [mode] if isinstance(mode, str) else [
        name for key, name in POOLING_MODES.items() if config.get(key)
    ]
    return {
        "pooling": "+".join(modes) or default["pooling"],
        "normalize": "Normalize" in kinds,
        "pooling_from": "sentence-transformers",
        "other_modules": [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")],
    }


def _source_file(source: str, filename: str) -> Path | None:
    """``filename`` in a local model directory, or in the local hub cache (never downloads)."""
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, filename)
    except Exception:  # noqa: BLE001  (a malformed id or cache: pooling falls back to default)
        return None
    return Path(cached) if isinstance(cached, str) else None
