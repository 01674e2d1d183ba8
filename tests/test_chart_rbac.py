"""The chart's RBAC grants exactly what the operator uses: no verb missing, none to spare.

What the operator uses is read from its source, not restated by hand: a deliberately simple scanner
walks ``operator/loco_operator/*.py`` and collects
  1. every ``kubernetes`` client method it names (``create_namespaced_pod``,
     ``patch_namespaced_custom_object_status``...), mapped to (apiGroup, resource, verb) by the
     explicit table :data:`CLIENT_CALLS` (a client method missing from the table fails the test, so
     new API calls cannot slip past the chart), and
  2. every Kopf handler decorator (``@kopf.on.create(GROUP, VERSION, PLURAL)``,
     ``@kopf.on.event("", "v1", "pods")``, ``@kopf.timer``...), mapped by :data:`KOPF_HANDLER_VERBS`
     to what Kopf itself does for such a handler (watch the resource; patch it for finalizers and
     its progress/diff-base annotations; post events),
plus what the Kopf framework needs regardless of handlers (:data:`KOPF_FRAMEWORK`, :data:`KOPF_PEERING`).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any, Iterable

import pytest

from test_chart import REPO, by_kind, render

OPERATOR_SRC = REPO / "operator" / "loco_operator"

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)

TRAININGJOBS = ("loco.dev", "trainingjobs")
#: kubernetes-client method -> (apiGroup, resource, verb). Custom-object calls are TrainingJob calls:
#: the operator manages no other custom resource (the test below checks the group/plural it passes).
CLIENT_CALLS: dict[str, Rule] = {
    # core/v1 pods
    "create_namespaced_pod": ("", "pods", "create"),
    "read_namespaced_pod": ("", "pods", "get"),
    "list_namespaced_pod": ("", "pods", "list"),
    "list_pod_for_all_namespaces": ("", "pods", "list"),
    "patch_namespaced_pod": ("", "pods", "patch"),
    "replace_namespaced_pod": ("", "pods", "update"),
    "delete_namespaced_pod": ("", "pods", "delete"),
    "delete_collection_namespaced_pod": ("", "pods", "deletecollection"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "read_namespaced_pod_status": ("", "pods/status", "get"),
    # core/v1 services
    "create_namespaced_service": ("", "services", "create"),
    "read_namespaced_service": ("", "services", "get"),
    "list_namespaced_service": ("", "services", "list"),
    "patch_namespaced_service": ("", "services", "patch"),
    "replace_namespaced_service": ("", "services", "update"),
    "delete_namespaced_service": ("", "services", "delete"),
    # core/v1 configmaps
    "create_namespaced_config_map": ("", "configmaps", "create"),
    "read_namespaced_config_map": ("", "configmaps", "get"),
    "list_namespaced_config_map": ("", "configmaps", "list"),
    "patch_namespaced_config_map": ("", "configmaps", "patch"),
    "replace_namespaced_config_map": ("", "configmaps", "update"),
    "delete_namespaced_config_map": ("", "configmaps", "delete"),
    # core/v1 secrets (a job's membership token)
    "create_namespaced_secret": ("", "secrets", "create"),
    "read_namespaced_secret": ("", "secrets", "get"),
    # networking.k8s.io/v1 networkpolicies (one per job with --network-policy)
    "create_namespaced_network_policy": ("networking.k8s.io", "networkpolicies", "create"),
    "read_namespaced_network_policy": ("networking.k8s.io", "networkpolicies", "get"),
    # core/v1 events
    "create_namespaced_event": ("", "events", "create"),
    "list_namespaced_event": ("", "events", "list"),
    "patch_namespaced_event": ("", "events", "patch"),
    # core/v1 persistentvolumeclaims (checkpoint volumes)
    "read_namespaced_persistent_volume_claim": ("", "persistentvolumeclaims", "get"),
    "create_namespaced_persistent_volume_claim": ("", "persistentvolumeclaims", "create"),
    # core/v1 nodes (cluster-scoped: fault handling reads a node; cordons one only with faultIsolation.cordonNodes)
    "read_node": ("", "nodes", "get"),
    "list_node": ("", "nodes", "list"),
    "patch_node": ("", "nodes", "patch"),
}

#: The custom resources the operator calls through CustomObjectsApi, by the name of the (group, version, plural)
#: it passes: TrainingJobs (``GROUP, VERSION, ..., PLURAL``) and, for jobs queued in Kueue, its Workloads (and
#: their status), ResourceFlavors and WorkloadPriorityClasses (``*KUEUE_WORKLOADS[:2], ..., KUEUE_WORKLOADS[2]``).
CUSTOM_RESOURCES: dict[str, tuple[str, str]] = {
    "PLURAL": TRAININGJOBS,
    "POPULATIONS": ("loco.dev", "populations"),
    "KUEUE_WORKLOADS": ("kueue.x-k8s.io", "workloads"),
    "KUEUE_FLAVORS": ("kueue.x-k8s.io", "resourceflavors"),
    "KUEUE_PRIORITIES": ("kueue.x-k8s.io", "workloadpriorityclasses"),
}
#: CustomObjectsApi method prefix -> verb (``*_status``/``*_scale`` act on that subresource).
CUSTOM_VERBS = {"create": "create", "get": "get", "list": "list", "patch": "patch", "replace": "update",
                "delete": "delete"}

#: Kopf decorator -> verbs Kopf needs on the handled resource.
#: Change handlers (create/update/resume/delete/field) and timers/daemons watch the resource and
#: patch it: finalizers, and the progress and diff-base annotations (handlers.py stores both in
#: annotations). Event handlers and indexes only watch.
KOPF_HANDLER_VERBS: dict[str, tuple[str, ...]] = {
    "on.create": ("list", "watch", "patch"),
    "on.update": ("list", "watch", "patch"),
    "on.resume": ("list", "watch", "patch"),
    "on.delete": ("list", "watch", "patch"),
    "on.field": ("list", "watch", "patch"),
    "timer": ("list", "watch", "patch"),
    "daemon": ("list", "watch", "patch"),
    "on.event": ("list", "watch"),
    "index": ("list", "watch"),
    # operator-level activities touch no resource
    "on.startup": (),
    "on.cleanup": (),
    "on.login": (),
    "on.probe": (),
}
#: Kopf posts events about handler outcomes on the handled objects (and kopf.event/info/warn).
KOPF_EVENTS: Rule = ("", "events", "create")
#: Kopf's runtime scanning of CRDs (so it notices the TrainingJob CRD appear and disappear).
KOPF_FRAMEWORK: set[Rule] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
#: Kopf given namespaces (--namespace, watchNamespaces) lists and watches Namespaces to follow them;
#: without it, found on the real control plane, every list/watch answers 403 and Kopf retries forever.
KOPF_NAMESPACE_OBSERVER: set[Rule] = {("", "namespaces", "list"), ("", "namespaces", "watch")}
#: Kopf peering (replicaCount > 1): its own peering object is read, watched and patched (keep-alives).
PEERING_VERBS = ("get", "list", "patch", "watch")
#: Rules the operator's code holds but uses only when a chart value turns the feature on (value -> rules):
#: cordoning a blamed node is the cluster operator's choice (faultIsolation.cordonNodes, `--cordon-nodes`).
OPT_IN_RULES: dict[str, set[Rule]] = {"faultIsolation.cordonNodes": {("", "nodes", "patch")}}
#: Resources that exist outside namespaces: always granted by the ClusterRole.
CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions", "clusterkopfpeerings", "resourceflavors",
                  "workloadpriorityclasses"}


# ------------------------------------------------------------------------------------ scanner


def _sources() -> list[tuple[str, ast.Module]]:
    files = sorted(OPERATOR_SRC.rglob("*.py"))
    assert files, f"no operator sources under {OPERATOR_SRC}"
    return [(str(f.relative_to(REPO)), ast.parse(f.read_text(), filename=str(f))) for f in files]


def _looks_like_client_method(name: str) -> bool:
    """The shape of a kubernetes-client API method name (to catch calls missing from CLIENT_CALLS)."""
    verbs = ("create_", "read_", "get_", "list_", "patch_", "replace_", "delete_", "delete_collection_")
    return name.startswith(verbs) and ("_namespaced_" in name or name.endswith("_for_all_namespaces") or "custom_object" in name)


def client_calls() -> dict[str, list[str]]:
    """kubernetes-client method names referenced in the operator (called or passed), with where; the
    CustomObjectsApi ones are in :func:`custom_object_calls`."""
    found: dict[str, list[str]] = {}
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and "custom_object" not in node.attr and (
                    node.attr in CLIENT_CALLS or _looks_like_client_method(node.attr)):
                found.setdefault(node.attr, []).append(f"{path}:{node.lineno}")
    return found


def custom_object_calls() -> dict[Rule, list[str]]:
    """(apiGroup, resource, verb) of every CustomObjectsApi call, read from the method's name and the resource
    constant passed in the same call (:data:`CUSTOM_RESOURCES`), with where; a call passing none fails."""
    found: dict[Rule, list[str]] = {}
    for path, tree in _sources():
        calls = [c for c in ast.walk(tree) if isinstance(c, ast.Call)]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and "custom_object" in node.attr):
                continue
            call = min((c for c in calls if node in ast.walk(c)), key=lambda c: len(list(ast.walk(c))), default=None)
            names = {n.id for n in ast.walk(call) if isinstance(n, ast.Name)} if call is not None else set()
            marked = [CUSTOM_RESOURCES[n] for n in CUSTOM_RESOURCES if n in names]
            assert len(marked) == 1, f"{path}:{node.lineno}: {node.attr} must pass one of {sorted(CUSTOM_RESOURCES)}"
            group, plural = marked[0]
            verb = CUSTOM_VERBS[node.attr.split("_", 1)[0]]
            sub = next((f"/{part}" for part in ("status", "scale") if node.attr.endswith("_" + part)), "")
            found.setdefault((group, plural + sub, verb), []).append(f"{path}:{node.lineno}")
    return found


def _kopf_decorator(node: ast.expr) -> tuple[str, ast.Call] | None:
    """('on.create', call) for ``@kopf.on.create(...)``; ('timer', call) for ``@kopf.timer(...)``."""
    if not isinstance(node, ast.Call):
        return None
    parts: list[str] = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not (isinstance(func, ast.Name) and func.id == "kopf"):
        return None
    return ".".join(reversed(parts)), node


def _value(node: ast.expr, module: Any) -> Any:
    """A decorator argument's value: a literal, or a module-level name (e.g. GROUP imported from spec)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return getattr(module, node.id)
    raise AssertionError(f"cannot resolve decorator argument {ast.dump(node)}: use literals or module constants")


def _resource(call: ast.Call, module: Any) -> tuple[str, str]:
    """(apiGroup, plural) of a Kopf handler: positional (group, version, plural) / (plural), or plural=/group=."""
    args = [_value(a, module) for a in call.args]
    kwargs = {k.arg: _value(k.value, module) for k in call.keywords if k.arg in ("group", "plural")}
    if "plural" in kwargs:
        return kwargs.get("group", ""), kwargs["plural"]
    if len(args) == 3:
        return args[0], args[2]
    if len(args) == 1:  # a bare plural: core v1 ("pods") or a dotted "plural.group"
        plural, _, group = args[0].partition(".")
        return group, plural
    raise AssertionError(f"unsupported Kopf resource spec in {ast.unparse(call)}")


def kopf_handlers() -> list[tuple[str, str, str, str]]:
    """(decorator, apiGroup, plural, where) of every Kopf handler in the operator."""
    found = []
    for path, tree in _sources():
        module_name = "loco_operator." + Path(path).relative_to("operator/loco_operator").with_suffix("").as_posix().replace("/", ".")
        module = None
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for decorator in node.decorator_list:
                parsed = _kopf_decorator(decorator)
                if parsed is None:
                    continue
                kind, call = parsed
                assert kind in KOPF_HANDLER_VERBS, f"{path}:{node.lineno}: add kopf.{kind} to KOPF_HANDLER_VERBS"
                if not KOPF_HANDLER_VERBS[kind]:
                    continue
                module = module or importlib.import_module(module_name.removesuffix(".__init__"))
                group, plural = _resource(call, module)
                found.append((kind, group, plural, f"{path}:{node.lineno}"))
    return found


def _uses_kopf_events() -> bool:
    calls = ("kopf.event", "kopf.info", "kopf.warn", "kopf.exception")
    return any(any(c + "(" in ast.unparse(tree) for c in calls) for _, tree in _sources())


def required_rules(peering: bool, clusterwide: bool, opt_in: Iterable[str] = ()) -> set[Rule]:
    """Every (apiGroup, resource, verb) the operator's code and Kopf need, with the features ``opt_in``
    (keys of :data:`OPT_IN_RULES`) turned on."""
    unknown = {name: where for name, where in client_calls().items() if name not in CLIENT_CALLS}
    assert not unknown, f"kubernetes-client calls missing from CLIENT_CALLS (add them, then to the chart's RBAC): {unknown}"
    rules = {CLIENT_CALLS[name] for name in client_calls()} | set(custom_object_calls())
    for feature, feature_rules in OPT_IN_RULES.items():
        if feature not in opt_in:
            rules -= feature_rules
    handlers = kopf_handlers()
    for kind, group, plural, _ in handlers:
        rules |= {(group, plural, verb) for verb in KOPF_HANDLER_VERBS[kind]}
    if handlers or _uses_kopf_events():
        rules.add(KOPF_EVENTS)
    rules |= KOPF_FRAMEWORK
    if not clusterwide:
        rules |= KOPF_NAMESPACE_OBSERVER
    if peering:
        plural = "clusterkopfpeerings" if clusterwide else "kopfpeerings"
        rules |= {("kopf.dev", plural, verb) for verb in PEERING_VERBS}
    return rules


def granted(roles: Iterable[dict[str, Any]]) -> set[Rule]:
    """The (apiGroup, resource, verb) triples a set of (Cluster)Roles grants (no wildcards allowed)."""
    triples = set()
    for role in roles:
        for rule in role["rules"]:
            for part in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[part], f"{role['kind']} {role['metadata']['name']}: wildcard in {part}"
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            triples |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return triples


def cluster_wide_calls() -> set[Rule]:
    """Rules the operator needs across every namespace whatever it watches: its ``*_for_all_namespaces``
    calls (elastic growth reads every pod on the nodes to see free capacity). A namespaced Role cannot
    grant them; found on the real control plane, where growth was refused until the ClusterRole had it."""
    return {CLIENT_CALLS[name] for name in client_calls() if name.endswith("_for_all_namespaces")}


def _fmt(rules: set[Rule]) -> list[str]:
    return sorted(f"{g or 'core'}/{r}:{v}" for g, r, v in rules)


# -------------------------------------------------------------------------------------- tests


def test_scanner_finds_the_operators_api_calls() -> None:
    """Guards the scanner itself: the operator certainly creates pods and watches TrainingJobs."""
    assert "create_namespaced_pod" in client_calls()
    assert any(plural == "trainingjobs" and kind == "on.create" for kind, _, plural, _ in kopf_handlers())


def test_custom_object_calls_name_their_resource() -> None:
    """Every CustomObjectsApi call passes the constant of the resource it acts on: the TrainingJobs' status is
    patched, Kueue's Workloads created, their status patched (a queued job's admission and end)."""
    calls = custom_object_calls()
    assert ("loco.dev", "trainingjobs/status", "patch") in calls
    assert {("kueue.x-k8s.io", "workloads", "create"), ("kueue.x-k8s.io", "workloads/status", "patch"),
            ("kueue.x-k8s.io", "resourceflavors", "get")} <= set(calls)


#: Chart values of each opt-in feature (OPT_IN_RULES) turned on.
OPT_IN_VALUES: dict[str, dict[str, Any]] = {"faultIsolation.cordonNodes": {"faultIsolation": {"cordonNodes": True}}}
CORDON = pytest.mark.parametrize("opt_in", [(), ("faultIsolation.cordonNodes",)], ids=["defaults", "cordon-nodes"])


def _opt_in_values(opt_in: Iterable[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for feature in opt_in:
        values |= OPT_IN_VALUES[feature]
    return values


def test_every_opt_in_rule_is_used_by_the_code_and_has_chart_values() -> None:
    used = {CLIENT_CALLS[name] for name in client_calls()}
    assert set(OPT_IN_VALUES) == set(OPT_IN_RULES)
    for feature, rules in OPT_IN_RULES.items():
        assert rules <= used, f"{feature}: {_fmt(rules - used)} never called by the operator"


@CORDON
@pytest.mark.parametrize("replicas", [1, 3], ids=["standalone", "peering"])
def test_clusterwide_role_grants_exactly_what_the_operator_uses(replicas: int, opt_in: tuple[str, ...]) -> None:
    objects = render({"replicaCount": replicas, **_opt_in_values(opt_in)})
    assert not by_kind(objects, "Role"), "every-namespace mode must not render namespaced Roles"
    have = granted(by_kind(objects, "ClusterRole"))
    need = required_rules(peering=replicas > 1, clusterwide=True, opt_in=opt_in)
    assert _fmt(need - have) == [], "missing from the chart's ClusterRole"
    assert _fmt(have - need) == [], "granted but never used by the operator"


@CORDON
@pytest.mark.parametrize("replicas", [1, 2], ids=["standalone", "peering"])
def test_namespaced_roles_grant_exactly_what_the_operator_uses(replicas: int, opt_in: tuple[str, ...]) -> None:
    namespaces = ["team-a", "team-b"]
    objects = render({"replicaCount": replicas, "watchNamespaces": namespaces, **_opt_in_values(opt_in)})
    need = required_rules(peering=replicas > 1, clusterwide=False, opt_in=opt_in)
    need_cluster = {r for r in need if r[1] in CLUSTER_SCOPED} | cluster_wide_calls()
    need_namespaced = need - {r for r in need if r[1] in CLUSTER_SCOPED}
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    for role in roles:
        have = granted([role])
        assert _fmt(need_namespaced - have) == [], f"missing from the Role in {role['metadata']['namespace']}"
        assert _fmt(have - need_namespaced) == [], f"granted but never used, in {role['metadata']['namespace']}"
    have_cluster = granted(by_kind(objects, "ClusterRole"))
    assert _fmt(need_cluster - have_cluster) == [] and _fmt(have_cluster - need_cluster) == []


def test_bindings_point_at_the_operator_serviceaccount() -> None:
    objects = render({"watchNamespaces": ["team-a"]})
    (sa,) = by_kind(objects, "ServiceAccount")
    deployment = by_kind(objects, "Deployment")[0]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    bindings = by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding")
    assert len(bindings) == 2
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "loco-system"}]
        role_kind = "ClusterRole" if binding["kind"] == "ClusterRoleBinding" else "Role"
        assert binding["roleRef"]["kind"] == role_kind
        assert any(r["metadata"]["name"] == binding["roleRef"]["name"] for r in by_kind(objects, role_kind))


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    objects = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops-sa"}})
    assert not [o for o in objects if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert not by_kind(objects, "ServiceAccount")
    assert by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "ops-sa"
