"""The JSON format of bench results, version 1 (a JSON Schema, draft 2020-12).

A results file holds the run (name, time, command, config, fingerprint) and one record per
point. Version rules: a new optional field keeps the version; removing or redefining a field
bumps it. ``llmopt bench compare`` reads every version up to :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
KIND = "llmopt-bench-results"

_NUM = {"type": ["number", "null"]}
_SUMMARY = {
    "type": "object",
    "required": ["n", "mean", "stdev", "min", "p50", "p90", "p99", "max"],
    "properties": {"n": {"type": "integer", "minimum": 0},
                   **dict.fromkeys(("mean", "stdev", "min", "p50", "p90", "p99", "max"), _NUM)},
    "additionalProperties": False,
}
_SAMPLES = {"type": "array", "items": {"type": "number"}}
_SUMMARIES = ("ttft_s", "itl_s", "e2e_s", "prefill_tokens_per_s", "decode_tokens_per_s",
              "output_tokens_per_s", "requests_per_s", "sequences_per_s", "latency_s",
              "round_wall_s")
_SAMPLE_KEYS = ("ttft_s", "itl_s", "e2e_s", "latency_s")

RECORD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "series", "status", "error", "target", "package", "task", "precision",
                 "provider", "workload", "rounds", "requests", "metrics", "memory",
                 "in_effect", "speedup_over_pytorch"],
    "properties": {
        "id": {"type": "string"},
        "series": {"type": "string"},
        "status": {"enum": ["ok", "failed", "skipped"]},
        "error": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["type", "message", "phase"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                           "phase": {"enum": ["setup", "load", "warmup", "measure"]},
                           "traceback": {"type": "string"}}}]},
        "target": {"enum": ["pytorch", "inprocess", "server", "genai"]},
        "package": {"type": "string"},
        "package_path": {"type": "string"},
        "task": {"type": "string"},
        "precision": {"type": "string"},
        "provider": {"type": "string"},
        "workload": {
            "type": "object",
            "required": ["batch_size", "prompt_tokens", "new_tokens", "concurrency",
                         "request_rate"],
            "properties": {"batch_size": {"type": "integer", "minimum": 1},
                           "prompt_tokens": {"type": "integer", "minimum": 1},
                           "new_tokens": {"type": "integer", "minimum": 0},
                           "concurrency": {"type": "integer", "minimum": 1},
                           "request_rate": _NUM},
        },
        "rounds": {"type": "integer", "minimum": 0},
        "warmup_rounds": {"type": "integer", "minimum": 0},
        "requests": {"type": "integer", "minimum": 0},
        "measured_s": {"type": "number"},
        "budget_exhausted": {"type": "boolean"},
        "in_effect": {"type": "object"},
        "memory": {"type": "object", "properties": {
            "peak_rss_bytes": {"type": ["integer", "null"]},
            "peak_rss_scope": {"enum": ["point", "process"]},
            "model_rss_bytes": {"type": ["integer", "null"]},
            "gpu_memory_bytes": {"type": ["integer", "null"]}}},
        "load_average": {"type": ["array", "null"], "items": {"type": "number"}},
        "metrics": {"oneOf": [{"type": "null"}, {
            "type": "object",
            "properties": {
                **dict.fromkeys(_SUMMARIES, _SUMMARY),
                "output_tokens_per_request": _NUM,
                "input_tokens_per_sequence": _NUM},
            "additionalProperties": False}]},
        "samples": {"oneOf": [{"type": "null"}, {
            "type": "object", "properties": dict.fromkeys(_SAMPLE_KEYS, _SAMPLES),
            "additionalProperties": False}]},
        "speedup_over_pytorch": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["baseline"],
            "properties": {"baseline": {"type": "string"}, "e2e": _NUM, "ttft": _NUM,
                           "decode_tokens_per_s": _NUM, "latency": _NUM}}]},
    },
    "allOf": [{"if": {"properties": {"status": {"const": "ok"}}},
               "then": {"properties": {"metrics": {"type": "object"}, "error": {"type": "null"}}},
               "else": {"properties": {"error": {"type": "object"}}}}],
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "llmopt bench results",
    "type": "object",
    "required": ["schema_version", "kind", "name", "created", "command", "config",
                 "fingerprint", "records"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"const": KIND},
        "name": {"type": "string"},
        "created": {"type": "string"},
        "duration_s": {"type": "number"},
        "command": {"type": "string"},
        "config": {"type": "object"},
        "fingerprint": {
            "type": "object",
            "required": ["cpu", "memory_bytes", "load_average", "gpu", "versions"],
            "properties": {
                "cpu": {"type": "object", "required": ["model", "logical_cores", "isa"]},
                "memory_bytes": {"type": ["integer", "null"]},
                "load_average": {"type": ["array", "null"]},
                "load_average_end": {"type": ["array", "null"]},
                "gpu": {"type": ["array", "null"]},
                "versions": {"type": "object", "required": ["python"]},
            },
        },
        "records": {"type": "array", "items": RECORD_SCHEMA},
        "analysis": {"type": "object"},
    },
}
