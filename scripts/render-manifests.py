#!/usr/bin/env python3
"""Render and check the Helm chart offline, and keep manifests/ in step with it.

    python3 scripts/render-manifests.py           # write manifests/chart/*.yaml and charts/clip/crds/
    python3 scripts/render-manifests.py --check   # fail if any of them is stale (CI)

Needs `python3 -m pip install helm-python-sdk kubernetes-validate jsonschema`: helm-python-sdk
is Helm v4's Go SDK as a shared library (render, lint, values schema) with no helm binary and
no cluster; kubernetes-validate holds the JSON schemas of the built-in kinds.

What it checks, in order:
  1. Chart.yaml appVersion is the workspace version (Cargo.toml).
  2. charts/clip/crds/ holds exactly manifests/crds/ (crdgen's output).
  3. Every value in values.yaml has a comment; values.schema.json closes every object
     (additionalProperties false, or a schema for maps), and rejects misspelt values.
  4. The chart lints (strict, Kubernetes 1.33) with its defaults and with every scenario below.
  5. Every object of every scenario validates against the Kubernetes 1.33 schemas (strict:
     unknown fields fail); ServiceMonitor, which is not a built-in kind, is checked by hand.
     With the keeper on, it and the node plugin name one socket file on the host, and the
     keeper runs unprivileged where the plugin runs. RBAC: no wildcard, Secrets only by get,
     and the node plugin may only get ClipImages. Contradictory settings are refused at
     render time.
  6. manifests/examples/: Pods and Deployments against the Kubernetes schemas, ClipImages
     against the CRD's openAPIV3Schema (with unknown fields refused), and every clipImage a
     volume names exists among the examples.
  7. manifests/chart/default.yaml (default values) and quickstart.yaml (with the quickstart
     Redis Cluster) are what the chart renders.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import jsonschema
import kubernetes_validate
import yaml

try:
    import helm_python as helm
except ImportError:  # pragma: no cover - a message beats a traceback
    sys.exit("render-manifests: needs helm-python-sdk (python3 -m pip install helm-python-sdk)")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "clip"
CRD_SOURCE = ROOT / "manifests" / "crds"
CHART_OUT = ROOT / "manifests" / "chart"
EXAMPLES = ROOT / "manifests" / "examples"
KUBE_VERSION = "1.33.0"
RELEASE = "clip"
NAMESPACE = "clip-system"
DRIVER = "csi.clip.dev"

# Helm's install order (pkg/release/util/kind_sorter.go); kinds not listed go last.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]
CLUSTER_SCOPED = {
    "Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "CSIDriver",
    "PriorityClass", "StorageClass", "PersistentVolume",
}
NOT_BUILT_IN = {"ServiceMonitor"}


class Failure(Exception):
    """A check failed; the message says which and why."""


# Scenarios: (name, values, kinds that must appear).
EXTERNAL_TLS = {
    "redis": {
        "seeds": ["redis-0.redis.example.svc:6379", "redis-1.redis.example.svc:6379"],
        "username": "clip",
        "passwordSecret": {"name": "clip-redis", "key": "password"},
        "tls": {"enabled": True, "caSecret": {"name": "clip-redis-ca", "key": "ca.crt"}},
        "ttl": 86400,
        "optional": True,
    },
    "controller": {
        "replicas": 2,
        "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        "podAnnotations": {"example.com/team": "images"},
        "serviceAccount": {"create": True, "name": "clip-indexer", "annotations": {"a": "b"}},
    },
    "node": {
        "requireClipImages": True,
        "updateStrategy": {"type": "OnDelete"},
        "priorityClassName": "",
        "extraArgs": ["--no-reserve-on-start"],
        "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "node-role.kubernetes.io/gpu", "operator": "Exists"}]}]}}},
        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "4Gi"}},
        "keeper": {"holdSeconds": 120, "resources": {"requests": {"cpu": "5m"}, "limits": {"memory": "32Mi"}},
                   "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}},
    },
    "registry": {"insecure": ["registry.local:5000", "mirror.local:5000"], "platform": "linux/arm64"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "imagePullSecrets": [{"name": "ghcr"}],
    "commonLabels": {"example.com/owner": "platform"},
    "kubeletDir": "/var/lib/k0s/kubelet",
    "fullnameOverride": "images",
}
QUICKSTART_FULL = {
    "redis": {
        "passwordSecret": {"name": "clip-redis", "key": "password"},
        "deploy": {"enabled": True, "persistence": {"enabled": True, "size": "2Gi",
                                                    "storageClass": "standard"}},
    },
    "controller": {"replicas": 2},
    "serviceMonitor": {"enabled": True},
}
SCENARIOS: list[tuple[str, dict[str, Any], set[str]]] = [
    ("default values", {}, {"CSIDriver", "DaemonSet", "ServiceAccount", "ClusterRole",
                            "ClusterRoleBinding", "Service"}),
    ("quickstart Redis", {"redis": {"deploy": {"enabled": True}}},
     {"Deployment", "StatefulSet", "Job", "ConfigMap", "Role", "RoleBinding"}),
    ("quickstart Redis with a password, persistence, 2 controllers, ServiceMonitors",
     QUICKSTART_FULL, {"Deployment", "StatefulSet", "Job", "ServiceMonitor"}),
    ("external Redis with TLS, private CA, ACL user, every optional value", EXTERNAL_TLS,
     {"Deployment", "ServiceMonitor", "Role"}),
    ("the values of e2e/kind/run.sh", {"image": {"tag": "e2e"}, "redis": {"deploy": {"enabled": True}},
                                        "registry": {"insecure": ["registry.default.svc.cluster.local:5000"]}},
     {"Deployment", "StatefulSet", "Job"}),
    ("no keeper", {"node": {"keeper": {"enabled": False}}}, {"DaemonSet"}),
    ("no leader election", {"redis": {"seeds": ["redis:6379"]},
                            "controller": {"leaderElection": {"enabled": False, "leaseName": ""}}},
     {"Deployment"}),
]
# Settings the schema cannot refuse but the templates must.
CONTRADICTIONS = [
    ("seeds and the quickstart cluster", {"redis": {"seeds": ["r:6379"], "deploy": {"enabled": True}}}),
    ("TLS to the quickstart cluster", {"redis": {"deploy": {"enabled": True}, "tls": {"enabled": True}}}),
    ("2 controllers without leader election",
     {"redis": {"seeds": ["r:6379"]}, "controller": {"replicas": 2, "leaderElection": {"enabled": False}}}),
]
# Misspelt or mistyped values the schema must refuse.
TYPOS = [
    {"nodee": {"cacheSize": "10GiB"}},
    {"node": {"cacheSise": "10GiB"}},
    {"node": {"registrar": {"image": {"tagg": "v2"}}}},
    {"node": {"resources": {"request": {"cpu": "1"}}}},
    {"node": {"tolerations": [{"operator": "Exists", "efect": "NoSchedule"}]}},
    {"controller": {"replicas": "two"}},
    {"controller": {"leaderElection": {"enable": True}}},
    {"redis": {"seeds": "redis:6379"}},
    {"redis": {"passwordSecret": {"name": "x", "keys": "password"}}},
    {"redis": {"deploy": {"enable": True}}},
    {"node": {"cacheSize": "20Gi"}},
    {"node": {"keeper": {"holdSecond": 60}}},
    {"node": {"keeper": {"holdSeconds": 0}}},
    {"node": {"keeper": {"updateStrategy": {"type": "Recreate"}}}},
    {"node": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}},
    {"serviceMonitor": {"enabled": True, "intervall": "30s"}},
]


def log(message: str) -> None:
    print(f"render-manifests: {message}", flush=True)


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def step(description: str, fn: Callable[[], str | None]) -> None:
    try:
        detail = fn()
    except Failure as e:
        raise Failure(f"{description}: {e}") from None
    log(f"ok   {description}" + (f" ({detail})" if detail else ""))


# 1. versions ---------------------------------------------------------------------------------

def check_versions() -> str:
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    workspace = cargo["workspace"]["package"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    if str(chart["appVersion"]) != workspace:
        raise Failure(f"Chart.yaml appVersion {chart['appVersion']} != Cargo.toml version {workspace}")
    return f"appVersion {workspace}"


# 2. CRDs ---------------------------------------------------------------------------------------

def crd_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(CRD_SOURCE.glob("*.yaml"))}


def sync_crds(check: bool) -> str:
    stale: list[str] = []
    wanted = crd_files()
    if not wanted:
        raise Failure(f"no CRDs in {CRD_SOURCE}")
    target = CHART / "crds"
    present = {p.name: p.read_text() for p in sorted(target.glob("*"))} if target.is_dir() else {}
    for name, text in wanted.items():
        if present.get(name) != text:
            if check:
                stale.append(f"charts/clip/crds/{name} differs from manifests/crds/{name}")
            else:
                target.mkdir(parents=True, exist_ok=True)
                (target / name).write_text(text)
    for name in present.keys() - wanted.keys():
        if check:
            stale.append(f"charts/clip/crds/{name} is not in manifests/crds/")
        else:
            (target / name).unlink()
    if stale:
        raise Failure("; ".join(stale) + f"\n  {FIX}")
    return ", ".join(wanted)


# 3. values.yaml and its schema -----------------------------------------------------------------

# Keys under these hold Kubernetes' or the user's own data (quantities, labels), not chart values.
FREE_FORM_PARENTS = {"requests", "limits", "nodeSelector", "podAnnotations", "podLabels",
                     "annotations", "labels", "commonLabels"}
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/\"]+):(\s|$)")


def check_values_commented() -> str:
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mapping keys
    list_indent: int | None = None  # inside a list item: its contents are data
    missing, count = [], 0
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if list_indent is not None and indent > list_indent:
            continue
        list_indent = None
        if stripped.startswith("- "):
            list_indent = indent
            continue
        m = KEY_LINE.match(line)
        if not m:
            continue
        while parents and parents[-1][0] >= indent:
            parents.pop()
        key = m.group("key")
        parent = parents[-1][1] if parents else None
        parents.append((indent, key))
        if parent in FREE_FORM_PARENTS or any(p in FREE_FORM_PARENTS for _, p in parents[:-1]):
            continue
        count += 1
        previous = lines[n - 2].strip() if n >= 2 else ""
        if not previous.startswith("#") and " #" not in line:
            path = ".".join(k for _, k in parents)
            missing.append(f"values.yaml:{n}: {path} has no comment")
    if missing:
        raise Failure("\n  ".join(missing))
    return f"{count} values"


# Objects whose content is a Kubernetes API type passed through as is (node affinity terms,
# env valueFrom) or Helm's own: left open here, and checked field by field by the strict
# Kubernetes schemas once rendered.
OPEN_OBJECTS = {
    "/properties/global",
    "/definitions/affinity/properties/nodeAffinity",
    "/definitions/affinity/properties/podAffinity",
    "/definitions/affinity/properties/podAntiAffinity",
    "/definitions/env/items/properties/valueFrom",
}


def check_schema_closed() -> str:
    schema = json.loads((CHART / "values.schema.json").read_text())
    problems: list[str] = []
    closed = maps = 0

    def walk(node: Any, path: str) -> None:
        nonlocal closed, maps
        if isinstance(node, dict):
            if node.get("type") == "object":
                extra = node.get("additionalProperties", True)
                if extra is False:
                    closed += 1
                elif isinstance(extra, dict) and "properties" not in node:
                    maps += 1  # a map: any key, values of one schema
                elif path not in OPEN_OBJECTS:
                    problems.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "")
    if problems:
        raise Failure("objects that accept unknown keys: " + ", ".join(problems))
    return f"{closed} objects closed, {maps} maps, {len(OPEN_OBJECTS)} Kubernetes/Helm pass-through objects"


def check_typos(chart: Any) -> str:
    chart.validate_schema({})  # the defaults themselves
    for values in TYPOS:
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError:
            pass
        else:
            raise Failure(f"values.schema.json accepted {json.dumps(values)}")
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmValuesError:
            continue
        raise Failure(f"rendering accepted {json.dumps(values)}")
    report = helm.lint(str(CHART), TYPOS[0], strict=True, kube_version=f"v{KUBE_VERSION}")
    if not report.get("errors"):
        raise Failure(f"helm lint accepted {json.dumps(TYPOS[0])}")
    return f"{len(TYPOS)} misspelt values refused, e.g. `nodee:`"


# 4. lint ---------------------------------------------------------------------------------------

def lint(values: dict[str, Any]) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    # Severity 1 is information ("icon is recommended"); 2 warning, 3 error.
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if problems or report.get("errors"):
        raise Failure("; ".join(f"{m['path']}: {m['error'].strip()}" for m in problems)
                      or "; ".join(report["errors"]))


# 5. render and validate -------------------------------------------------------------------------

def render(chart: Any, values: dict[str, Any], include_crds: bool) -> list[tuple[str, str]]:
    """(source, document) pairs in Helm's install order, hooks last, like `helm template`."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, revision=1, is_install=True)
    docs: list[tuple[tuple[int, int, str, int], str, str]] = []
    for source, text in sorted(rendered.items()):
        if source.endswith("NOTES.txt"):
            continue
        for i, doc in enumerate(re.split(r"(?m)^---\s*$", text)):
            doc = doc.strip()
            if not doc:
                continue
            obj = yaml.safe_load(doc)
            if not obj:
                continue
            kind = obj.get("kind", "")
            hook = "helm.sh/hook" in (obj.get("metadata", {}).get("annotations") or {})
            order = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
            docs.append(((1 if hook else 0, order, source, i), source, doc))
    docs.sort(key=lambda d: d[0])
    out = [(source, doc) for _, source, doc in docs]
    if include_crds:
        crds = [(f"clip/{c['name']}", c["data"].strip()) for c in chart.crds]
        out = crds + out
    return out


def validate_object(obj: dict[str, Any], where: str) -> None:
    kind = obj.get("kind")
    name = obj.get("metadata", {}).get("name", "?")
    if kind in NOT_BUILT_IN:
        check_service_monitor(obj, where)
        return
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise Failure(f"{where}: {kind}/{name}: {path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError:
        raise Failure(f"{where}: {kind}/{name}: no Kubernetes {KUBE_VERSION} schema for "
                      f"{obj.get('apiVersion')} {kind}") from None


def check_service_monitor(obj: dict[str, Any], where: str) -> None:
    """The fields the chart sets, as monitoring.coreos.com/v1 names them."""
    allowed_spec = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
    allowed_endpoint = {"port", "path", "interval", "scrapeTimeout", "relabelings", "scheme"}
    spec = obj.get("spec", {})
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        raise Failure(f"{where}: ServiceMonitor apiVersion {obj.get('apiVersion')}")
    if set(spec) - allowed_spec or not spec.get("endpoints") or "matchLabels" not in spec.get("selector", {}):
        raise Failure(f"{where}: ServiceMonitor spec {sorted(spec)}")
    for ep in spec["endpoints"]:
        if set(ep) - allowed_endpoint or not ep.get("port"):
            raise Failure(f"{where}: ServiceMonitor endpoint {sorted(ep)}")


def check_invariants(objects: list[dict[str, Any]], where: str) -> None:
    services = {}
    for obj in objects:
        kind, meta = obj["kind"], obj["metadata"]
        ident = f"{kind}/{meta['name']}"
        if len(meta["name"]) > 63:
            raise Failure(f"{where}: {ident}: name longer than 63 characters")
        if kind in CLUSTER_SCOPED:
            if "namespace" in meta:
                raise Failure(f"{where}: {ident} is cluster-scoped but has a namespace")
        elif meta.get("namespace") != NAMESPACE:
            raise Failure(f"{where}: {ident} is not in the release namespace")
        if kind != "CustomResourceDefinition" and "app.kubernetes.io/instance" not in (meta.get("labels") or {}):
            raise Failure(f"{where}: {ident} lacks the common labels")
        if kind == "Service":
            services[meta["name"]] = obj
    for obj in objects:
        if obj["kind"] not in ("DaemonSet", "Deployment", "StatefulSet"):
            continue
        pod_labels = obj["spec"]["template"]["metadata"]["labels"]
        selector = obj["spec"]["selector"]["matchLabels"]
        if any(pod_labels.get(k) != v for k, v in selector.items()):
            raise Failure(f"{where}: {obj['kind']}/{obj['metadata']['name']}: selector does not match its pods")
    for svc in services.values():
        sel = svc["spec"].get("selector", {})
        if not any(all(o["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
                   for o in objects if o["kind"] in ("DaemonSet", "Deployment", "StatefulSet")):
            raise Failure(f"{where}: Service/{svc['metadata']['name']} selects no pods")


def check_own_images(chart: Any, values: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    """The node plugin and controller images carry image.tag, else the appVersion."""
    tag = values.get("image", {}).get("tag") or chart.metadata["appVersion"]
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if c["image"].startswith("ghcr.io/clip-dev/") and not c["image"].endswith(f":{tag}"):
                raise Failure(f"{obj['kind']}/{obj['metadata']['name']}: image {c['image']}, expected tag {tag}")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def socket_on_host(obj: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(host directory, path below it) of a file a container sees at `path`."""
    mounts = [m for m in container.get("volumeMounts", [])
              if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        raise Failure(f"{container['name']} has no volume holding {path}")
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod_spec(obj)["volumes"] if v["name"] == mount["name"])
    if "hostPath" not in volume:
        raise Failure(f"{container['name']}: {path} is not on a hostPath volume")
    return volume["hostPath"]["path"].rstrip("/"), path[len(mount["mountPath"].rstrip("/")):]


def check_keeper(values: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    """With node.keeper.enabled (the default), a keeper DaemonSet runs on the plugin's nodes,
    unprivileged and without a token, and the plugin and the keeper name one socket file on
    the host; without it, no keeper and no --keeper-socket."""
    def daemonset(component: str) -> dict[str, Any] | None:
        return next((o for o in objects if o["kind"] == "DaemonSet" and
                     o["metadata"]["labels"].get("app.kubernetes.io/component") == component), None)
    node, keeper = daemonset("node"), daemonset("keeper")
    if node is None:
        raise Failure("no node plugin DaemonSet")
    plugin = next(c for c in pod_spec(node)["containers"] if c["name"] == "clip-node")
    flags = [a for a in plugin["args"] if a.startswith("--keeper-socket=")]
    enabled = values.get("node", {}).get("keeper", {}).get("enabled", True)
    if not enabled:
        if keeper is not None or flags:
            raise Failure("node.keeper.enabled is false, yet a keeper or --keeper-socket is rendered")
        return
    if keeper is None or len(flags) != 1:
        raise Failure("node.keeper.enabled, but no keeper DaemonSet or no --keeper-socket for the plugin")
    (container,) = pod_spec(keeper)["containers"]
    sockets = [a for a in container["args"] if a.startswith("--socket=")]
    if container["args"][2:3] != ["keeper"] or len(sockets) != 1:
        raise Failure(f"keeper args {container['args']}")
    if container["image"] != plugin["image"]:
        raise Failure(f"keeper image {container['image']} is not the plugin's {plugin['image']}")
    ours = socket_on_host(keeper, container, sockets[0].split("=", 1)[1])
    theirs = socket_on_host(node, plugin, flags[0].split("=", 1)[1])
    if ours != theirs:
        raise Failure(f"the keeper listens on {''.join(ours)} but the plugin connects to {''.join(theirs)}")
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName"):
        if pod_spec(keeper).get(key) != pod_spec(node).get(key):
            raise Failure(f"the keeper's {key} is not the plugin's")
    sc = container.get("securityContext", {})
    if (pod_spec(keeper).get("automountServiceAccountToken") is not False or sc.get("privileged")
            or sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]
            or sc.get("readOnlyRootFilesystem") is not True):
        raise Failure("the keeper must run without a token, privileges or capabilities, on a read-only root")


def check_rbac(objects: list[dict[str, Any]], where: str) -> None:
    """Least privilege: no wildcard, no Secret listed or watched by anyone, and the node
    plugin may only get ClipImages (the Secrets it uses come from kubelet, named by pods)."""
    for obj in objects:
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        rules = obj.get("rules") or []
        for rule in rules:
            for key in ("apiGroups", "resources", "verbs"):
                if "*" in rule.get(key, []):
                    raise Failure(f"{where}: {ident}: wildcard {key}")
            if "secrets" in rule.get("resources", []) and set(rule["verbs"]) - {"get"}:
                raise Failure(f"{where}: {ident}: Secrets beyond get: {rule['verbs']}")
        component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if component == "node":
            granted = {(g, r, v) for rule in rules for g in rule["apiGroups"]
                       for r in rule["resources"] for v in rule["verbs"]}
            if granted != {("clip.dev", "clipimages", "get")}:
                raise Failure(f"{where}: {ident}: the node plugin may only get ClipImages, has {sorted(granted)}")


def check_scenario(chart: Any, name: str, values: dict[str, Any], kinds: set[str]) -> str:
    try:
        lint(values)
    except Failure as e:
        raise Failure(f"lint: {e}") from None
    docs = render(chart, values, include_crds=True)
    objects = []
    for source, doc in docs:
        obj = yaml.safe_load(doc)
        validate_object(obj, source)
        objects.append(obj)
    missing = kinds - {o["kind"] for o in objects}
    if missing:
        raise Failure(f"no {', '.join(sorted(missing))} rendered")
    check_invariants([o for o in objects if o["kind"] != "CustomResourceDefinition"], name)
    check_own_images(chart, values, objects)
    check_keeper(values, objects)
    check_rbac(objects, name)
    return f"{len(objects)} objects"


def check_contradictions(chart: Any) -> str:
    for what, values in CONTRADICTIONS:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmRenderError:
            continue
        raise Failure(f"the chart rendered {what}: {json.dumps(values)}")
    return f"{len(CONTRADICTIONS)} refused"


# 6. examples -----------------------------------------------------------------------------------

def strict_crd_schema(node: Any) -> Any:
    """The CRD's structural schema as plain JSON Schema: `nullable` allows null, and objects
    with declared properties refuse others (the API server's strict field validation)."""
    if isinstance(node, list):
        return [strict_crd_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_crd_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    out.pop("format", None)  # int64/uint64: informative only here
    return out


def clip_image_schema() -> dict[str, Any]:
    crd = yaml.safe_load((CRD_SOURCE / "clipimage.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strict_crd_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version['name']}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                "maxLength": 253}},
    }
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return schema


def csi_volumes(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    return [v["csi"] for v in pod.get("volumes", []) if "csi" in v]


def check_examples() -> str:
    schema = clip_image_schema()
    validator = jsonschema.Draft202012Validator(schema)
    clip_images: set[tuple[str, str]] = set()
    referenced: list[tuple[str, str, str]] = []
    count = direct = 0
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for obj in load_all(path.read_text()):
            count += 1
            where = f"manifests/examples/{path.name}"
            if obj.get("kind") == "ClipImage":
                errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
                if errors:
                    e = errors[0]
                    raise Failure(f"{where}: ClipImage/{obj.get('metadata', {}).get('name')}: "
                                  f"{'.'.join(map(str, e.path))}: {e.message}")
                meta = obj["metadata"]
                clip_images.add((meta.get("namespace", "default"), meta["name"]))
                continue
            validate_object(obj, where)
            ns = obj["metadata"].get("namespace", "default")
            for csi in csi_volumes(obj):
                if csi.get("driver") != DRIVER or csi.get("readOnly") is not True:
                    raise Failure(f"{where}: a csi volume must use driver {DRIVER} with readOnly: true")
                attrs = csi.get("volumeAttributes", {})
                if ("clipImage" in attrs) == ("image" in attrs):
                    raise Failure(f"{where}: volumeAttributes needs exactly one of clipImage, image")
                if "clipImage" in attrs:
                    referenced.append((where, ns, attrs["clipImage"]))
                else:
                    direct += 1
    for where, ns, name in referenced:
        if (ns, name) not in clip_images:
            raise Failure(f"{where}: names ClipImage {ns}/{name}, which no example defines")
    if not direct:
        raise Failure("no example mounts an image directly")
    return f"{count} objects, {len(clip_images)} ClipImages"


# 7. outputs ------------------------------------------------------------------------------------

FIX = "stale: run `python3 scripts/render-manifests.py` and commit the result"

HEADER = """\
# Generated by scripts/render-manifests.py; do not edit. The clip chart rendered {what}
# as release "{release}" in namespace "{namespace}", CRDs included, like
#   helm template {release} charts/clip --namespace {namespace} --include-crds{flags}
# Apply with: kubectl create namespace {namespace} && kubectl apply -f THIS_FILE
"""

OUTPUTS = [
    ("default.yaml", "with its default values", {}, ""),
    ("quickstart.yaml", "with the quickstart Redis Cluster", {"redis": {"deploy": {"enabled": True}}},
     " --set redis.deploy.enabled=true"),
]


def output_text(chart: Any, what: str, values: dict[str, Any], flags: str) -> str:
    parts = [HEADER.format(what=what, release=RELEASE, namespace=NAMESPACE, flags=flags)]
    for source, doc in render(chart, values, include_crds=True):
        parts.append(f"---\n# Source: {source}\n{doc}\n")
    return "".join(parts)


def write_outputs(chart: Any, check: bool) -> str:
    stale: list[str] = []
    for name, what, values, flags in OUTPUTS:
        text = output_text(chart, what, values, flags)
        path = CHART_OUT / name
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if check:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(),
                                        f"{path.relative_to(ROOT)} (committed)",
                                        f"{path.relative_to(ROOT)} (rendered)", lineterm="", n=2)
            stale.append(f"{path.relative_to(ROOT)} is stale:\n" + "\n".join(list(diff)[:60]))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        raise Failure("\n".join(stale) + f"\n  {FIX}")
    return ", ".join(f"manifests/chart/{n}" for n, *_ in OUTPUTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; fail if a generated file is stale")
    args = parser.parse_args()
    log(f"helm-python-sdk {helm.__version__} (Helm {helm.helm_sdk_version()}), "
        f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {KUBE_VERSION}")
    try:
        step("Chart.yaml appVersion matches Cargo.toml", check_versions)
        step("charts/clip/crds/ is manifests/crds/", lambda: sync_crds(args.check))
        with helm.Chart.load(str(CHART)) as chart:
            step("every value in values.yaml is commented", check_values_commented)
            step("values.schema.json refuses unknown keys at every level", check_schema_closed)
            step("misspelt values are refused", lambda: check_typos(chart))
            for name, values, kinds in SCENARIOS:
                step(f"lint + Kubernetes {KUBE_VERSION} schemas: {name}",
                     lambda v=values, k=kinds, n=name: check_scenario(chart, n, v, k))
            step("contradictory settings are refused", lambda: check_contradictions(chart))
            step("manifests/examples/ validate", check_examples)
            step("rendered manifests are current" if args.check else "rendered manifests written",
                 lambda: write_outputs(chart, args.check))
    except (Failure, helm.HelmError) as e:
        log(f"FAIL {e}")
        return 1
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
