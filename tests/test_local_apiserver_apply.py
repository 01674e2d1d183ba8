"""Server-side apply and managedFields on the embedded API server (issue 30 #5): create on apply, field
managers, conflicts and force, removal of fields an applier stops applying, ownership moved by updates.
The same requests are compared with kube-apiserver in e2e/test_api_differential.py."""

from __future__ import annotations

import pytest

from loco_local.apiserver import apply as applying
from test_local_apiserver import api, server  # noqa: F401  (fixtures)

CMS = "/api/v1/namespaces/default/configmaps"
APPLY = "application/apply-patch+yaml"


def cm(name: str, data: dict[str, str] | None = None, **meta) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": data or {}}


async def applied(api, name: str, body: dict, manager: str = "alice", force: bool = False) -> tuple[int, dict]:
    query = f"?fieldManager={manager}" + ("&force=true" if force else "")
    return await api.request("PATCH", f"{CMS}/{name}{query}", body, APPLY)


def owners(obj: dict) -> dict[tuple[str, str], dict]:
    return {(e["manager"], e["operation"]): e["fieldsV1"] for e in obj["metadata"]["managedFields"]}


async def test_apply_creates_and_records_the_applier_as_owner(api):
    status, obj = await applied(api, "a", cm("a", {"x": "1"}, labels={"app": "a"}))
    assert status == 201 and obj["data"] == {"x": "1"} and obj["metadata"]["labels"] == {"app": "a"}
    assert owners(obj) == {("alice", "Apply"): {"f:data": {"f:x": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}}
    entry = obj["metadata"]["managedFields"][0]
    assert entry["apiVersion"] == "v1" and entry["fieldsType"] == "FieldsV1" and entry["time"]
    status, again = await applied(api, "a", cm("a", {"x": "1"}, labels={"app": "a"}))
    assert status == 200 and again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]  # no-op


async def test_a_field_another_manager_set_differently_is_a_conflict_unless_forced(api):
    await applied(api, "b", cm("b", {"x": "1", "y": "1"}), manager="alice")
    status, body = await applied(api, "b", cm("b", {"x": "2"}), manager="bob")
    assert (status, body["reason"]) == (409, "Conflict")
    assert body["message"] == 'Apply failed with 1 conflict: conflict with "alice": .data.x'
    assert body["details"]["causes"] == [{"reason": "FieldManagerConflict", "message": 'conflict with "alice"',
                                          "field": ".data.x"}]
    # the same value is no conflict: both own it
    status, shared = await applied(api, "b", cm("b", {"x": "1"}), manager="bob")
    assert status == 200 and owners(shared)[("bob", "Apply")] == {"f:data": {"f:x": {}}}
    # force takes it over
    status, forced = await applied(api, "b", cm("b", {"x": "3"}), manager="carol", force=True)
    assert status == 200 and forced["data"] == {"x": "3", "y": "1"}
    assert owners(forced)[("carol", "Apply")] == {"f:data": {"f:x": {}}}
    assert owners(forced)[("alice", "Apply")] == {"f:data": {"f:y": {}}}
    assert ("bob", "Apply") not in owners(forced)  # its only field was taken: the entry goes


async def test_a_field_the_applier_stops_applying_is_removed_unless_someone_else_owns_it(api):
    await applied(api, "c", cm("c", {"x": "1", "y": "1", "z": "1"}), manager="alice")
    await applied(api, "c", cm("c", {"z": "1"}), manager="bob")
    status, obj = await applied(api, "c", cm("c", {"x": "1"}), manager="alice")
    assert status == 200 and obj["data"] == {"x": "1", "z": "1"}  # y removed; z stays, bob applies it too


async def test_an_update_moves_ownership_and_a_conflict_names_the_updater_with_its_version(api):
    await applied(api, "d", cm("d", {"x": "1"}), manager="alice")
    status, obj = await api.request("PATCH", f"{CMS}/d?fieldManager=editor", {"data": {"x": "2"}},
                                    "application/merge-patch+json")
    assert status == 200 and owners(obj) == {("editor", "Update"): {"f:data": {"f:x": {}}}}
    status, body = await applied(api, "d", cm("d", {"x": "3"}), manager="alice")
    assert status == 409 and body["message"] == 'Apply failed with 1 conflict: conflict with "editor" using v1: .data.x'


async def test_writes_without_a_field_manager_are_owned_by_the_user_agent(api):
    status, obj = await api.request("POST", CMS, cm("e", {"x": "1"}), headers={"User-Agent": "kubectl/v1.33.0 (linux)"})
    assert status == 201 and list(owners(obj)) == [("kubectl", "Update")]


async def test_lists_with_a_merge_key_are_owned_element_by_element():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "finalizers": ["a/b"]},
           "spec": {"containers": [{"name": "c", "image": "i", "args": ["1", "2"]}]}}
    fields = applying.to_fields_v1(applying.field_set(pod))
    assert fields == {"f:metadata": {"f:finalizers": {'v:"a/b"': {}}},
                      "f:spec": {"f:containers": {'k:{"name":"c"}': {".": {}, "f:args": {}, "f:image": {}, "f:name": {}}}}}
    assert applying.from_fields_v1(fields) == applying.field_set(pod)


async def test_apply_needs_a_field_manager_and_force_needs_apply(api):
    status, body = await api.request("PATCH", f"{CMS}/f", cm("f"), APPLY)
    assert (status, body["details"]["causes"][0]["field"]) == (422, "fieldManager"), body
    assert body["message"] == 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch'
    status, body = await api.request("PATCH", f"{CMS}/f?force=true", {"data": {}}, "application/merge-patch+json")
    assert (status, body["details"]["causes"][0]["field"]) == (422, "force"), body


@pytest.mark.parametrize("manager", ["x" * 129, "tab%09here"])
async def test_a_bad_field_manager_is_refused(api, manager):
    status, body = await api.request("POST", f"{CMS}?fieldManager={manager}", cm("g"))
    assert status == 422 and "fieldManager" in body["message"]


async def test_an_update_inside_a_list_element_takes_the_field_not_the_element(api):
    pods = "/api/v1/namespaces/default/pods"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "one"}]}}
    status, _ = await api.request("PATCH", f"{pods}/p?fieldManager=alice", pod, APPLY)
    assert status == 201
    status, obj = await api.request("PATCH", f"{pods}/p?fieldManager=editor",
                                    {"spec": {"containers": [{"name": "c", "image": "two"}]}},
                                    "application/strategic-merge-patch+json")
    assert status == 200 and obj["spec"]["containers"][0]["image"] == "two"
    element = 'k:{"name":"c"}'
    assert owners(obj)[("editor", "Update")] == {"f:spec": {"f:containers": {element: {"f:image": {}}}}}
    assert owners(obj)[("alice", "Apply")]["f:spec"]["f:containers"][element] == {".": {}, "f:name": {}}
