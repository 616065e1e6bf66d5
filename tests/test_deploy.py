"""The deployment files under deploy/ are checked without a cluster or a Docker daemon.

Every YAML document must match the JSON schema of its kind (tests/schemas/: field names,
required fields, types and enums of the Kubernetes and KServe APIs, unknown keys rejected as the
API server rejects them under strict field validation), and the files must agree with each other
and with llmopt itself: the probes and Services point at the port `llmopt serve` is told to
bind, its arguments parse with the real command-line parser, the model repository is where the
volume is mounted, the drain fits in the termination grace period. Broken copies of the
manifests show that each check can fail.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from llmopt import _proto
from llmopt.cli.cmd_serve import LOOPBACK
from llmopt.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
DOCKERFILE = DEPLOY / "Dockerfile"
KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.schema.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.schema.json",
    ("apps/v1", "Deployment"): "deployment.schema.json",
    ("v1", "Service"): "service.schema.json",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# grpc.health.v1 names the server answers for (besides each model's name): see server/app.py
HEALTH_SERVICES = ("", _proto.LLMOPT_SERVICE, _proto.KSERVE_SERVICE)
HTTP_HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
KSERVE_MODEL_DIR = Path("/mnt/models")  # where KServe's storage initializer puts storageUri
KSERVE_CONTAINER = "kserve-container"
DEFAULT_GRACE_S = 30  # a pod's terminationGracePeriodSeconds when nothing sets it

Doc = dict[str, Any]


# -- loading --------------------------------------------------------------------------------------

def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.cache
def manifests() -> tuple[tuple[str, Doc], ...]:
    """(label, document) for every YAML document under deploy/."""
    found = []
    for path in manifest_files():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for index, doc in enumerate(docs):
            label = str(path.relative_to(DEPLOY)) + (f"#{index}" if len(docs) > 1 else "")
            found.append((label, doc))
    return tuple(found)


def one(kind: str) -> Doc:
    docs = [doc for _, doc in manifests() if doc.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} under deploy/, found {len(docs)}"
    return copy.deepcopy(docs[0])


@functools.cache
def registry() -> Registry:
    resources = []
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


@functools.cache
def validator(schema_file: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    return Draft202012Validator(schema, registry=registry())


def schema_errors(doc: Doc) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        return [f"no schema for apiVersion {key[0]!r} kind {key[1]!r}: add one to tests/schemas"]
    errors = validator(KINDS[key]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in errors)


# -- what the files say to llmopt -----------------------------------------------------------------

@functools.cache
def serve_options() -> frozenset[str]:
    """Every option string of `llmopt serve`, spelled in full."""
    parser = build_parser()
    subcommands: Any = next(a for a in parser._actions if a.dest == "command")
    return frozenset(subcommands.choices["serve"]._option_string_actions)


def serve_args(args: list[Any]) -> tuple[Any, list[str]]:
    """``llmopt serve ARGS`` as the real parser reads them (None if it refuses), and what is
    wrong with them."""
    if not all(isinstance(a, str) for a in args):
        return None, [f"arguments must be strings: {args!r}"]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = build_parser().parse_args(["serve", *args])
    except SystemExit:
        why = (stderr.getvalue().strip().splitlines() or ["?"])[-1]
        return None, [f"`llmopt serve {' '.join(args)}` is refused: {why}"]
    # argparse takes any unambiguous prefix; a later option could make one ambiguous
    return parsed, [f"{flag} is abbreviated: spell it in full" for flag in
                    (a.split("=", 1)[0] for a in args)
                    if flag.startswith("--") and flag not in serve_options()]


def container(pod_spec: Doc, name: str | None = None) -> Doc:
    containers = pod_spec.get("containers", [])
    if name is None:
        assert len(containers) == 1, "the pod should run one container"
        return containers[0]
    return next(c for c in containers if c.get("name") == name)


def serving_problems(c: Doc, grpc_port: int | None, model_dir: Path,
                     grace_period_s: int) -> Iterator[str]:
    """What is wrong with how ``c`` runs `llmopt serve`: arguments, probes, grace."""
    if "command" in c:
        yield "command replaces the image's ENTRYPOINT (llmopt serve); give args only"
    args, problems = serve_args(c.get("args", []))
    yield from problems
    if args is None:
        return
    if grpc_port is None:
        yield "no gRPC container port"
    elif args.port != grpc_port:
        yield f"llmopt serve binds port {args.port}, the container declares {grpc_port}"
    if args.model_repository != model_dir:
        yield f"--model-repository is {args.model_repository}, the models are at {model_dir}"
    if args.host in LOOPBACK:
        yield f"--host {args.host}: probes and Services reach the pod IP, not loopback"
    if args.grace >= grace_period_s:
        yield (f"--grace {args.grace:g} s does not fit in the {grace_period_s} s termination "
               "grace period: requests would be cut off by SIGKILL")
    if args.tls_cert:
        yield "TLS is on: kubelet gRPC probes connect in plaintext (see docs/deployment.md)"
    for name in PROBES:
        probe = c.get(name)
        if probe is None:
            yield f"no {name}"
            continue
        if isinstance(probe.get("httpGet"), dict):
            yield from http_probe_problems(name, probe["httpGet"], c, args)
            continue
        action = probe.get("grpc")
        if not isinstance(action, dict):
            yield f"{name} is neither a gRPC health probe nor an HTTP GET of /v2/health"
            continue
        if action.get("port") != args.port:
            yield f"{name} checks port {action.get('port')}, llmopt serves on {args.port}"
        if action.get("service", "") not in HEALTH_SERVICES:
            yield f"{name} asks for health service {action.get('service')!r}, which is none " \
                  f"of {HEALTH_SERVICES}"


def http_probe_problems(name: str, action: Doc, c: Doc, args: Any) -> Iterator[str]:
    """An HTTP probe must GET the KServe v2 health route of the port llmopt serves HTTP on."""
    if args.no_http:
        yield f"{name} is an HTTP probe, but --no-http turns HTTP off"
        return
    port = action.get("port")
    if isinstance(port, str):
        port = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}.get(port)
    if port != args.http_port:
        yield f"{name} checks port {action.get('port')}, llmopt serves HTTP on {args.http_port}"
    if action.get("path") not in HTTP_HEALTH_PATHS:
        yield f"{name} GETs {action.get('path')!r}, none of {HTTP_HEALTH_PATHS}"
    if action.get("scheme", "HTTP") != "HTTP" or args.tls_cert:
        yield f"{name}: HTTP probes here are plaintext; with TLS use gRPC probes or HTTPS"


def metrics_port(c: Doc) -> int | None:
    """The metrics port ``c`` serves on; None when metrics are off (or the args are refused,
    which serving_problems reports)."""
    args, _ = serve_args(c.get("args", []))
    return None if args is None or args.no_metrics else args.metrics_port


def kserve_problems(runtime: Doc, isvc: Doc) -> list[str]:
    problems: list[str] = []
    spec = runtime["spec"]
    c = container(spec, KSERVE_CONTAINER)
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    # KServe runs the runtime's args followed by the model's (argparse: the last one wins)
    c = {**c, "args": [*c.get("args", []), *model.get("args", [])]}
    args, _ = serve_args(c.get("args", []))
    ports = c.get("ports", [])
    if len(ports) != 1 or ports[0].get("name") != "http1":
        problems.append("the runtime container should declare one port named http1 (OpenAI and "
                        "KServe v2 REST): Knative allows one port, KServe serves the first")
    elif args is not None and ports[0].get("containerPort") != args.http_port:
        problems.append(f"the runtime declares port {ports[0].get('containerPort')}, llmopt "
                        f"serves HTTP on {args.http_port}")
    if spec.get("protocolVersions") != ["v2", "grpc-v2"]:
        problems.append(f"protocolVersions {spec.get('protocolVersions')}: llmopt serves the v2 "
                        "protocol over HTTP (v2) and gRPC (grpc-v2)")
    for name in PROBES:
        if not isinstance(c.get(name, {}).get("httpGet", {}).get("port"), int):
            problems.append(f"{name} should GET the HTTP port by number: an InferenceService "
                            "that declares ports replaces the runtime's names")
    # an InferenceService on gRPC declares the h2c port in place of the runtime's
    own_ports = model.get("ports")
    grpc_port = args.port if args is not None else None
    if own_ports is not None or model.get("protocolVersion") == "grpc-v2":
        if model.get("protocolVersion") != "grpc-v2" or not own_ports or len(own_ports) != 1 \
                or own_ports[0].get("name") != "h2c":
            problems.append("an InferenceService on gRPC says protocolVersion grpc-v2 and "
                            "declares one port, h2c, the gRPC port")
        else:
            grpc_port = own_ports[0].get("containerPort")
    grace = predictor.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    problems += serving_problems(c, grpc_port, KSERVE_MODEL_DIR, grace)
    args, _ = serve_args(c.get("args", []))
    annotations = spec.get("annotations", {})
    for key in ("prometheus.kserve.io/port", "prometheus.io/port"):
        if args is not None and annotations.get(key) != str(metrics_port(c)):
            problems.append(f"annotation {key} is {annotations.get(key)!r}, metrics are on "
                            f"{metrics_port(c)}")
    for key in ("prometheus.kserve.io/path", "prometheus.io/path"):
        if annotations.get(key) != "/metrics":
            problems.append(f"annotation {key} should be /metrics")

    if model.get("runtime") != runtime["metadata"]["name"]:
        problems.append(f"the InferenceService names runtime {model.get('runtime')!r}, the "
                        f"ServingRuntime is {runtime['metadata']['name']!r}")
    formats = {f["name"]: f for f in spec.get("supportedModelFormats", [])}
    if model["modelFormat"]["name"] not in formats:
        problems.append(f"model format {model['modelFormat']['name']!r} is not one the runtime "
                        f"supports ({', '.join(formats)})")
    if model.get("protocolVersion") not in spec.get("protocolVersions", []):
        problems.append(f"protocolVersion {model.get('protocolVersion')!r} is not one the "
                        "runtime supports")
    if not model.get("storageUri", "").endswith("/"):
        problems.append("storageUri should name a folder (a model repository, ending in /), "
                        "not one package or file")
    return problems


def kubernetes_problems(deployment: Doc, service: Doc) -> list[str]:
    problems: list[str] = []
    template = deployment["spec"]["template"]
    pod = template["spec"]
    c = container(pod)
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    grace = pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    args, _ = serve_args(c.get("args", []))
    if args is None:  # serving_problems says why
        problems += serving_problems(c, ports.get("grpc"), Path("/"), grace)
    else:
        problems += serving_problems(c, ports.get("grpc"), args.model_repository, grace)
        mount = mounts.get(str(args.model_repository))
        if mount is None:
            problems.append(f"no volume is mounted at the model repository "
                            f"{args.model_repository}")
        elif mount["name"] not in {v["name"] for v in pod.get("volumes", [])}:
            problems.append(f"volumeMount {mount['name']!r} names no volume of the pod")
        port = metrics_port(c)
        if ports.get("metrics") != port:
            problems.append(f"container port 'metrics' is {ports.get('metrics')}, llmopt "
                            f"serves metrics on {port}")
        annotations = template.get("metadata", {}).get("annotations", {})
        if annotations.get("prometheus.io/port") != str(port):
            problems.append(f"prometheus.io/port is {annotations.get('prometheus.io/port')!r}, "
                            f"metrics are on {port}")

    labels = template.get("metadata", {}).get("labels", {})
    match = deployment["spec"]["selector"].get("matchLabels", {})
    if not match or any(labels.get(k) != v for k, v in match.items()):
        problems.append("the Deployment's selector does not match its pod labels")
    selector = service["spec"].get("selector", {})
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        problems.append("the Service's selector does not match the pod labels")
    targets = []
    for sp in service["spec"]["ports"]:
        target = sp.get("targetPort", sp["port"])
        number = ports.get(target) if isinstance(target, str) else target
        if number not in ports.values():
            problems.append(f"Service port {sp.get('name')} targets {target!r}, which is no "
                            "container port")
        targets.append(number)
    if ports.get("grpc") not in targets:
        problems.append("the Service does not expose the gRPC port")
    if args is not None and not args.no_http:
        if ports.get("http") != args.http_port:
            problems.append(f"container port 'http' is {ports.get('http')}, llmopt serves HTTP "
                            f"on {args.http_port}")
        elif args.http_port not in targets:
            problems.append("the Service does not expose the HTTP port")
    return problems


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerfile_problems(text: str, grpc_ports: set[int], metrics_ports: set[int],
                        run_as_users: set[int]) -> list[str]:
    problems: list[str] = []
    runtime_stage: list[tuple[str, str]] = []
    for word, rest in dockerfile_instructions(text):
        if word == "FROM":
            runtime_stage = []
        runtime_stage.append((word, rest))
    found = {}
    for word, rest in runtime_stage:
        found[word] = rest  # the last one counts, as in Docker
    try:
        entrypoint = json.loads(found.get("ENTRYPOINT", "null"))
        cmd = json.loads(found.get("CMD", "[]"))
    except json.JSONDecodeError as exc:
        return [f"ENTRYPOINT and CMD must be JSON arrays (exec form, so llmopt is PID 1 and "
                f"gets SIGTERM): {exc}"]
    if entrypoint != ["llmopt", "serve"]:
        problems.append(f"ENTRYPOINT is {entrypoint}, not llmopt serve in exec form")
    args, refused = serve_args(cmd)
    problems += refused
    if args is not None:
        if args.model_repository != Path("/models"):
            problems.append(f"the default model repository is {args.model_repository}, "
                            "not /models")
        if args.host in LOOPBACK:
            problems.append("CMD binds loopback: `docker run -p` could not reach it")
        grpc_ports = grpc_ports | {args.port} | (set() if args.no_http else {args.http_port})
        metrics_ports = metrics_ports | {args.metrics_port}
    exposed = {int(p.split("/")[0]) for word, rest in runtime_stage if word == "EXPOSE"
               for p in rest.split()}
    if not grpc_ports | metrics_ports <= exposed:
        problems.append(f"EXPOSE {sorted(exposed)} misses {sorted(grpc_ports | metrics_ports)}")
    if found.get("STOPSIGNAL") != "SIGTERM":
        problems.append("STOPSIGNAL should be SIGTERM: llmopt serve drains on it")
    user = found.get("USER", "0").split(":")[0]
    if not user.isdigit() or int(user) == 0:
        problems.append(f"USER {user!r}: run as a numeric non-root user (runAsNonRoot checks it)")
    elif {int(user)} != run_as_users:
        problems.append(f"USER {user} differs from the manifests' runAsUser {run_as_users}")
    return problems


def run_as_users() -> set[int]:
    users = set()
    for _, doc in manifests():
        for pod in (doc["spec"], doc["spec"].get("template", {}).get("spec", {})):
            for c in pod.get("containers", []):
                context = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
                if "runAsUser" in context:
                    users.add(context["runAsUser"])
    return users


# -- the files as they are ------------------------------------------------------------------------

def test_every_schema_is_a_valid_2020_12_schema() -> None:
    files = sorted(p.name for p in SCHEMAS.glob("*.json"))
    assert set(KINDS.values()) < set(files)
    for name in files:
        Draft202012Validator.check_schema(json.loads((SCHEMAS / name).read_text()))


def test_every_kind_has_a_manifest_and_a_schema() -> None:
    assert manifest_files(), "no manifests under deploy/"
    kinds = {(doc.get("apiVersion"), doc.get("kind")) for _, doc in manifests()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("label", [label for label, _ in manifests()])
def test_manifest_matches_its_schema(label: str) -> None:
    doc = dict(manifests())[label]
    assert schema_errors(doc) == []


def test_kserve_runtime_and_inference_service_agree() -> None:
    assert kserve_problems(one("ServingRuntime"), one("InferenceService")) == []


def test_kubernetes_deployment_and_service_agree() -> None:
    assert kubernetes_problems(one("Deployment"), one("Service")) == []


def test_dockerfile_serves_what_the_manifests_expect() -> None:
    runtime_c = container(one("ServingRuntime")["spec"], KSERVE_CONTAINER)
    deployment_c = container(one("Deployment")["spec"]["template"]["spec"])
    grpc = {runtime_c["ports"][0]["containerPort"]} | {
        p["containerPort"] for p in deployment_c["ports"] if p["name"] == "grpc"}
    metrics = {p for p in (metrics_port(runtime_c), metrics_port(deployment_c)) if p}
    assert dockerfile_problems(DOCKERFILE.read_text(), grpc, metrics, run_as_users()) == []


def test_manifests_use_one_image() -> None:
    images = {c["image"] for _, doc in manifests()
              for pod in (doc["spec"], doc["spec"].get("template", {}).get("spec", {}))
              for c in pod.get("containers", [])}
    assert len(images) == 1, images


# -- broken copies: each check can fail -----------------------------------------------------------

KeyPath = str | tuple[str, ...]


def _at(doc: Any, path: KeyPath) -> tuple[Any, Any]:
    """(parent, key) of a path, dotted or a tuple (numbers index lists); the key must exist."""
    *parents, last = path.split(".") if isinstance(path, str) else path
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    assert key in (range(len(node)) if isinstance(node, list) else node), f"{path} is missing"
    return node, key


def rename(path: KeyPath, new: str) -> Callable[[Doc], None]:
    def apply(doc: Doc) -> None:
        parent, key = _at(doc, path)
        parent[new] = parent.pop(key)
    return apply


def setv(path: KeyPath, value: Any) -> Callable[[Doc], None]:
    def apply(doc: Doc) -> None:
        parent, key = _at(doc, path)
        parent[key] = value
    return apply


def add(path: KeyPath, key: str, value: Any) -> Callable[[Doc], None]:
    """Set ``key`` (absent so far) in the mapping at ``path``."""
    def apply(doc: Doc) -> None:
        parent, at = _at(doc, path)
        assert key not in parent[at]
        parent[at][key] = value
    return apply


def extend(path: KeyPath, items: list[Any]) -> Callable[[Doc], None]:
    def apply(doc: Doc) -> None:
        parent, key = _at(doc, path)
        parent[key].extend(items)
    return apply


def delete(path: KeyPath) -> Callable[[Doc], None]:
    def apply(doc: Doc) -> None:
        parent, key = _at(doc, path)
        del parent[key]
    return apply


SR = "ServingRuntime"
IS = "InferenceService"
DEP = "Deployment"
SVC = "Service"
SR_C = "spec.containers.0"
DEP_C = "spec.template.spec.containers.0"

SCHEMA_BREAKS: list[tuple[str, str, Callable[[Doc], None]]] = [
    (SR, "protocolVersion instead of protocolVersions",
     rename("spec.protocolVersions", "protocolVersion")),
    (SR, "httpGet.prot instead of httpGet.port",
     rename(f"{SR_C}.readinessProbe.httpGet.port", "prot")),
    (SR, "containerPort as a string", setv(f"{SR_C}.ports.0.containerPort", "8001")),
    (SR, "an unknown protocol", setv("spec.protocolVersions", ["grpc-v3"])),
    (SR, "no kserve-container", setv(f"{SR_C}.name", "server")),
    (SR, "an annotation that is a number",
     setv(("spec", "annotations", "prometheus.io/port"), 8002)),
    (SR, "a probe with two handlers", add(f"{SR_C}.livenessProbe", "tcpSocket", {"port": 8000})),
    (SR, "autoselect in lower case", rename("spec.supportedModelFormats.0.autoSelect",
                                            "autoselect")),
    (IS, "storageURI instead of storageUri", rename("spec.predictor.model.storageUri",
                                                   "storageURI")),
    (IS, "no protocolVersion", delete("spec.predictor.model.protocolVersion")),
    (IS, "a name starting with a digit", setv("metadata.name", "1smollm2")),
    (IS, "a storage scheme KServe does not download",
     setv("spec.predictor.model.storageUri", "ftp://host/models/")),
    (DEP, "an HTTP probe without a port", delete(f"{DEP_C}.livenessProbe.httpGet.port")),
    (DEP, "an HTTP probe path without its slash",
     setv(f"{DEP_C}.readinessProbe.httpGet.path", "v2/health/ready")),
    (DEP, "a port name longer than 15", setv(f"{DEP_C}.ports.1.name", "prometheus-metrics")),
    (DEP, "a number among the args", setv(f"{DEP_C}.args.2", 8001)),
    (DEP, "a volume mount without mountPath", delete(f"{DEP_C}.volumeMounts.0.mountPath")),
    (DEP, "readOnly misspelt", rename(f"{DEP_C}.volumeMounts.0.readOnly", "readonly")),
    (SVC, "targetport in lower case", rename("spec.ports.0.targetPort", "targetport")),
    (SVC, "a port past 65535", setv("spec.ports.0.port", 70000)),
]


@pytest.mark.parametrize(("kind", "what", "breaks"), SCHEMA_BREAKS,
                         ids=[f"{kind}: {what}" for kind, what, _ in SCHEMA_BREAKS])
def test_schema_rejects_a_broken_copy(kind: str, what: str,
                                      breaks: Callable[[Doc], None]) -> None:
    doc = one(kind)
    assert schema_errors(doc) == []
    breaks(doc)
    assert schema_errors(doc), f"the {kind} schema accepts {what}"


def test_every_schema_has_a_broken_copy() -> None:
    assert {kind for kind, _, _ in SCHEMA_BREAKS} == {kind for _, kind in KINDS}


CONSISTENCY_BREAKS: list[tuple[str, str, Callable[[Doc], None]]] = [
    (SR, "a probe on the metrics port", setv(f"{SR_C}.readinessProbe.httpGet.port", 8002)),
    (SR, "a probe of a route llmopt lacks", setv(f"{SR_C}.livenessProbe.httpGet.path", "/ok")),
    (SR, "a probe naming the port", setv(f"{SR_C}.startupProbe.httpGet.port", "http1")),
    (SR, "the HTTP port changed in one place", setv(f"{SR_C}.ports.0.containerPort", 8080)),
    (SR, "the gRPC port declared instead", setv(f"{SR_C}.ports.0", {
        "name": "h2c", "containerPort": 8001, "protocol": "TCP"})),
    (SR, "HTTP turned off", extend(f"{SR_C}.args", ["--no-http"])),
    (SR, "a flag llmopt serve does not have", setv(f"{SR_C}.args.0", "--models=/mnt/models")),
    (SR, "an abbreviated flag", setv(f"{SR_C}.args.0", "--model-repo=/mnt/models")),
    (SR, "the repository somewhere else", setv(f"{SR_C}.args.0", "--model-repository=/models")),
    (SR, "loopback only", setv(f"{SR_C}.args.1", "--host=127.0.0.1")),
    (SR, "a drain longer than the grace period", setv(f"{SR_C}.args.4", "--grace=60")),
    (SR, "the metrics annotation on another port",
     setv(("spec", "annotations", "prometheus.kserve.io/port"), "9091")),
    (SR, "a protocol it does not serve", setv("spec.protocolVersions", ["v1", "v2", "grpc-v2"])),
    (SR, "gRPC not offered", setv("spec.protocolVersions", ["v2"])),
    (IS, "gRPC without its port", setv("spec.predictor.model.protocolVersion", "grpc-v2")),
    (IS, "the gRPC port declared under another name", add("spec.predictor.model", "ports", [
        {"name": "grpc", "containerPort": 8001}])),
    (IS, "a longer drain in the model's args", add("spec.predictor.model", "args",
                                                     ["--grace=45"])),
    (IS, "another runtime", setv("spec.predictor.model.runtime", "kserve-tritonserver")),
    (IS, "another model format", setv("spec.predictor.model.modelFormat.name", "onnx")),
    (IS, "a single package as storageUri",
     setv("spec.predictor.model.storageUri", "s3://llmopt-models/repository/smollm2")),
    (DEP, "the gRPC port changed in one place", setv(f"{DEP_C}.ports.0.containerPort", 9000)),
    (DEP, "the metrics port changed in one place", setv(f"{DEP_C}.args.3", "--metrics-port=9100")),
    (DEP, "the volume mounted elsewhere", setv(f"{DEP_C}.volumeMounts.0.mountPath", "/data")),
    (DEP, "a mount of a missing volume", setv("spec.template.spec.volumes.0.name", "other")),
    (DEP, "no grace period to drain in", setv("spec.template.spec.terminationGracePeriodSeconds",
                                              5)),
    (DEP, "TLS with plaintext probes",
     extend(f"{DEP_C}.args", ["--tls-cert=/tls/tls.crt", "--tls-key=/tls/tls.key"])),
    (DEP, "command replacing the entrypoint",
     add(DEP_C, "command", ["python", "-m", "llmopt.cli.main"])),
    (SVC, "a selector that matches no pod", setv("spec.selector", {"app": "other"})),
    (SVC, "a target port the container lacks", setv("spec.ports.0.targetPort", "web")),
    (SVC, "no HTTP port", delete("spec.ports.2")),
    (DEP, "an HTTP probe on the gRPC port", setv(f"{DEP_C}.readinessProbe.httpGet.port", 8001)),
    (DEP, "an HTTP probe of a route llmopt lacks",
     setv(f"{DEP_C}.livenessProbe.httpGet.path", "/healthz")),
    (DEP, "HTTP probes with HTTP off", setv(f"{DEP_C}.args.5", "--no-http")),
]


@pytest.mark.parametrize(("kind", "what", "breaks"), CONSISTENCY_BREAKS,
                         ids=[f"{kind}: {what}" for kind, what, _ in CONSISTENCY_BREAKS])
def test_consistency_check_rejects_a_broken_copy(kind: str, what: str,
                                                 breaks: Callable[[Doc], None]) -> None:
    docs = {k: one(k) for k in (SR, IS, DEP, SVC)}
    breaks(docs[kind])
    problems = (kserve_problems(docs[SR], docs[IS]) if kind in (SR, IS)
                else kubernetes_problems(docs[DEP], docs[SVC]))
    assert problems, f"the consistency check accepts {what}"


DOCKERFILE_BREAKS = [
    ("shell-form ENTRYPOINT", 'ENTRYPOINT ["llmopt", "serve"]', "ENTRYPOINT llmopt serve"),
    ("another stop signal", "STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL"),
    ("root", "USER 10001:10001", "USER root"),
    ("no metrics port exposed", "EXPOSE 8000 8001 8002", "EXPOSE 8000 8001"),
    ("no HTTP port exposed", "EXPOSE 8000 8001 8002", "EXPOSE 8001 8002"),
    ("an unknown flag in CMD", '"--grace", "25"', '"--drain", "25"'),
    ("an abbreviated flag in CMD", '"--grace", "25"', '"--gr", "25"'),
]


@pytest.mark.parametrize(("what", "old", "new"), DOCKERFILE_BREAKS,
                         ids=[what for what, _, _ in DOCKERFILE_BREAKS])
def test_dockerfile_check_rejects_a_broken_copy(what: str, old: str, new: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new), {8001}, {8002}, run_as_users())
    assert problems, f"the Dockerfile check accepts {what}"


def test_an_inference_service_on_grpc_declares_the_grpc_port() -> None:
    """The variant inferenceservice.yaml describes in its comments: protocolVersion grpc-v2 and
    the h2c port in place of the runtime's; the wrong port number is caught."""
    isvc = one("InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    model.update(protocolVersion="grpc-v2",
                 ports=[{"name": "h2c", "containerPort": 8001, "protocol": "TCP"}])
    assert schema_errors(isvc) == []
    assert kserve_problems(one("ServingRuntime"), isvc) == []
    model["ports"][0]["containerPort"] = 8000
    assert any("binds port 8001" in p for p in kserve_problems(one("ServingRuntime"), isvc))
