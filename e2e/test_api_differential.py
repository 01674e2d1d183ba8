"""Differential test of the embedded API server against kube-apiserver v1.37.2: the same requests to both,
and the answers compared (status code, the Status reason of an error, and the fields that must agree).

Every step must agree, except those listed in :data:`ALLOWED` with the reason the difference is allowed
(docs/local-cluster.md, "Embedded and real, side by side"). A difference that is neither is a bug to fix in
the embedded server.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from loco_local.cluster import LocalCluster
from loco_local.nodes import uniform_nodes

CONTROL_PLANES = ("kubernetes",)  # it starts both itself; it runs once, where the real one is wanted
NS = "diff"
COMPACTION_S = 3
CM = f"/api/v1/namespaces/{NS}/configmaps"
TJ = f"/apis/loco.dev/v1alpha1/namespaces/{NS}/trainingjobs"
MERGE, JSON_PATCH, STRATEGIC, APPLY = ("application/merge-patch+json", "application/json-patch+json",
                                        "application/strategic-merge-patch+json", "application/apply-patch+yaml")
#: steps whose answers may differ, and why (the same words are in docs/local-cluster.md)
ALLOWED: dict[str, str] = {
}


@dataclass
class Answer:
    status: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str | None:
        """The Status reason of an error (NotFound, AlreadyExists, Conflict, Invalid...), None on success."""
        return self.body.get("reason") if self.status >= 400 else None


class Api:
    """A requests session with a kubeconfig's server and credentials (a bearer token or a client certificate)."""

    def __init__(self, kubeconfig: Path, credentials: bool = True) -> None:
        doc = yaml.safe_load(Path(kubeconfig).read_text())
        cluster, user = doc["clusters"][0]["cluster"], doc["users"][0]["user"]
        self.kubeconfig = kubeconfig
        self.url = cluster["server"]
        self.first_version, self.started = "", time.monotonic()  # set by the fixture
        self.session = requests.Session()
        self.session.trust_env = False  # $REQUESTS_CA_BUNDLE would replace the cluster's CA
        if cluster.get("certificate-authority"):
            self.session.verify = cluster["certificate-authority"]
        if credentials and user.get("client-certificate"):
            self.session.cert = (user["client-certificate"], user["client-key"])
        if credentials and user.get("token"):
            self.session.headers["Authorization"] = f"Bearer {user['token']}"

    def anonymous(self) -> Api:
        """The same server, trusted the same way, with no credential."""
        return Api(self.kubeconfig, credentials=False)

    def __call__(self, method: str, path: str, body: Any = None, content_type: str | None = "application/json",
                 **params: str) -> Answer:
        data = None if body is None else (body if isinstance(body, str | bytes) else json.dumps(body))
        headers = {"Accept": "application/json", **({"Content-Type": content_type} if content_type else {})}
        resp = self.session.request(method, self.url + path, data=data, params=params or None, timeout=30,
                                    headers=headers)
        try:
            payload = resp.json()
        except ValueError:
            payload = {"raw": resp.text}
        return Answer(resp.status_code, payload)


@pytest.fixture(scope="module")
def apis(tmp_path_factory: pytest.TempPathFactory, control_plane: str) -> Iterator[dict[str, Api]]:
    from loco_local.realcluster import RealCluster

    nodes = uniform_nodes(1)
    # etcd compacted every 3 s, so that a resourceVersion from the start is gone (410) by the end of the steps
    with LocalCluster(tmp_path_factory.mktemp("diff-embedded"), nodes) as embedded, \
            RealCluster(tmp_path_factory.mktemp("diff-real"), nodes, pod_security=None,
                        apiserver_args=[f"--etcd-compaction-interval={COMPACTION_S}s"]) as real:
        apis = {"embedded": Api(embedded.kubeconfig), "real": Api(real.kubeconfig)}
        for api in apis.values():
            created = api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": NS}})
            assert created.status == 201
            api.first_version, api.started = created.body["metadata"]["resourceVersion"], time.monotonic()
        yield apis


def configmap(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": {"k": "v"}}


#: what Pod validation refuses, in each of the template's Kubernetes types
BAD_TEMPLATE = {
    "env": [{"name": "", "value": 1}],
    "resources": {"limits": {"memory": "-1Gi", "cpu": -1}},
    "tolerations": [{"key": "k", "tolerationSeconds": "soon"}],
    "volumeMounts": [{"name": "data"}],
    "volumes": [{"name": "data", "persistentVolumeClaim": {}}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": "any"}}},
}


def job(name: str, replicas: int = 2) -> dict[str, Any]:
    return {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
            "spec": {"replicas": replicas}}


def ownership(answer: Answer) -> list[tuple[str, str, Any]]:
    """Who owns what: (manager, operation, fieldsV1) per managedFields entry, sorted."""
    return sorted((m["manager"], m["operation"], json.dumps(m.get("fieldsV1"), sort_keys=True))
                  for m in answer.body.get("metadata", {}).get("managedFields", []))


def _apply(api: Api, data: dict[str, str], manager: str, force: str | None = None, **meta: Any) -> Answer:
    body = {**configmap("applied", **meta), "data": data}
    params = {"fieldManager": manager, **({"force": force} if force else {})}
    return api("PATCH", f"{CM}/applied", yaml.safe_dump(body), APPLY, **params)


def _reapplied(api: Api) -> Answer:
    before = api("GET", f"{CM}/applied").body["metadata"]["resourceVersion"]
    again = api("PATCH", f"{CM}/applied", yaml.safe_dump(
        {**configmap("applied", labels={"app": "a"}), "data": {"k": "v", "drop": "1"}}), APPLY, fieldManager="diff")
    return Answer(again.status, {"unchanged": again.body["metadata"]["resourceVersion"] == before})


def names(answer: Answer) -> list[str]:
    return sorted(item["metadata"]["name"] for item in answer.body.get("items", []) if item["metadata"]["name"] != ROOT_CA)


#: (step, the request as a function of the API, what of the answer must agree besides status and reason)
Step = tuple[str, Callable[[Api], Answer], Callable[[Answer], Any]]
NOTHING: Callable[[Answer], Any] = lambda a: None  # noqa: E731


def _stale_update(api: Api) -> Answer:
    current = api("GET", f"{CM}/cm1").body
    stale = copy.deepcopy(current)
    api("PATCH", f"{CM}/cm1", {"data": {"bump": "1"}}, MERGE)
    return api("PUT", f"{CM}/cm1", stale)


def _finalized_delete(api: Api) -> Answer:
    api("POST", CM, configmap("held", finalizers=["example.dev/keep"]))
    api("DELETE", f"{CM}/held")
    return api("GET", f"{CM}/held")


def _release_finalizer(api: Api) -> Answer:
    api("PATCH", f"{CM}/held", {"metadata": {"finalizers": None}}, MERGE)
    for _ in range(50):
        answer = api("GET", f"{CM}/held")
        if answer.status == 404:
            return answer
        time.sleep(0.1)
    return answer


def _watch_from(api: Api) -> Answer:
    rv = api("GET", CM).body["metadata"]["resourceVersion"]
    api("POST", CM, configmap("watched"))
    resp = api.session.get(api.url + CM, params={"watch": "true", "resourceVersion": rv, "timeoutSeconds": "2",
                                                 "allowWatchBookmarks": "true"}, timeout=30)
    events = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    return Answer(resp.status_code, {"events": [(e["type"], e["object"]["metadata"]["name"]) for e in events
                                                if e["type"] != "BOOKMARK"]})


def _eventually(api: Api, path: str, done: Callable[[Answer], bool], timeout_s: float = 20.0) -> Answer:
    """GET ``path`` until ``done`` (the garbage collector works in the background on both servers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = api("GET", path)
        if done(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def _owner_and_child(api: Api, tag: str) -> None:
    owner = api("POST", CM, configmap(f"owner-{tag}")).body
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}
    api("POST", CM, configmap(f"child-{tag}", ownerReferences=[ref]))


def _delete_owner(policy: str) -> Callable[[Api], Answer]:
    """Delete an owner with ``policy``; the answer is its child once the garbage collector has acted."""
    def run(api: Api) -> Answer:
        tag = policy.lower()
        _owner_and_child(api, tag)
        api("DELETE", f"{CM}/owner-{tag}", {"propagationPolicy": policy})
        _eventually(api, f"{CM}/owner-{tag}", lambda a: a.status == 404)
        if policy == "Orphan":  # the child stays, freed of its owner
            return _eventually(api, f"{CM}/child-{tag}", lambda a: not a.body.get("metadata", {}).get("ownerReferences"))
        return _eventually(api, f"{CM}/child-{tag}", lambda a: a.status == 404)
    return run


def _foreground_owner_waits(api: Api) -> Answer:
    """Foreground: the owner stays, deleting, with the foregroundDeletion finalizer while a child is held."""
    _owner_and_child(api, "fg")
    api("PATCH", f"{CM}/child-fg", {"metadata": {"finalizers": ["example.dev/hold"]}}, MERGE)
    api("DELETE", f"{CM}/owner-fg", {"propagationPolicy": "Foreground"})
    held = _eventually(api, f"{CM}/owner-fg", lambda a: "foregroundDeletion" in (a.body["metadata"].get("finalizers") or []))
    api("PATCH", f"{CM}/child-fg", {"metadata": {"finalizers": None}}, MERGE)
    gone = _eventually(api, f"{CM}/owner-fg", lambda a: a.status == 404)
    return Answer(held.status, {"held": held.body["metadata"].get("finalizers"),
                                "deleting": bool(held.body["metadata"].get("deletionTimestamp")), "then": gone.status})


#: the controller manager's root-CA ConfigMap in every namespace: the embedded cluster has none (no in-cluster TLS)
ROOT_CA = "kube-root-ca.crt"


def _initial_events(api: Api) -> Answer:
    """A watch that streams the current state first and marks its end with a bookmark (sendInitialEvents)."""
    resp = api.session.get(api.url + CM, timeout=30, params={
        "watch": "true", "sendInitialEvents": "true", "resourceVersionMatch": "NotOlderThan", "resourceVersion": "",
        "allowWatchBookmarks": "true", "timeoutSeconds": "3"})
    events = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    added = sorted(e["object"]["metadata"]["name"] for e in events
                   if e["type"] == "ADDED" and e["object"]["metadata"]["name"] != ROOT_CA)
    bookmarks = [e["object"]["metadata"].get("annotations") for e in events if e["type"] == "BOOKMARK"]
    return Answer(resp.status_code, {"added": added, "last": events[-1]["type"] if events else None,
                                     "bookmark": bookmarks[-1] if bookmarks else None})


def _wrong_token(api: Api) -> Answer:
    stranger = api.anonymous()
    stranger.session.headers["Authorization"] = "Bearer not-the-token"
    return stranger("GET", CM)


#: a YAML "billion laughs": nine levels of nine aliases each, 9**9 strings once expanded
YAML_BOMB = "\n".join(["apiVersion: v1", "kind: ConfigMap", "metadata: {name: bomb}", "a0: &a0 [lol]"]
                      + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)])


def _compacted_list(api: Api) -> Answer:
    """A list at exactly the resourceVersion of the first write, once etcd has compacted it away (two
    compaction periods): 410 on both (the embedded server keeps no old snapshots at all)."""
    time.sleep(max(0.0, 3 * COMPACTION_S - (time.monotonic() - api.started)))
    return api("GET", CM, resourceVersion=api.first_version, resourceVersionMatch="Exact")


def _future_watch(api: Api) -> Answer:
    rv = int(api("GET", CM).body["metadata"]["resourceVersion"])
    resp = api.session.get(api.url + CM, timeout=30, params={"watch": "true", "resourceVersion": str(rv + 100_000),
                                                             "timeoutSeconds": "2"})
    return Answer(resp.status_code, {"events": [json.loads(line)["type"] for line in resp.text.splitlines() if line]})


STEPS: list[Step] = [
    ("no credential: 401 Unauthorized", lambda api: api.anonymous()("GET", CM), NOTHING),
    ("a wrong bearer token: 401 Unauthorized", _wrong_token, NOTHING),
    ("no credential, a write: 401, nothing created", lambda api: (api.anonymous()("POST", CM, configmap("sneaky")),
                                                                   api("GET", f"{CM}/sneaky"))[1], NOTHING),
    ("create sent as text/plain: 415", lambda api: api("POST", CM, configmap("plain"), "text/plain"), NOTHING),
    ("create as a form: 415", lambda api: api("POST", CM, "a=b", "application/x-www-form-urlencoded"), NOTHING),
    ("create with no Content-Type: read as JSON", lambda api: api("POST", CM, configmap("untyped"), None),
     lambda a: a.body["metadata"]["name"]),
    ("create as YAML", lambda api: api("POST", CM, yaml.safe_dump(configmap("yamled")), "application/yaml"),
     lambda a: a.body["data"]),
    ("a body over 3 MiB: 413", lambda api: api("POST", CM, {**configmap("huge"), "data": {"k": "x" * (4 << 20)}}),
     NOTHING),
    ("a YAML alias bomb: refused", lambda api: api("POST", CM, YAML_BOMB, "application/yaml"), NOTHING),
    ("create", lambda api: api("POST", CM, configmap("cm1", labels={"app": "a"})),
     lambda a: (a.body["metadata"]["name"], a.body["data"], bool(a.body["metadata"]["resourceVersion"]))),
    ("create again: 409 AlreadyExists", lambda api: api("POST", CM, configmap("cm1")), NOTHING),
    ("data that is not a string: 400, nothing created",
     lambda api: (api("POST", CM, {**configmap("listdata"), "data": {"k": [[1]]}}), api("GET", f"{CM}/listdata"))[1],
     NOTHING),
    ("data that is not a string: 400 BadRequest", lambda api: api("POST", CM, {**configmap("numdata"), "data": {"k": 1}}),
     NOTHING),
    ("patch data to a number: 400", lambda api: api("PATCH", f"{CM}/cm1", {"data": {"n": 2}}, MERGE), NOTHING),
    ("get a missing object: 404 NotFound", lambda api: api("GET", f"{CM}/nope"), NOTHING),
    ("create with an invalid name: 422 Invalid", lambda api: api("POST", CM, configmap("Bad_Name")),
     lambda a: [c.get("field") for c in a.body["details"]["causes"]]),
    ("list by label", lambda api: api("GET", CM, labelSelector="app=a"), names),
    ("watch with initial events, ended by a bookmark", _initial_events, lambda a: a.body),
    ("list by field", lambda api: api("GET", CM, fieldSelector="metadata.name=cm1"), names),
    ("list by a bad selector: 400", lambda api: api("GET", CM, labelSelector="app in (a"), NOTHING),
    ("merge patch", lambda api: api("PATCH", f"{CM}/cm1", {"data": {"m": "1"}}, MERGE), lambda a: a.body["data"]),
    ("JSON patch", lambda api: api("PATCH", f"{CM}/cm1", [{"op": "add", "path": "/data/j", "value": "2"}], JSON_PATCH),
     lambda a: a.body["data"]),
    ("JSON patch whose test fails: 422", lambda api: api("PATCH", f"{CM}/cm1", [{"op": "test", "path": "/data/j",
                                                                               "value": "nope"}], JSON_PATCH), NOTHING),
    ("strategic merge patch", lambda api: api("PATCH", f"{CM}/cm1", {"data": {"s": "3"}}, STRATEGIC),
     lambda a: a.body["data"]),
    ("server-side apply creates", lambda api: api("PATCH", f"{CM}/applied", yaml.safe_dump(
        {**configmap("applied", labels={"app": "a"}), "data": {"k": "v", "drop": "1"}}), APPLY, fieldManager="diff"),
     lambda a: (a.body["data"], ownership(a))),
    ("apply again: no change, no write", lambda api: _reapplied(api), lambda a: a.body),
    ("apply a field another manager set differently: 409 Conflict", lambda api: _apply(api, {"k": "other"}, "rival"),
     lambda a: (a.body["message"], a.body["details"]["causes"])),
    ("apply the same value: both own it", lambda api: _apply(api, {"k": "v"}, "rival"), ownership),
    ("apply with force: the field changes hands", lambda api: _apply(api, {"k": "forced"}, "bully", force="true"),
     lambda a: (a.body["data"], ownership(a))),
    ("apply without a field it applied before: removed", lambda api: _apply(
        api, {"k": "v"}, "diff", labels={"app": "a"}, force="true"), lambda a: (a.body["data"], ownership(a))),
    ("a merge patch moves ownership to its manager", lambda api: api(
        "PATCH", f"{CM}/applied", {"metadata": {"labels": {"app": "edited"}}}, MERGE, fieldManager="editor"), ownership),
    ("apply over an updater's field: 409 naming it with its version", lambda api: _apply(
        api, {"k": "forced"}, "diff", labels={"app": "a"}), lambda a: (a.body["message"], a.body["details"]["causes"])),
    ("apply without a fieldManager: 400", lambda api: api("PATCH", f"{CM}/applied", yaml.safe_dump(
        configmap("applied")), APPLY), NOTHING),
    ("force on a merge patch: refused", lambda api: api("PATCH", f"{CM}/applied", {"data": {"f": "1"}}, MERGE,
                                                       force="true"), NOTHING),
    ("apply to the status of a missing object: 404", lambda api: api(
        "PATCH", f"{TJ}/nowhere/status", yaml.safe_dump(job("nowhere")), APPLY, fieldManager="diff"), NOTHING),
    ("update with a stale resourceVersion: 409 Conflict", _stale_update, NOTHING),
    ("delete held by a finalizer: still there, deletionTimestamp set", _finalized_delete,
     lambda a: (bool(a.body["metadata"].get("deletionTimestamp")), a.body["metadata"].get("finalizers"))),
    ("finalizer removed: gone", _release_finalizer, NOTHING),
    ("delete a missing object: 404", lambda api: api("DELETE", f"{CM}/nope"), NOTHING),
    ("delete with propagationPolicy Foreground", lambda api: api("DELETE", f"{CM}/cm1",
                                                                 {"propagationPolicy": "Foreground"}), NOTHING),
    ("watch from a resourceVersion", _watch_from, lambda a: a.body["events"]),
    ("delete an owner, Background: its child is collected", _delete_owner("Background"), NOTHING),
    ("delete an owner, Orphan: its child stays, unowned", _delete_owner("Orphan"),
     lambda a: (a.body["metadata"]["name"], a.body["metadata"].get("ownerReferences"))),
    ("delete an owner, Foreground: it waits for its child", _foreground_owner_waits, lambda a: a.body),
    ("custom resource: create with defaults", lambda api: api("POST", TJ, job("j1")),
     lambda a: (a.body["spec"]["replicas"], a.body["spec"]["algorithm"]["name"], a.body["metadata"]["generation"])),
    ("custom resource: CEL rule refused, the field named", lambda api: api(
        "POST", TJ, {**job("j2", 1), "spec": {"replicas": 1, "elastic": {"minReplicas": 2, "maxReplicas": 3}}}),
     lambda a: sorted(c.get("field") for c in a.body["details"]["causes"])),
    ("custom resource: schema refused", lambda api: api("POST", TJ, job("j3", 0)),
     lambda a: sorted(c.get("field") for c in a.body["details"]["causes"])),
    ("custom resource: the template's Kubernetes types refused, each field named", lambda api: api(
        "POST", TJ, {**job("j4"), "spec": {"template": BAD_TEMPLATE}}),
     lambda a: sorted((c.get("field"), c.get("reason")) for c in a.body["details"]["causes"])),
    ("custom resource: a rule on two number fields written as integers compares numbers", lambda api: api(
        "POST", TJ, {**job("j7"), "spec": {"faultDetection": {"warmupHangTimeoutSeconds": 5, "hangTimeoutFloorSeconds": 6}}}),
     lambda a: sorted(c.get("field") for c in a.body["details"]["causes"])),
    ("custom resource: an unknown key in a volume pruned, as in a Pod", lambda api: api(
        "POST", TJ, {**job("j5"), "spec": {"template": {"volumes": [{"name": "v", "emptyDir": {}, "junk": 1}]}}}),
     lambda a: a.body["spec"]["template"]["volumes"]),
    ("custom resource: an unknown key in a volume, strict: 400 naming it", lambda api: api(
        "POST", TJ, {**job("j6"), "spec": {"template": {"volumes": [{"name": "v", "emptyDir": {}, "junk": 1}]}}},
        fieldValidation="Strict"), lambda a: 'unknown field "spec.template.volumes[0].junk"' in a.body["message"]),
    ("status subresource: spec ignored", lambda api: api("PATCH", f"{TJ}/j1/status",
                                                         {"spec": {"replicas": 5}, "status": {"phase": "Running"}}, MERGE),
     lambda a: (a.body["spec"]["replicas"], a.body["status"]["phase"], a.body["metadata"]["generation"])),
    ("main resource: status ignored", lambda api: api("PATCH", f"{TJ}/j1", {"status": {"phase": "Failed"}}, MERGE),
     lambda a: a.body["status"]["phase"]),
    ("scale subresource: get", lambda api: api("GET", f"{TJ}/j1/scale"),
     lambda a: (a.body["kind"], a.body["spec"]["replicas"])),
    ("scale subresource: patch", lambda api: api("PATCH", f"{TJ}/j1/scale", {"spec": {"replicas": 3}}, MERGE),
     lambda a: a.body["spec"]["replicas"]),
    ("after scale", lambda api: api("GET", f"{TJ}/j1"), lambda a: (a.body["spec"]["replicas"], a.body["metadata"]["generation"])),
    ("unsupported media type: 415", lambda api: api("PATCH", f"{CM}/applied", {"data": {}}, "text/plain"), NOTHING),
    ("list from a resourceVersion not reached yet: 504 after waiting",
     lambda api: api("GET", CM, resourceVersion=str(int(api("GET", CM).body["metadata"]["resourceVersion"]) + 100_000)),
     lambda a: (a.body["details"]["causes"], a.body["details"]["retryAfterSeconds"])),
    ("watch from a resourceVersion not reached yet: no events, no error", _future_watch, lambda a: a.body),
    ("list at exactly a compacted resourceVersion: 410 Expired", _compacted_list, lambda a: a.body["message"]),
]


def test_the_embedded_server_answers_as_kube_apiserver_does(apis: dict[str, Api]) -> None:
    def fields(agree_on: Callable[[Answer], Any], answer: Answer) -> Any:
        try:
            return agree_on(answer)
        except (KeyError, TypeError, IndexError) as exc:  # the field is missing: that is an answer too
            return f"<missing {exc}>"

    differences = []
    for name, request, agree_on in STEPS:
        answers = {plane: request(api) for plane, api in apis.items()}
        seen = {plane: (a.status, a.reason, fields(agree_on, a)) for plane, a in answers.items()}
        if seen["embedded"] != seen["real"] and name not in ALLOWED:
            differences.append(f"{name}:\n  embedded {seen['embedded']}\n  real     {seen['real']}\n"
                               f"  real body: {json.dumps(answers['real'].body)[:400]}")
    assert not differences, "the embedded server differs from kube-apiserver:\n" + "\n".join(differences)
