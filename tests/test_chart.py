"""The Helm chart charts/loco-operator, rendered and linted by the real Helm engine.

helm-python-sdk wraps Helm v4's Go SDK (no helm binary): ``Chart.render`` is ``helm template``,
``lint`` is ``helm lint``, and values go through the chart's values.schema.json exactly as on
``helm install``. Every rendered built-in object is validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail); custom resources against their CRD's schema.

The helpers here are shared with tests/test_chart_rbac.py and tests/test_dashboards.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the dev extra: pip install -e '.[dev]'")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")

REPO = Path(__file__).resolve().parents[1]
#: The chart under test; LOCO_CHART_DIR points the tests at another copy (e.g. an unpacked release).
CHART_DIR = Path(os.environ.get("LOCO_CHART_DIR", REPO / "charts" / "loco-operator"))
CRD_FILE = REPO / "crds" / "trainingjob.yaml"
RELEASE = "loco"
NAMESPACE = "loco-system"
#: Kubernetes version the manifests are validated against (kubectl on these machines is 1.32).
KUBE_VERSION = "1.32"


# ------------------------------------------------------------------------------------- helpers


def load_chart() -> Any:
    """The chart, loaded by Helm's own loader (the crds/ symlink resolved)."""
    if not CRD_FILE.exists():
        pytest.fail(f"{CRD_FILE.relative_to(REPO)} is missing: generate it with `make crds` (loco crds --write)")
    helm.disable_logging()  # the loader logs an INFO line for the crds/ symlink on every load
    return helm.Chart.load(CHART_DIR)


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object the chart's templates render with ``values`` (NOTES.txt and empty documents dropped)."""
    with load_chart() as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of ``kind`` (fails when there are none or several)."""
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata'].get('name') for o in found]}"
    return found[0]


def chart_crds() -> list[dict[str, Any]]:
    """The CRD objects the chart installs from crds/, as Helm loads them."""
    with load_chart() as chart:
        return [doc for entry in chart.crds for doc in yaml.safe_load_all(entry["data"]) if doc]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator container of the Deployment."""
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


#: Custom resources the chart may render, and how to validate them offline.
#: Kopf's peering kinds: against the CRDs the chart ships. Prometheus Operator kinds: their CRDs are
#: not available offline, so against the fields the chart relies on (see _MONITOR_SCHEMA).
def _monitoring_object(spec: dict[str, Any]) -> dict[str, Any]:
    """A monitoring.coreos.com/v1 object's schema around ``spec``'s."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": spec,
        },
    }


_MONITOR_SCHEMA = _monitoring_object({
    "type": "object",
    "required": ["selector"],
    "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
        "namespaceSelector": {"type": "object"},
        "endpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["port", "path"]}},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["port", "path"]}},
    },
})

#: PrometheusRule: the fields of the Prometheus Operator's CRD the chart uses (spec.groups[].rules[]), strict.
_RULE = {
    "type": "object", "required": ["expr"], "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": "string"},
        "for": {"type": "string", "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_RULE_SCHEMA = _monitoring_object({
    "type": "object", "required": ["groups"], "additionalProperties": False,
    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "rules"], "additionalProperties": False,
        "properties": {"name": {"type": "string"}, "interval": {"type": "string"},
                       "rules": {"type": "array", "minItems": 1, "items": _RULE}}}}},
})


def validate_object(obj: dict[str, Any]) -> None:
    """Validate one rendered object: strict Kubernetes OpenAPI schema, or its CRD's schema."""
    kind, name = obj["kind"], obj["metadata"].get("name")
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(obj, _RULE_SCHEMA if kind == "PrometheusRule" else _MONITOR_SCHEMA)
        return
    if obj["apiVersion"].startswith("kopf.dev/"):
        crd = next(c for c in chart_crds() if c["spec"]["names"]["kind"] == kind)
        jsonschema.validate(obj, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        return
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.absolute_path)
        pytest.fail(f"{kind}/{name}: {exc.message} at {path or '<root>'}")


# ------------------------------------------------------------------------------------- toggles

#: Every documented toggle (values.yaml), each rendered, validated and linted.
TOGGLES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "ha-peering-clusterwide": {"replicaCount": 3},
    "ha-peering-namespaced": {"replicaCount": 2, "watchNamespaces": ["team-a"]},
    "monitors": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                             "podMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "podmonitor-namespaces": {"watchNamespaces": ["team-a"], "metrics": {"podMonitor": {"enabled": True}}},
    "prometheusrule": {"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}},
    "no-dashboards": {"dashboards": {"enabled": False}},
    "dashboards-elsewhere": {"dashboards": {"namespace": "monitoring", "annotations": {"grafana_folder": "Loco"}}},
    "no-metrics-service": {"metrics": {"service": {"enabled": False}}},
    "node-lost-grace": {"nodeLostGraceSeconds": 300},
    "cordon-nodes": {"faultIsolation": {"cordonNodes": True}},
    "existing-serviceaccount": {"serviceAccount": {"create": False, "name": "ops-sa"}},
    "no-rbac": {"rbac": {"create": False}},
    "debug": {"logLevel": "debug"},
    "scheduling": {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
    },
    "image-and-extras": {
        "image": {"repository": "registry.example.com/loco-operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "extraArgs": ["--context=prod"],
        "podAnnotations": {"example.com/team": "ml"},
        "podLabels": {"team": "ml"},
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
        "metrics": {"port": 9191, "service": {"port": 80, "type": "NodePort", "annotations": {"prometheus.io/scrape": "true"}}},
        "health": {"port": 8181},
    },
}


@pytest.mark.parametrize("values", TOGGLES.values(), ids=TOGGLES.keys())
def test_every_toggle_renders_valid_kubernetes_objects(values: dict[str, Any]) -> None:
    objects = render(values)
    assert objects, "nothing rendered"
    for obj in objects:
        validate_object(obj)
    assert one(objects, "Deployment")["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("values", TOGGLES.values(), ids=TOGGLES.keys())
def test_lint_is_clean_with_every_toggle(values: dict[str, Any]) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == [], report["messages"]
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_crds_validate_against_the_kubernetes_schema() -> None:
    crds = chart_crds()
    assert {c["metadata"]["name"] for c in crds} == {
        "trainingjobs.loco.dev", "populations.loco.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev",
    }
    for crd in crds:
        validate_object(crd)


# ------------------------------------------------------------------------------- values schema

#: Bad values and the words Helm's schema error must contain (the key and the violated constraint).
BAD_VALUES = {
    "negative-replicas": ({"replicaCount": -1}, ["/replicaCount", "minimum"]),
    "tag-not-a-string": ({"image": {"tag": 5}}, ["/image/tag", "string"]),
    "unknown-top-level-key": ({"replicas": 2}, ["additional properties", "replicas"]),
    "unknown-nested-key": ({"metrics": {"serviceMonitor": {"enable": True}}}, ["/metrics/serviceMonitor", "enable"]),
    "bad-log-level": ({"logLevel": "verbose"}, ["/logLevel"]),
    "bad-namespace": ({"watchNamespaces": ["Team_A"]}, ["/watchNamespaces/0"]),
    "port-out-of-range": ({"metrics": {"port": 70000}}, ["/metrics/port", "maximum"]),
    "bad-pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, ["/image/pullPolicy"]),
    "bad-interval": ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, ["/metrics/serviceMonitor/interval"]),
    "cordon-not-a-boolean": ({"faultIsolation": {"cordonNodes": "yes"}}, ["/faultIsolation/cordonNodes", "boolean"]),
}


@pytest.mark.parametrize(("values", "words"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_value_fails_install_naming_the_key(values: dict[str, Any], words: list[str]) -> None:
    with load_chart() as chart:
        with pytest.raises(helm.HelmValuesError) as validated:
            chart.validate_schema(values)
        with pytest.raises(helm.HelmValuesError) as installed:  # the install path (render) refuses it too
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    for exc in (validated.value, installed.value):
        for word in words:
            assert word in str(exc), f"{word!r} not in Helm's message: {exc}"


def test_lint_reports_a_bad_value() -> None:
    report = helm.lint(CHART_DIR, {"replicaCount": -1}, namespace=NAMESPACE)
    assert any("/replicaCount" in e for e in report["errors"]), report


def test_serviceaccount_name_is_required_without_creating_one() -> None:
    with pytest.raises(helm.HelmRenderError, match="serviceAccount.name is required"):
        render({"serviceAccount": {"create": False}})


def test_servicemonitor_needs_the_metrics_service() -> None:
    with pytest.raises(helm.HelmRenderError, match="metrics.serviceMonitor.enabled needs metrics.service.enabled"):
        render({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})


def _leaf_paths(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        return [p for k, v in values.items() for p in _leaf_paths(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def test_every_value_is_typed_and_described_in_the_schema() -> None:
    with load_chart() as chart:
        defaults, schema = chart.values, chart.schema
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(defaults, schema)
    for path in _leaf_paths(defaults):
        node = schema
        for part in path.split("."):
            assert node.get("type") == "object", f"{path}: schema node above {part!r} is not an object"
            if "properties" not in node and "additionalProperties" not in node:
                break  # a free-form Kubernetes object (securityContext, affinity): Kubernetes validates it
            node = node.get("properties", {}).get(part) or node.get("additionalProperties")
            assert isinstance(node, dict), f"{path}: not in values.schema.json"
        assert node.get("type") or node.get("enum"), f"{path}: no type in values.schema.json"
    for path, node in _schema_properties(schema):
        assert node.get("description"), f"{path}: no description in values.schema.json"


def _schema_properties(schema: dict[str, Any], prefix: str = ""):
    for name, node in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield path, node
        yield from _schema_properties(node, path)


def test_every_key_in_values_yaml_is_documented() -> None:
    """Each leaf key of values.yaml has a comment right above it or above one of its parent keys
    (a free-form block such as resources or securityContext is documented once, at its top)."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = i > 0 and lines[i - 1].strip().startswith("#")
        is_parent = match.group(3).strip() == "" and i + 1 < len(lines) and (
            len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
        )
        if not is_parent and not documented and not any(d for _, d in stack):
            undocumented.append(f"line {i + 1}: {match.group(2)}")
        stack.append((indent, documented))
    assert undocumented == [], f"keys without a comment in values.yaml: {undocumented}"


# ------------------------------------------------------------------------------------- CRD


@pytest.mark.parametrize("name", ["trainingjob.yaml", "population.yaml"])
def test_chart_crd_is_the_generated_file_not_a_copy(name: str) -> None:
    link = CHART_DIR / "crds" / name
    assert link.is_symlink(), f"charts/loco-operator/crds/{name} must be a symlink to crds/{name}"
    assert link.resolve() == (REPO / "crds" / name).resolve()


def test_chart_installs_exactly_the_generated_crd_file() -> None:
    """The chart's CRD is crds/trainingjob.yaml (whose drift from the models tests/test_crd.py checks)."""
    (chart_crd,) = [c for c in chart_crds() if c["metadata"]["name"] == "trainingjobs.loco.dev"]
    assert chart_crd == yaml.safe_load(CRD_FILE.read_text())
    assert chart_crd["spec"]["names"]["kind"] == "TrainingJob"


def test_packaged_chart_carries_the_crd(tmp_path: Path) -> None:
    """`helm package` follows the crds/ symlink: the archive holds the CRD's content, not a link."""
    archive = helm.package(CHART_DIR, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        crd_texts = {entry["name"]: entry["data"] for entry in packaged.crds}
    assert crd_texts["crds/trainingjob.yaml"] == CRD_FILE.read_text()
    assert crd_texts["crds/population.yaml"] == (REPO / "crds" / "population.yaml").read_text()


# ------------------------------------------------------------------------------- deployment


def test_operator_runs_hardened() -> None:
    objects = render()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # read-only root: a writable /tmp comes from an emptyDir
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    assert c["livenessProbe"]["httpGet"]["port"] == "health"


def test_default_install_watches_every_namespace_standalone_with_recreate() -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    c = container(objects)
    assert c["command"] == ["loco", "operator", "run"]
    assert c["args"][:4] == ["--all-namespaces", "--metrics-port=9090", "--liveness=http://0.0.0.0:8081/healthz",
                             "--node-lost-grace-seconds=60"]
    assert len(c["args"]) == 5 and c["args"][4].startswith("--network-policy=")
    assert c["image"] == "ghcr.io/loco-dev/loco-operator:0.1.0"
    assert not by_kind(objects, "ClusterKopfPeering") and not by_kind(objects, "KopfPeering")


def test_watch_namespaces_pass_one_flag_each() -> None:
    args = container(render({"watchNamespaces": ["team-a", "team-b"]}))["args"]
    assert args[:2] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in args


def test_replicas_turn_on_kopf_peering() -> None:
    objects = render({"replicaCount": 3})
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--peering=loco-operator" in container(objects)["args"]
    assert one(objects, "ClusterKopfPeering")["metadata"]["name"] == "loco-operator"
    namespaced = render({"replicaCount": 2, "watchNamespaces": ["team-a", "team-b"]})
    assert sorted(p["metadata"]["namespace"] for p in by_kind(namespaced, "KopfPeering")) == ["team-a", "team-b"]


def test_toggles_reach_the_pod() -> None:
    values = TOGGLES["image-and-extras"] | TOGGLES["scheduling"] | {"logLevel": "debug"}
    objects = render(values)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert c["image"] == "registry.example.com/loco-operator:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in c["env"]
    assert c["args"][-1] == "--context=prod" and "--verbose" in c["args"]
    assert "--metrics-port=9191" in c["args"] and "--liveness=http://0.0.0.0:8181/healthz" in c["args"]
    assert c["resources"] == values["resources"]
    assert {"name": "metrics", "containerPort": 9191, "protocol": "TCP"} in c["ports"]
    service = one(objects, "Service")
    assert service["spec"]["type"] == "NodePort" and service["spec"]["ports"][0]["port"] == 80


def test_chart_arguments_are_accepted_by_the_operator_cli() -> None:
    """The container's arguments parse with the real `loco operator run` click command."""
    cli = pytest.importorskip("loco_operator.cli", reason="the operator extra is not installed")
    run = cli.operator.commands["run"]
    for values in TOGGLES.values():
        args = container(render(values))["args"]
        ctx = run.make_context("run", list(args), resilient_parsing=False)
        params = ctx.params
        assert params["metrics_port"] == (values.get("metrics", {}).get("port") or 9090)
        assert params["all_namespaces"] is (not values.get("watchNamespaces"))
        assert params["peering_name"] == ("loco-operator" if values.get("replicaCount", 1) > 1 else None)
        assert params["node_lost_grace_s"] == values.get("nodeLostGraceSeconds", 60)
        assert params["cordon_nodes"] is values.get("faultIsolation", {}).get("cordonNodes", False)


def test_cordoning_is_the_cluster_operators_choice_off_by_default() -> None:
    """Only the chart value faultIsolation.cordonNodes lets the operator cordon nodes: it passes
    --cordon-nodes and grants nodes/patch; off (the default), neither (a job's own faultDetection.cordonNodes
    is then answered with a Warning event, never a cordon)."""
    def node_verbs(objects: list[dict[str, Any]]) -> set[str]:
        return {v for role in by_kind(objects, "ClusterRole") for rule in role["rules"]
                if "nodes" in rule["resources"] for v in rule["verbs"]}

    for extra in ({}, {"watchNamespaces": ["team-a"]}):
        off = render(extra)
        assert "--cordon-nodes" not in container(off)["args"]
        assert node_verbs(off) == {"get", "list"}, "nodes are only read without faultIsolation.cordonNodes"
        on = render({**extra, "faultIsolation": {"cordonNodes": True}})
        assert "--cordon-nodes" in container(on)["args"]
        assert node_verbs(on) == {"get", "list", "patch"}


# ------------------------------------------------------------------------------- metrics


def test_metrics_service_selects_the_operator_pods() -> None:
    objects = render()
    service = one(objects, "Service")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert any(p["name"] == "metrics" for p in container(objects)["ports"])


def test_monitors_are_optional_and_scrape_the_right_ports() -> None:
    assert not [o for o in render() if o["apiVersion"].startswith("monitoring.coreos.com/")]
    objects = render(TOGGLES["monitors"])
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True, "per-job operator series carry their own job label"
    pods = one(objects, "PodMonitor")
    endpoint = pods["spec"]["podMetricsEndpoints"][0]
    # the worker pod contract (docs/contracts.md): port `status`, labels loco.dev/job and managed-by loco
    assert endpoint["port"] == "status" and endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True, "the trainer's own job/namespace labels must win"
    assert pods["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "loco"}
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    scoped = one(render(TOGGLES["podmonitor-namespaces"]), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_dashboards_ship_as_grafana_sidecar_configmaps() -> None:
    files = sorted((CHART_DIR / "dashboards").glob("*.json"))
    assert len(files) >= 2
    configmaps = [c for c in by_kind(render(), "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    shipped = {key: json.loads(text) for c in configmaps for key, text in c["data"].items()}
    assert shipped == {f.name: json.loads(f.read_text()) for f in files}
    assert not [c for c in by_kind(render(TOGGLES["no-dashboards"]), "ConfigMap")]
    elsewhere = by_kind(render(TOGGLES["dashboards-elsewhere"]), "ConfigMap")
    assert {c["metadata"]["namespace"] for c in elsewhere} == {"monitoring"}
    assert all(c["metadata"]["annotations"] == {"grafana_folder": "Loco"} for c in elsewhere)


def test_docs_cover_every_top_level_value() -> None:
    docs = (REPO / "docs" / "helm.md").read_text()
    with load_chart() as chart:
        keys = list(chart.values)
    missing = [k for k in keys if f"`{k}" not in docs]
    assert missing == [], f"docs/helm.md does not document: {missing}"


def test_network_policy_lets_the_operator_and_the_listed_peers_in() -> None:
    from loco_operator.cli import parse_network_policy_peers

    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    args = container(render({"networkPolicy": {"from": [prometheus]}}))["args"]
    flag = next(a for a in args if a.startswith("--network-policy="))
    peers = parse_network_policy_peers(flag.split("=", 1)[1])
    operator_labels = one(render(), "Deployment")["spec"]["selector"]["matchLabels"]
    assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "loco-system"}},
                      "podSelector": {"matchLabels": operator_labels}}, prometheus]
    off = render({"networkPolicy": {"enabled": False}})
    assert not any(a.startswith("--network-policy") for a in container(off)["args"])
    rules = [r for o in by_kind(off, "ClusterRole") for r in o["rules"]]
    assert not any("networkpolicies" in r["resources"] for r in rules)
