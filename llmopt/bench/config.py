"""Bench configuration: a YAML file (or the same mapping built from CLI flags), validated whole
before anything runs, so a typo fails in a second rather than after a half-hour sweep.

    name: smollm2_cpu
    packages:                       # label -> package directory (or {path, prepare})
      fp32: build/bench/smollm2-fp32
      # int4_lookup: {path: ..., prompt_lookup: 4}   # in-process: draft tokens per step
    providers: [cpu]                # or {name: cpu, options: {intra_op_threads: 2}, label: ...}
    matrix:                         # the defaults of every sweep
      targets: [pytorch, inprocess, server]
      batch_sizes: [1, 4]
      prompt_lengths: [32, 256]
      new_tokens: [64]
    sweeps:                         # optional: several matrices, each overriding `matrix`
      - {targets: [inprocess], concurrency: [1, 2, 4]}
    run: {warmup: 1, repetitions: 3, max_seconds_per_point: 120}
    analysis:                       # optional: facts beside the timings (llmopt.bench.analysis)
      bandwidth: true               # the machine's read-bandwidth limit, in the same run
      bytes_per_token: true         # from each decoder's graph; with bandwidth: % of the limit
      perplexity: true              # decoders, on llmopt's evaluation text
      cosine: true                  # encoders, against the reference package
      memory: true                  # peak RSS of a process running only that package
      reference: fp32               # the package deltas are taken against
      compare: {int4: genai_int4}   # ratio rows: package -> the package it is measured against

A package with ``runtime: genai`` is an ONNX Runtime GenAI model folder, measured by the
``genai`` target in GenAI's own Python (``genai: {python: .venv-genai/bin/python}``).
Relative package paths are relative to the directory the bench runs from.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llmopt.errors import InvalidInputError

TARGETS = ("pytorch", "inprocess", "server", "genai")
TOP_KEYS = ("name", "description", "packages", "providers", "matrix", "sweeps", "run", "server",
            "pytorch", "engine", "genai", "analysis")
MATRIX_DEFAULTS: dict[str, list[Any]] = {
    "targets": ["inprocess"],
    "packages": [],          # empty: every package
    "providers": [],         # empty: every provider
    "batch_sizes": [1],
    "prompt_lengths": [128],
    "new_tokens": [64],
    "concurrency": [1],
    "request_rates": [None],  # None: closed loop (each worker sends its next request at once)
}
PACKAGE_KEYS = ("path", "prepare", "runtime", "title", "prompt_lookup")
RUNTIMES = ("llmopt", "genai")
NULLABLE = ("max_seconds_per_point", "warmup_new_tokens")  # None: no limit
PROVIDER_KEYS = ("name", "options", "label")


@dataclass(frozen=True)
class RunOptions:
    """How each point is measured.

    ``warmup`` rounds run first and are not recorded (their requests generate at most
    ``warmup_new_tokens``: enough to warm every shape, cheaper than a full round); then
    ``repetitions`` rounds, interleaved over the points (round-robin) unless ``interleave`` is
    off. A point stops early once its measured rounds took ``max_seconds_per_point``. A round
    issues ``concurrency x requests_per_worker`` requests. ``strict_providers``: a provider
    fallback fails the point instead of silently measuring another provider. ``settle_s``: a
    pause before a round on another runtime (session, process) than the round before, so that
    runtime's threads (ONNX Runtime's and OpenMP's keep spinning after a run) are idle when the
    round's first request starts: without it, a 108-token prefill right after another
    session's run took 154 ms instead of 133 on 2 cores (it measured the neighbour, not the
    point).
    """

    warmup: int = 1
    warmup_new_tokens: int | None = 8  # warmup requests generate this many (None: as measured)
    repetitions: int = 3
    max_seconds_per_point: float | None = 120.0
    interleave: bool = True
    requests_per_worker: int = 1
    strict_providers: bool = True
    request_timeout_s: float = 600.0
    seed: int = 0
    settle_s: float = 0.25


@dataclass(frozen=True)
class ServerOptions:
    """The served target: a server at ``address``, or one the harness starts (``address``
    unset) over a repository of the configured packages."""

    address: str | None = None
    token: str | None = None
    startup_timeout_s: float = 300.0
    max_batch_size: int = 16
    # every request of a point sends the same prompt: a prefix cache would skip their
    # prefill and measure decoding alone, so a started server keeps none unless asked
    prefix_cache_bytes: int = 0


@dataclass(frozen=True)
class PytorchOptions:
    """The transformers baseline. ``source`` overrides the source in the package manifest."""

    source: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    threads: int | None = None


@dataclass(frozen=True)
class EngineOptions:
    """The in-process continuous-batching engine, used for points with concurrency > 1 or a
    request rate (``use``: auto), for every point (always) or never."""

    use: str = "auto"
    max_batch_size: int = 16
    max_prefill_batch: int = 4
    # the Generator's and the engine's; off unless asked, as for a started server
    # (ServerOptions): every round repeats its prompts
    prefix_cache_bytes: int = 0


@dataclass(frozen=True)
class GenaiOptions:
    """Where ONNX Runtime GenAI lives: a Python with onnxruntime-genai installed (its own
    environment: it brings its own onnxruntime)."""

    python: str = ".venv-genai/bin/python"


@dataclass(frozen=True)
class AnalysisOptions:
    """What the run computes besides timings (see :mod:`llmopt.bench.analysis`)."""

    bandwidth: bool = False
    bytes_per_token: bool = False
    perplexity: bool = False
    cosine: bool = False
    memory: bool = False
    reference: str | None = None
    compare: Mapping[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return any((self.bandwidth, self.bytes_per_token, self.perplexity, self.cosine,
                    self.memory, self.compare))


@dataclass(frozen=True)
class PackageSpec:
    label: str
    path: Path
    prepare: Mapping[str, Any] | None = None
    runtime: str = "llmopt"
    title: str | None = None  # how comparison tables name it (default: "llmopt LABEL")
    prompt_lookup: int = 0  # draft tokens per step (SamplingParams.prompt_lookup), in-process


@dataclass(frozen=True)
class ProviderSpec:
    label: str
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    targets: tuple[str, ...]
    packages: tuple[str, ...]
    providers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    new_tokens: tuple[int, ...]
    concurrency: tuple[int, ...]
    request_rates: tuple[float | None, ...]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    packages: dict[str, PackageSpec]
    providers: dict[str, ProviderSpec]
    sweeps: tuple[Sweep, ...]
    run: RunOptions = RunOptions()
    server: ServerOptions = ServerOptions()
    pytorch: PytorchOptions = PytorchOptions()
    engine: EngineOptions = EngineOptions()
    genai: GenaiOptions = GenaiOptions()
    analysis: AnalysisOptions = AnalysisOptions()
    description: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)  # as given, for the report


def load_config(path: str | os.PathLike[str],
                overrides: Mapping[str, Any] | None = None) -> BenchConfig:
    """Read and validate a YAML bench config; ``overrides`` (from CLI flags) win."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise InvalidInputError(f"bench config {file} does not exist",
                                fix="pass a YAML file such as bench/configs/smollm2_cpu.yaml")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InvalidInputError(f"{file} is not valid YAML: {first}",
                                fix="fix the YAML syntax") from None
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{file} must hold a mapping of settings",
                                fix=f"top-level keys: {', '.join(TOP_KEYS)}")
    data = dict(data)
    data.setdefault("name", file.stem)
    return parse_config(with_overrides(data, overrides or {}), where=str(file))


def with_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with CLI overrides: ``packages``/``providers``/``name`` replace, ``run``,
    ``server`` and ``pytorch`` keys merge, and ``matrix`` keys replace the key in the matrix
    and in every sweep."""
    merged = copy.deepcopy(dict(data))
    for key in ("packages", "providers", "name"):
        if key in overrides:
            merged[key] = overrides[key]
    for key in ("run", "server", "pytorch", "engine", "genai"):
        if key in overrides:
            base = merged.get(key) or {}
            merged[key] = {**(base if isinstance(base, Mapping) else {}), **overrides[key]}
    matrix = dict(overrides.get("matrix") or {})
    for key in ("packages", "providers"):  # new labels: the sweeps' selections no longer apply
        if key in overrides:
            matrix.setdefault(key, [])
    if matrix:
        merged["matrix"] = {**(merged.get("matrix") or {}), **matrix}
        sweeps = merged.get("sweeps")
        if isinstance(sweeps, list):
            merged["sweeps"] = [{k: v for k, v in s.items() if k not in matrix}
                                if isinstance(s, Mapping) else s for s in sweeps]
    return merged


def parse_config(data: Mapping[str, Any], where: str = "bench config") -> BenchConfig:
    """Validate a config mapping (unknown keys, types, targets, provider names)."""
    _check_keys(data, TOP_KEYS, where)
    packages = _packages(data.get("packages"), where)
    providers = _providers(data.get("providers"), where)
    matrix = data.get("matrix") or {}
    _check_keys(matrix, tuple(MATRIX_DEFAULTS), f"{where}: matrix")
    sweeps_raw = data.get("sweeps")
    if sweeps_raw is None:
        sweeps_raw = [{}]
    if not isinstance(sweeps_raw, list) or not sweeps_raw:
        raise InvalidInputError(f"{where}: sweeps must be a non-empty list of matrices",
                                fix="e.g. sweeps: [{batch_sizes: [1, 4]}]")
    sweeps = tuple(_sweep({**matrix, **(s or {})} if isinstance(s, Mapping) else s,
                          packages, providers, f"{where}: sweeps[{i}]")
                   for i, s in enumerate(sweeps_raw))
    engine = _options(EngineOptions, data.get("engine"), f"{where}: engine")
    if engine.use not in ("auto", "always", "never"):
        raise InvalidInputError(f"{where}: engine.use must be auto, always or never",
                                fix="e.g. engine: {use: auto}")
    run = _options(RunOptions, data.get("run"), f"{where}: run")
    if run.warmup < 0 or run.repetitions < 1 or run.requests_per_worker < 1 or \
            not 0 <= run.settle_s <= 60:
        raise InvalidInputError(f"{where}: run needs warmup >= 0, repetitions >= 1, "
                                "requests_per_worker >= 1 and settle_s between 0 and 60",
                                fix="e.g. run: {repetitions: 3, settle_s: 0.25}")
    return BenchConfig(
        name=str(data.get("name") or "bench"),
        description=str(data.get("description") or ""),
        packages=packages, providers=providers, sweeps=sweeps, run=run,
        server=_options(ServerOptions, data.get("server"), f"{where}: server"),
        pytorch=_options(PytorchOptions, data.get("pytorch"), f"{where}: pytorch"),
        engine=engine, genai=_options(GenaiOptions, data.get("genai"), f"{where}: genai"),
        analysis=_analysis(data.get("analysis"), packages, f"{where}: analysis"),
        raw=copy.deepcopy(dict(data)),
    )


def _check_keys(data: Any, valid: tuple[str, ...], where: str) -> None:
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{where} must be a mapping, not {type(data).__name__}",
                                fix=f"valid keys: {', '.join(valid)}")
    unknown = sorted(str(k) for k in set(data) - set(valid))
    if unknown:
        raise InvalidInputError(f"{where}: unknown key(s) {', '.join(unknown)}",
                                fix=f"valid keys: {', '.join(valid)}")


def _packages(data: Any, where: str) -> dict[str, PackageSpec]:
    if not data:
        raise InvalidInputError(f"{where}: no packages to benchmark",
                                fix="add packages: {LABEL: PACKAGE_DIR}, or pass --package DIR")
    if isinstance(data, list):  # a list of paths: labelled by directory name
        data = {Path(str(p)).name: p for p in data}
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{where}: packages must map a label to a package directory",
                                fix="e.g. packages: {fp32: build/bench/smollm2-fp32}")
    out: dict[str, PackageSpec] = {}
    for label, given in data.items():
        spec: Any = {"path": given} if isinstance(given, str | os.PathLike) else given
        _check_keys(spec, PACKAGE_KEYS, f"{where}: packages.{label}")
        if not spec.get("path"):
            raise InvalidInputError(f"{where}: packages.{label} has no path",
                                    fix="give the package directory as path")
        prepare = spec.get("prepare")
        if prepare is not None and not isinstance(prepare, Mapping):
            raise InvalidInputError(f"{where}: packages.{label}.prepare must be a mapping",
                                    fix="e.g. prepare: {export: fetch:smollm2-135m-instruct}")
        runtime = str(spec.get("runtime") or "llmopt")
        if runtime not in RUNTIMES:
            raise InvalidInputError(f"{where}: packages.{label}.runtime {runtime!r} is unknown",
                                    fix=f"runtimes are {', '.join(RUNTIMES)}")
        if runtime == "genai" and prepare is not None:
            raise InvalidInputError(f"{where}: packages.{label} is a GenAI model folder, which "
                                    "the bench cannot prepare",
                                    fix="build it with `python bench/reference_genai.py`")
        title = spec.get("title")
        lookup = spec.get("prompt_lookup", 0)
        if "prompt_lookup" in spec:  # the runtime's bound, imported only for packages that ask
            _check_prompt_lookup(lookup, runtime, f"{where}: packages.{label}")
        out[str(label)] = PackageSpec(str(label), Path(str(spec["path"])).expanduser(), prepare,
                                      runtime, None if title is None else str(title), lookup)
    return out


def _check_prompt_lookup(lookup: Any, runtime: str, where: str) -> None:
    from llmopt.runtime.sampling import MAX_PROMPT_LOOKUP

    if not isinstance(lookup, int) or isinstance(lookup, bool) or (
            not 0 <= lookup <= MAX_PROMPT_LOOKUP) or (lookup and runtime != "llmopt"):
        raise InvalidInputError(f"{where}.prompt_lookup must be an integer from 0 to "
                                f"{MAX_PROMPT_LOOKUP} on an llmopt package, not {lookup!r}",
                                fix="e.g. prompt_lookup: 4 (draft tokens per step)")


def _analysis(data: Any, packages: dict[str, PackageSpec], where: str) -> AnalysisOptions:
    if data is None:
        return AnalysisOptions()
    valid = tuple(f.name for f in fields(AnalysisOptions))
    _check_keys(data, valid, where)
    flags = {k: v for k, v in data.items() if k not in ("reference", "compare")}
    bad = [k for k, v in flags.items() if not isinstance(v, bool)]
    if bad:
        raise InvalidInputError(f"{where}: {', '.join(bad)} must be true or false",
                                fix="e.g. analysis: {perplexity: true}")
    reference = data.get("reference")
    compare = data.get("compare") or {}
    if not isinstance(compare, Mapping):
        raise InvalidInputError(f"{where}: compare must map a package to the package it is "
                                "measured against", fix="e.g. compare: {int4: genai_int4}")
    named = [str(x) for x in (reference, *compare, *compare.values()) if x is not None]
    unknown = [x for x in named if x not in packages]
    if unknown:
        raise InvalidInputError(f"{where}: {', '.join(unknown)} not defined",
                                fix=f"defined packages: {', '.join(packages)}")
    return AnalysisOptions(**flags, reference=None if reference is None else str(reference),
                           compare={str(k): str(v) for k, v in compare.items()})


def _providers(data: Any, where: str) -> dict[str, ProviderSpec]:
    from llmopt.runtime.session import resolve_providers

    out: dict[str, ProviderSpec] = {}
    for item in data or ["cpu"]:
        spec: Any = {"name": item} if isinstance(item, str) else item
        _check_keys(spec, PROVIDER_KEYS, f"{where}: providers entry {item!r}")
        name, options = str(spec.get("name") or ""), spec.get("options") or {}
        # unknown names, uninstalled providers and unknown options raise ProviderError here
        (short, _), *_ = resolve_providers([(name, dict(options))] if options else [name])
        label = str(spec.get("label") or short)
        if label in out:
            raise InvalidInputError(f"{where}: two providers are labelled {label!r}",
                                    fix="give each provider entry its own label")
        out[label] = ProviderSpec(label, short, dict(options))
    return out


def _sweep(data: Any, packages: dict[str, PackageSpec], providers: dict[str, ProviderSpec],
           where: str) -> Sweep:
    _check_keys(data, tuple(MATRIX_DEFAULTS), where)
    values = {key: _as_list(data.get(key, default), key, where)
              for key, default in MATRIX_DEFAULTS.items()}
    for target in values["targets"]:
        if target not in TARGETS:
            raise InvalidInputError(f"{where}: unknown target {target!r}",
                                    fix=f"targets are {', '.join(TARGETS)}")
    for key, known in (("packages", packages), ("providers", providers)):
        missing = [str(v) for v in values[key] if str(v) not in known]
        if missing:
            raise InvalidInputError(f"{where}: {key} {', '.join(missing)} not defined",
                                    fix=f"defined {key}: {', '.join(known)}")
    for key in ("batch_sizes", "prompt_lengths", "new_tokens", "concurrency"):
        bad = [v for v in values[key] if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad or not values[key]:
            raise InvalidInputError(f"{where}: {key} must be a list of integers >= 1, not "
                                    f"{values[key]!r}", fix=f"e.g. {key}: [1, 4]")
    rates = values["request_rates"]
    if any(r is not None and (not isinstance(r, int | float) or r <= 0) for r in rates):
        raise InvalidInputError(f"{where}: request_rates must be positive numbers or null",
                                fix="e.g. request_rates: [null, 2.0] (null: closed loop)")
    return Sweep(
        targets=tuple(dict.fromkeys(values["targets"])),
        packages=tuple(str(p) for p in values["packages"]) or tuple(packages),
        providers=tuple(str(p) for p in values["providers"]) or tuple(providers),
        batch_sizes=tuple(values["batch_sizes"]), prompt_lengths=tuple(values["prompt_lengths"]),
        new_tokens=tuple(values["new_tokens"]), concurrency=tuple(values["concurrency"]),
        request_rates=tuple(None if r is None else float(r) for r in rates),
    )


def _as_list(value: Any, key: str, where: str) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str) and key in ("targets", "packages", "providers"):
        return [value]
    if value is None or isinstance(value, int | float):
        return [value]
    raise InvalidInputError(f"{where}: {key} must be a list", fix=f"e.g. {key}: [1, 4]")


def _options(cls: Any, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    valid = tuple(f.name for f in fields(cls))
    _check_keys(data, valid, where)
    defaults = cls()
    for key, value in data.items():
        default = getattr(defaults, key)
        expected: tuple[type, ...] = (
            (bool,) if isinstance(default, bool) else (int,) if isinstance(default, int)
            else (int, float) if isinstance(default, float) else (str,) if isinstance(default, str)
            else (str, int, float))
        if value is None and (default is None or key in NULLABLE):
            continue
        if not isinstance(value, expected) or isinstance(value, bool) != (bool in expected):
            names = " or ".join(t.__name__ for t in expected)
            raise InvalidInputError(f"{where}: {key} must be {names}, not {value!r}",
                                    fix=f"e.g. {key}: {default!r}")
    return cls(**data)
