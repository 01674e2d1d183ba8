"""The embedded API server keeps its objects in SQLite: a restart (or a kill -9) loses nothing it acknowledged."""

from __future__ import annotations

import os
import stat

import aiohttp
import pytest

from loco_local.apiserver import APIServer
from loco_local.apiserver.errors import APIError
from loco_local.apiserver.store import Store
from test_local_apiserver_crd import WIDGET_CRD

CMS = ("", "configmaps")


def test_objects_and_the_resource_version_survive_a_new_store(tmp_path):
    path = tmp_path / "api.db"
    first = Store(path=path)
    first.put(CMS, {"metadata": {"name": "a", "namespace": "ns"}, "data": {"k": "1"}})
    first.put(CMS, {"metadata": {"name": "b", "namespace": "ns"}})
    first.remove(CMS, "ns", "b")
    first.put(CMS, {"metadata": {"name": "a", "namespace": "ns"}, "data": {"k": "2"}})
    version = first.resource_version

    second = Store(path=path)  # as after kill -9: nothing was closed
    assert second.resource_version == version == 4
    assert [o["metadata"]["name"] for o in second.list(CMS)] == ["a"]
    assert second.get(CMS, "ns", "a")["data"] == {"k": "2"}
    assert second.get(CMS, "ns", "a")["metadata"]["resourceVersion"] == "4"
    assert second.put(CMS, {"metadata": {"name": "c", "namespace": "ns"}})["metadata"]["resourceVersion"] == "5"
    with pytest.raises(APIError) as gone:  # the watch history is not kept: an older version relists
        second.watch(CMS, 2)
    assert gone.value.code == 410
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_memory_store_keeps_nothing_on_disk(tmp_path):
    Store().put(CMS, {"metadata": {"name": "a", "namespace": "ns"}})
    assert list(tmp_path.iterdir()) == []


async def test_a_restarted_server_serves_its_custom_resources_and_namespaces_again(tmp_path):
    path = tmp_path / "api.db"
    first = APIServer(port=0, store_path=path)
    await first.start()
    widgets = "/apis/example.dev/v1/namespaces/default/widgets"
    async with aiohttp.ClientSession(headers=first.auth_headers) as session:
        async with session.post(first.url + "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                                json=WIDGET_CRD) as resp:
            assert resp.status == 201, await resp.text()
        async with session.post(first.url + widgets, json={"apiVersion": "example.dev/v1", "kind": "Widget",
                                                          "metadata": {"name": "w"}, "spec": {"size": 3}}) as resp:
            assert resp.status == 201, await resp.text()
            uid = (await resp.json())["metadata"]["uid"]
    await first.stop()

    second = APIServer(port=0, store_path=path, token=first.token)
    await second.start()
    try:
        async with aiohttp.ClientSession(headers=second.auth_headers) as session:
            async with session.get(second.url + widgets + "/w") as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["metadata"]["uid"] == uid
            async with session.get(second.url + "/api/v1/namespaces") as resp:
                names = [n["metadata"]["name"] for n in (await resp.json())["items"]]
                assert names == ["default", "kube-node-lease", "kube-public", "kube-system"]
    finally:
        await second.stop()
