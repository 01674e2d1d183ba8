"""The embedded API server's core semantics, over HTTP: CRUD, resourceVersion/generation,
status isolation, selectors, patches, finalizers, graceful pod deletion, GC, binding and logs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from loco_local.apiserver import APIServer

PODS = "/api/v1/namespaces/default/pods"


class Client:
    """Minimal JSON client: every call returns ``(status, body)``."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url = session, url

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                      headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = json.dumps(body) if body is not None else None
        async with self.session.request(method, self.url + path, data=data,
                                        headers={"Content-Type": content_type, **(headers or {})}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text and resp.content_type == "application/json" else text

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        return await self.request("POST", path, body)

    async def put(self, path: str, body: Any) -> tuple[int, Any]:
        return await self.request("PUT", path, body)

    async def patch(self, path: str, body: Any, kind: str = "merge") -> tuple[int, Any]:
        return await self.request("PATCH", path, body, f"application/{kind}-patch+json")

    async def delete(self, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.request("DELETE", path, body)


@pytest.fixture
async def server(tmp_path):
    srv = APIServer(port=0, log_root=tmp_path / "logs")
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def api(server):
    async with aiohttp.ClientSession(headers=server.auth_headers) as session:
        yield Client(session, server.url)


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}}


async def eventually(check, timeout_s: float = 10.0):
    """Poll an async predicate until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_create_get_list_delete_round_trip(api):
    status, created = await api.post(PODS, pod("a"))
    assert status == 201
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert created["status"]["phase"] == "Pending"
    status, got = await api.get(f"{PODS}/a")
    assert status == 200 and got["metadata"]["uid"] == meta["uid"]
    status, listed = await api.get(PODS)
    assert listed["kind"] == "PodList" and [p["metadata"]["name"] for p in listed["items"]] == ["a"]
    assert int(listed["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])
    status, _ = await api.delete(f"{PODS}/a")
    assert status == 200
    status, body = await api.get(f"{PODS}/a")
    assert status == 404 and body["kind"] == "Status" and body["reason"] == "NotFound"
    assert body["message"] == 'pods "a" not found'


async def test_duplicate_create_is_already_exists(api):
    await api.post(PODS, pod("a"))
    status, body = await api.post(PODS, pod("a"))
    assert status == 409 and body["reason"] == "AlreadyExists"


async def test_create_in_missing_namespace_is_not_found(api):
    status, body = await api.post("/api/v1/namespaces/nope/pods", pod("a"))
    assert status == 404 and body["message"] == 'namespaces "nope" not found'


async def test_generate_name_and_invalid_name(api):
    status, created = await api.post("/api/v1/namespaces/default/configmaps",
                                     {"metadata": {"generateName": "cfg-"}, "data": {"a": "1"}})
    assert status == 201 and created["metadata"]["name"].startswith("cfg-") and len(created["metadata"]["name"]) == 9
    status, body = await api.post("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "Bad_Name"}})
    assert status == 422 and body["reason"] == "Invalid" and body["details"]["causes"][0]["field"] == "metadata.name"


@pytest.mark.parametrize("plural, kind, field, value, go_kind", [
    ("configmaps", "ConfigMap", "data", {"k": 1}, "number"),
    ("configmaps", "ConfigMap", "binaryData", {"k": ["x"]}, "array"),
    ("secrets", "Secret", "stringData", {"k": True}, "bool"),
    ("secrets", "Secret", "data", {"k": {"x": "y"}}, "object"),
])
async def test_data_that_is_not_strings_is_a_400_and_nothing_is_stored(api, plural, kind, field, value, go_kind):
    """kube-apiserver's decoder refuses these before validation; the embedded server once stored them."""
    path = f"/api/v1/namespaces/default/{plural}"
    status, body = await api.post(path, {"metadata": {"name": "d"}, field: value})
    assert (status, body["reason"]) == (400, "BadRequest")
    assert body["message"] == (f'{kind} in version "v1" cannot be handled as a {kind}: json: cannot unmarshal '
                               f"{go_kind} into Go struct field {kind}.{field} of type string")
    assert (await api.get(f"{path}/d"))[0] == 404
    # nor can an update put it there
    _, good = await api.post(path, {"metadata": {"name": "d"}, field: {"k": "MQ=="}})
    good[field if field != "stringData" else "data"] = value  # stringData is folded into data on create
    status, body = await api.put(f"{path}/d", good)
    assert status == 400 and "cannot be handled" in body["message"]
    # a patch that would: 422 naming the field "patch" (kube-apiserver decodes the patched object)
    status, body = await api.patch(f"{path}/d", {field: value})
    assert (status, body["reason"], body["details"]["causes"][0]["field"]) == (422, "Invalid", "patch")
    assert body["message"].endswith(f"into Go struct field {kind}.{field} of type string")


async def test_resource_version_changes_on_every_write_and_put_conflicts_when_stale(api):
    path = "/api/v1/namespaces/default/configmaps"
    _, first = await api.post(path, {"metadata": {"name": "c"}, "data": {"k": "1"}})
    first["data"]["k"] = "2"
    status, second = await api.put(f"{path}/c", first)
    assert status == 200 and int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    first["data"]["k"] = "3"  # still carries the old resourceVersion
    status, body = await api.put(f"{path}/c", first)
    assert status == 409 and body["reason"] == "Conflict" and "has been modified" in body["message"]
    # a no-op write stores nothing and keeps the resourceVersion
    status, same = await api.put(f"{path}/c", second)
    assert same["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]


async def test_generation_bumps_on_spec_change_only_and_status_is_a_subresource(api):
    status, created = await api.post(PODS, pod("a"))
    rv = created["metadata"]["resourceVersion"]
    # metadata change: new resourceVersion, same generation
    _, labelled = await api.patch(f"{PODS}/a", {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 1 and labelled["metadata"]["resourceVersion"] != rv
    # main resource ignores status
    _, ignored = await api.patch(f"{PODS}/a", {"status": {"phase": "Running"}})
    assert ignored["status"]["phase"] == "Pending"
    # /status ignores everything but status
    _, status_written = await api.patch(f"{PODS}/a/status", {"status": {"phase": "Running"},
                                                            "spec": {"nodeName": "elsewhere"}})
    assert status_written["status"]["phase"] == "Running" and "nodeName" not in status_written["spec"]
    assert status_written["metadata"]["generation"] == 1
    # spec change bumps generation
    _, changed = await api.patch(f"{PODS}/a", {"spec": {"activeDeadlineSeconds": 5}})
    assert changed["metadata"]["generation"] == 2


async def test_label_and_field_selectors(api):
    await api.post(PODS, pod("a", app="x", tier="web"))
    await api.post(PODS, pod("b", app="y"))
    await api.post(PODS, pod("c"))
    await api.patch(f"{PODS}/b/status", {"status": {"phase": "Running"}})

    async def names(query: str) -> list[str]:
        status, body = await api.get(f"{PODS}?{query}")
        assert status == 200, body
        return [p["metadata"]["name"] for p in body["items"]]

    assert await names("labelSelector=app%3Dx") == ["a"]
    assert await names("labelSelector=app%20in%20(x,y)") == ["a", "b"]
    assert await names("labelSelector=app%20notin%20(x)") == ["b", "c"]
    assert await names("labelSelector=!app") == ["c"]
    assert await names("labelSelector=app,tier!=db") == ["a", "b"]
    assert await names("fieldSelector=status.phase%3DRunning") == ["b"]
    assert await names("fieldSelector=metadata.name!%3Da") == ["b", "c"]
    status, body = await api.get(f"{PODS}?fieldSelector=spec.bogus%3D1")
    assert status == 400 and "field label not supported" in body["message"]
    status, all_ns = await api.get("/api/v1/pods?limit=500")
    assert len(all_ns["items"]) == 3


async def test_patch_types_including_kopf_resource_version_test(api):
    await api.post(PODS, pod("a"))
    _, current = await api.get(f"{PODS}/a")
    rv = current["metadata"]["resourceVersion"]
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
           {"op": "add", "path": "/metadata/finalizers", "value": ["kopf.zalando.org/KopfFinalizerMarker"]}]
    status, patched = await api.patch(f"{PODS}/a", ops, kind="json")
    assert status == 200 and patched["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
    status, body = await api.patch(f"{PODS}/a", ops, kind="json")  # rv is stale now
    assert status == 422
    # strategic merge: containers merge by name (an image is one of the few fields a pod update may change) ...
    await api.post(PODS, {**pod("two"), "spec": {"containers": [
        {"name": "main", "image": "busybox", "env": [{"name": "A", "value": "1"}]}, {"name": "side", "image": "x"}]}})
    _, merged = await api.patch(f"{PODS}/two", {"spec": {"containers": [{"name": "side", "image": "y"}]}},
                                kind="strategic-merge")
    assert [(c["name"], c["image"]) for c in merged["spec"]["containers"]] == [("main", "busybox"), ("side", "y")]
    assert merged["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]
    # ... and as kube-apiserver, any other change to a pod's spec is refused naming what changed
    smp = {"spec": {"containers": [{"name": "main", "env": [{"name": "B", "value": "2"}]},
                                   {"name": "side", "$patch": "delete"}]}}
    status, body = await api.patch(f"{PODS}/two", smp, kind="strategic-merge")
    assert status == 422 and "pod updates may not change fields other than" in body["message"], body
    assert "spec.containers" in body["message"] and body["details"]["causes"][0]["field"] == "spec"
    # merge patch null deletes
    _, merged = await api.patch(f"{PODS}/a", {"metadata": {"finalizers": None}})
    assert "finalizers" not in merged["metadata"]
    # server-side apply has its own tests (test_local_apiserver_apply.py); without a field manager it is a 422
    status, body = await api.request("PATCH", f"{PODS}/a", {}, "application/apply-patch+yaml")
    assert status == 422 and "fieldManager" in body["message"]
    # as kube-apiserver (e2e/test_api_differential.py): an unusable media type is 415 before the object is looked up
    status, body = await api.request("PATCH", f"{PODS}/missing", {}, "text/plain")
    assert (status, body["reason"]) == (415, "UnsupportedMediaType"), body


async def test_finalizers_keep_object_until_removed(api):
    path = "/api/v1/namespaces/default/configmaps"
    await api.post(path, {"metadata": {"name": "c", "finalizers": ["example.dev/hold"]}})
    status, body = await api.delete(f"{path}/c")
    assert status == 202 and body["metadata"]["deletionTimestamp"]
    status, still = await api.get(f"{path}/c")
    assert status == 200 and still["metadata"]["deletionTimestamp"]
    status, body = await api.patch(f"{path}/c", {"metadata": {"finalizers": ["example.dev/hold", "new"]}})
    assert status == 422  # no new finalizers on a deleting object
    status, _ = await api.patch(f"{path}/c", {"metadata": {"finalizers": None}})
    assert status == 200
    status, _ = await api.get(f"{path}/c")
    assert status == 404


async def test_bound_pod_is_deleted_gracefully_and_unbound_at_once(api):
    await api.post(PODS, pod("unbound"))
    status, _ = await api.delete(f"{PODS}/unbound")
    assert (await api.get(f"{PODS}/unbound"))[0] == 404
    body = pod("bound")
    body["spec"]["terminationGracePeriodSeconds"] = 7
    await api.post(PODS, body)
    status, result = await api.post(f"{PODS}/bound/binding",
                                    {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "bound"},
                                     "target": {"kind": "Node", "name": "node-1"}})
    assert status == 201
    status, _ = await api.post(f"{PODS}/bound/binding", {"target": {"kind": "Node", "name": "node-2"}})
    assert status == 409
    status, deleting = await api.delete(f"{PODS}/bound")
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 7 and deleting["metadata"]["deletionTimestamp"]
    assert (await api.get(f"{PODS}/bound"))[0] == 200
    # the kubelet reports the container's end: the pod stays until the kubelet's final delete
    status, _ = await api.patch(f"{PODS}/bound/status", {"status": {"phase": "Failed"}})
    assert status == 200 and (await api.get(f"{PODS}/bound"))[0] == 200
    status, _ = await api.request("DELETE", f"{PODS}/bound?gracePeriodSeconds=0")
    assert (await api.get(f"{PODS}/bound"))[0] == 404


async def test_owner_deletion_garbage_collects_dependents_and_orphan_keeps_them(api):
    path = "/api/v1/namespaces/default/configmaps"
    _, owner = await api.post(path, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    await api.post(path, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    await api.post(PODS, {**pod("child-pod"), "metadata": {"name": "child-pod", "ownerReferences": [ref]}})
    await api.delete(f"{path}/owner")

    async def gone() -> bool:
        return (await api.get(f"{path}/child"))[0] == 404 and (await api.get(f"{PODS}/child-pod"))[0] == 404
    await eventually(gone)

    _, owner = await api.post(path, {"metadata": {"name": "owner2"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner2", "uid": owner["metadata"]["uid"]}
    await api.post(path, {"metadata": {"name": "kept", "ownerReferences": [ref]}})
    await api.delete(f"{path}/owner2", {"propagationPolicy": "Orphan"})
    status, kept = await api.get(f"{path}/kept")
    assert status == 200 and "ownerReferences" not in kept["metadata"]


async def test_foreground_deletion_waits_for_dependents(api):
    path = "/api/v1/namespaces/default/configmaps"
    _, owner = await api.post(path, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    await api.post(path, {"metadata": {"name": "child", "ownerReferences": [ref], "finalizers": ["hold"]}})
    status, body = await api.delete(f"{path}/owner", {"propagationPolicy": "Foreground"})
    assert "foregroundDeletion" in body["metadata"]["finalizers"]
    await eventually(lambda: _deleting(api, f"{path}/child"))
    assert (await api.get(f"{path}/owner"))[0] == 200  # blocked by the child's finalizer
    await api.patch(f"{path}/child", {"metadata": {"finalizers": None}})

    async def both_gone() -> bool:
        return (await api.get(f"{path}/owner"))[0] == 404 and (await api.get(f"{path}/child"))[0] == 404
    await eventually(both_gone)


async def _deleting(api: Client, path: str) -> bool:
    status, body = await api.get(path)
    return status == 200 and bool(body["metadata"].get("deletionTimestamp"))


async def test_namespace_deletion_removes_its_content(api):
    await api.post("/api/v1/namespaces", {"metadata": {"name": "team"}})
    await api.post("/api/v1/namespaces/team/configmaps", {"metadata": {"name": "c"}})
    status, ns = await api.delete("/api/v1/namespaces/team")
    status, body = await api.post("/api/v1/namespaces/team/configmaps", {"metadata": {"name": "d"}})
    assert status in (403, 404)

    async def ns_gone() -> bool:
        return (await api.get("/api/v1/namespaces/team"))[0] == 404
    await eventually(ns_gone)
    assert (await api.get("/api/v1/namespaces/team/configmaps/c"))[0] == 404


async def test_delete_collection_with_selector(api):
    await api.post(PODS, pod("a", job="j"))
    await api.post(PODS, pod("b", job="j"))
    await api.post(PODS, pod("c", job="k"))
    status, body = await api.delete(f"{PODS}?labelSelector=job%3Dj")
    assert status == 200
    _, listed = await api.get(PODS)
    assert [p["metadata"]["name"] for p in listed["items"]] == ["c"]


async def test_pod_logs_container_tail_and_follow(api, server, tmp_path):
    await api.post(PODS, pod("a"))
    status, body = await api.get(f"{PODS}/a/log")
    assert status == 400 and "waiting to start" in body["message"]
    log_file = tmp_path / "logs" / "default" / "a" / "main.log"
    log_file.parent.mkdir(parents=True)
    log_file.write_text("one\ntwo\nthree\n")
    status, text = await api.get(f"{PODS}/a/log?tailLines=2")
    assert status == 200 and text == "two\nthree\n"
    status, body = await api.get(f"{PODS}/a/log?container=nope")
    assert status == 400 and "not valid" in body["message"]

    async with aiohttp.ClientSession(headers=server.auth_headers) as session:
        async with session.get(f"{server.url}{PODS}/a/log?follow=true&container=main") as resp:
            assert (await resp.content.readline()) == b"one\n"
            await resp.content.readline(), await resp.content.readline()
            with log_file.open("a") as handle:
                handle.write("four\n")
            line = await asyncio.wait_for(resp.content.readline(), 10)
            assert line == b"four\n"
            await api.patch(f"{PODS}/a/status", {"status": {"phase": "Succeeded"}})
            rest = await asyncio.wait_for(resp.content.read(), 10)  # stream ends once the pod finished
            assert rest == b""


async def test_scheduling_gates_may_only_be_removed_and_a_gated_pod_cannot_be_bound(api):
    gated = {**pod("gated"), "spec": {**pod("gated")["spec"], "schedulingGates": [{"name": "loco.dev/gang"}]}}
    status, created = await api.post(PODS, gated)
    assert status == 201 and [(c["type"], c["status"], c["reason"]) for c in created["status"]["conditions"]] == [
        ("PodScheduled", "False", "SchedulingGated")]
    status, body = await api.post(f"{PODS}/gated/binding", {"target": {"kind": "Node", "name": "node-1"}})
    assert status == 409 and "non-empty .spec.schedulingGates" in body["message"], body
    status, body = await api.patch(f"{PODS}/gated", {"spec": {"schedulingGates": [
        {"name": "loco.dev/gang"}, {"name": "example.dev/more"}]}})
    assert status == 422 and "only deletion is allowed, but found new scheduling gate 'example.dev/more'" in \
        body["message"] and body["details"]["causes"][0]["field"] == "spec.schedulingGates[1].name", body
    # what the operator sends to release a gang (a strategic merge patch deleting the list)
    status, released = await api.patch(f"{PODS}/gated", {"spec": {"schedulingGates": None}}, kind="strategic-merge")
    assert status == 200 and "schedulingGates" not in released["spec"]
    status, _ = await api.post(f"{PODS}/gated/binding", {"target": {"kind": "Node", "name": "node-1"}})
    assert status == 201


def test_strategic_merge_patch_merges_lists_by_key_and_deletes_with_dollar_patch():
    from loco_local.apiserver.patch import apply_patch

    base = {"spec": {"containers": [{"name": "main", "image": "a", "env": [{"name": "A", "value": "1"}]},
                                    {"name": "side", "image": "b"}]}}
    smp = {"spec": {"containers": [{"name": "main", "env": [{"name": "B", "value": "2"}]},
                                   {"name": "side", "$patch": "delete"}]}}
    merged = apply_patch(base, "application/strategic-merge-patch+json", smp, custom=False)
    assert [c["name"] for c in merged["spec"]["containers"]] == ["main"]
    assert merged["spec"]["containers"][0]["image"] == "a"
    assert [e["name"] for e in merged["spec"]["containers"][0]["env"]] == ["A", "B"]


async def test_eviction_marks_the_pod_disrupted_and_deletes_it_gracefully(api):
    """pods/eviction, what `kubectl drain` posts: a DisruptionTarget condition (the operator's failure policy does not
    count such a worker) and a graceful delete with the Eviction's deleteOptions."""
    body = pod("drained")
    body["spec"]["terminationGracePeriodSeconds"] = 30
    await api.post(PODS, body)
    await api.post(f"{PODS}/drained/binding", {"target": {"kind": "Node", "name": "node-1"}})
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "drained", "namespace": "default"},
                "deleteOptions": {"gracePeriodSeconds": 5}}
    status, result = await api.post(f"{PODS}/drained/eviction", eviction)
    assert status == 201 and result["status"] == "Success", result
    status, evicted = await api.get(f"{PODS}/drained")
    assert status == 200 and evicted["metadata"]["deletionGracePeriodSeconds"] == 5
    target = next(c for c in evicted["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (target["status"], target["reason"]) == ("True", "EvictionByEvictionAPI")
    status, _ = await api.post(f"{PODS}/other/eviction", {**eviction, "metadata": {"name": "other"}})
    assert status == 404
    status, _ = await api.post(f"{PODS}/drained/eviction", {**eviction, "metadata": {"name": "someone-else"}})
    assert status == 400
    status, body = await api.get("/api/v1")
    sub = next(r for r in body["resources"] if r["name"] == "pods/eviction")
    assert (sub["group"], sub["version"], sub["kind"], sub["verbs"]) == ("policy", "v1", "Eviction", ["create"])

async def test_discovery_and_version(api):
    status, body = await api.get("/api")
    assert body["versions"] == ["v1"]
    status, body = await api.get("/api/v1")
    names = {r["name"] for r in body["resources"]}
    assert {"pods", "pods/status", "pods/log", "pods/binding", "nodes", "nodes/status", "events",
            "namespaces", "services", "configmaps", "secrets", "serviceaccounts"} <= names
    status, body = await api.get("/apis")
    groups = {g["name"] for g in body["groups"]}
    assert {"coordination.k8s.io", "events.k8s.io", "apiextensions.k8s.io"} <= groups
    status, body = await api.get("/version")
    assert body["major"] == "1"
    status, body = await api.get("/apis/nope.dev/v1")
    assert status == 404


async def test_table_output_for_pods(api):
    await api.post(PODS, pod("a"))
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    status, body = await api.get(PODS, headers={"Accept": accept})
    assert body["kind"] == "Table"
    assert [c["name"] for c in body["columnDefinitions"]][:5] == ["Name", "Ready", "Status", "Restarts", "Age"]
    assert body["rows"][0]["cells"][:4] == ["a", "0/1", "Pending", 0]
    assert body["rows"][0]["object"]["metadata"]["name"] == "a"


async def test_secret_string_data_is_folded_into_data(api):
    _, secret = await api.post("/api/v1/namespaces/default/secrets",
                               {"metadata": {"name": "s"}, "stringData": {"token": "abc"}})
    assert secret["data"] == {"token": "YWJj"} and "stringData" not in secret and secret["type"] == "Opaque"


async def test_events_posted_through_either_api_are_listed_by_both(api):
    regarding = {"kind": "Pod", "name": "a", "namespace": "default", "uid": "u-1", "apiVersion": "v1"}
    status, posted = await api.post("/apis/events.k8s.io/v1/namespaces/default/events", {
        "metadata": {"generateName": "a."}, "regarding": regarding, "note": "pulled the image",
        "reason": "Pulled", "type": "Normal", "reportingController": "loco-kubelet", "reportingInstance": "node-1",
        "action": "Pull", "eventTime": "2026-01-01T00:00:00.000000Z"})
    assert status == 201 and posted["note"] == "pulled the image" and posted["regarding"] == regarding
    status, core = await api.get("/api/v1/namespaces/default/events?fieldSelector="
                                 "involvedObject.name%3Da,involvedObject.uid%3Du-1")
    assert [(e["message"], e["source"]["component"]) for e in core["items"]] == [("pulled the image", "loco-kubelet")]
    status, v1 = await api.get("/apis/events.k8s.io/v1/namespaces/default/events?fieldSelector=regarding.name%3Da")
    assert [e["note"] for e in v1["items"]] == ["pulled the image"]


async def test_protobuf_requests_get_json_and_tables_for_nodes_and_services(api):
    status, body = await api.get(PODS, headers={"Accept": "application/vnd.kubernetes.protobuf,application/json"})
    assert status == 200 and body["kind"] == "PodList"
    node = {"metadata": {"name": "node-1", "labels": {"node-role.kubernetes.io/worker": ""}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "nodeInfo": {"kubeletVersion": "v1.32.0-loco"}}}
    status, created = await api.post("/api/v1/nodes", node)
    assert status == 201 and created["status"]["nodeInfo"]["kubeletVersion"] == "v1.32.0-loco"
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io"
    _, table = await api.get("/api/v1/nodes", headers={"Accept": accept})
    assert table["rows"][0]["cells"][:3] == ["node-1", "Ready", "worker"]
    await api.post("/api/v1/namespaces/default/services",
                   {"metadata": {"name": "svc"}, "spec": {"clusterIP": "None", "ports": [{"port": 8080}]}})
    _, table = await api.get("/api/v1/namespaces/default/services", headers={"Accept": accept})
    assert [c["name"] for c in table["columnDefinitions"]][:5] == ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)"]
    assert table["rows"][0]["cells"][:5] == ["svc", "ClusterIP", "None", "<none>", "8080/TCP"]


async def test_wrong_method_and_unknown_paths_are_status_errors(api):
    status, body = await api.request("PUT", PODS, {})
    assert status == 405 and body["reason"] == "MethodNotAllowed"
    status, body = await api.get("/apis/nope.dev/v1/namespaces/default/things")
    assert status == 404 and body["kind"] == "Status"
    status, body = await api.request("POST", PODS, None, headers={}, content_type="application/json")
    assert status == 400 and body["reason"] == "BadRequest"


async def test_pod_without_containers_or_with_duplicate_names_is_invalid(api):
    status, body = await api.post(PODS, {"metadata": {"name": "empty"}, "spec": {"containers": []}})
    assert status == 422 and body["details"]["causes"][0]["field"] == "spec.containers"
    twins = {"metadata": {"name": "twins"}, "spec": {"containers": [{"name": "a"}, {"name": "a"}]}}
    status, body = await api.post(PODS, twins)
    assert status == 422 and body["message"] == (
        'Pod "twins" is invalid: spec.containers[1].name: Duplicate value: "a"')
