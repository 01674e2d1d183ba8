"""Watches on the embedded API server: initial state, replay after a resourceVersion, 410 Gone,
bookmarks, timeouts, selector transitions and many concurrent watchers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from loco_local.apiserver import APIServer

CMS = "/api/v1/namespaces/default/configmaps"


@pytest.fixture
async def server():
    srv = APIServer(port=0, history_size=20, bookmark_interval_s=0.2)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def session(server):
    async with aiohttp.ClientSession(headers=server.auth_headers) as s:
        yield s


async def write(session: aiohttp.ClientSession, server: APIServer, method: str, path: str,
                body: Any, content_type: str = "application/json") -> dict[str, Any]:
    async with session.request(method, server.url + path, data=json.dumps(body),
                               headers={"Content-Type": content_type}) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json()


class Stream:
    """Reads watch events line by line."""

    def __init__(self, resp: aiohttp.ClientResponse):
        self.resp = resp

    async def next(self, timeout_s: float = 10.0) -> dict[str, Any] | None:
        line = await asyncio.wait_for(self.resp.content.readline(), timeout_s)
        return json.loads(line) if line else None

    async def next_non_bookmark(self) -> dict[str, Any] | None:
        while True:
            event = await self.next()
            if event is None or event["type"] != "BOOKMARK":
                return event


async def open_watch(session: aiohttp.ClientSession, server: APIServer, query: str) -> Stream:
    resp = await session.get(f"{server.url}{CMS}?watch=1&{query}")
    assert resp.status == 200
    return Stream(resp)


async def test_watch_without_version_sends_current_state_then_changes(server, session):
    await write(session, server, "POST", CMS, {"metadata": {"name": "a"}})
    stream = await open_watch(session, server, "")
    event = await stream.next()
    assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "a"
    assert event["object"]["kind"] == "ConfigMap"
    await write(session, server, "PATCH", f"{CMS}/a", {"data": {"k": "v"}}, "application/merge-patch+json")
    event = await stream.next()
    assert event["type"] == "MODIFIED" and event["object"]["data"] == {"k": "v"}
    await write(session, server, "DELETE", f"{CMS}/a", {})
    event = await stream.next()
    assert event["type"] == "DELETED" and event["object"]["metadata"]["name"] == "a"
    stream.resp.close()


async def test_watch_replays_history_after_resource_version(server, session):
    first = await write(session, server, "POST", CMS, {"metadata": {"name": "a"}})
    await write(session, server, "POST", CMS, {"metadata": {"name": "b"}})
    await write(session, server, "DELETE", f"{CMS}/a", {})
    stream = await open_watch(session, server, f"resourceVersion={first['metadata']['resourceVersion']}")
    events = [await stream.next() for _ in range(2)]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b"), ("DELETED", "a")]
    stream.resp.close()


async def test_watch_from_compacted_version_gets_410_gone(server, session):
    first = await write(session, server, "POST", CMS, {"metadata": {"name": "a"}})
    for i in range(25):  # history holds 20 changes
        await write(session, server, "PATCH", f"{CMS}/a", {"data": {"i": str(i)}}, "application/merge-patch+json")
    stream = await open_watch(session, server, f"resourceVersion={first['metadata']['resourceVersion']}")
    event = await stream.next()
    assert event["type"] == "ERROR" and event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    assert await stream.next() is None  # the stream ends


async def test_watch_from_a_version_not_reached_yet_waits_for_it(server, session):
    """As kube-apiserver: no 410, no events until the store passes the version asked for."""
    ahead = server.store.resource_version + 2
    stream = await open_watch(session, server, f"resourceVersion={ahead}")
    for name in ("a", "b", "c"):  # versions ahead - 1, ahead, ahead + 1
        await write(session, server, "POST", CMS, {"metadata": {"name": name}})
    event = await stream.next()
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "c")
    assert int(event["object"]["metadata"]["resourceVersion"]) == ahead + 1
    stream.resp.close()


async def test_a_list_from_a_version_not_reached_waits_then_times_out(server, session):
    ahead = server.store.resource_version + 1

    async def later_write() -> None:
        await asyncio.sleep(0.3)
        await write(session, server, "POST", CMS, {"metadata": {"name": "late"}})

    task = asyncio.create_task(later_write())
    async with session.get(f"{server.url}{CMS}?resourceVersion={ahead}") as resp:
        assert resp.status == 200 and [i["metadata"]["name"] for i in (await resp.json())["items"]] == ["late"]
    await task
    async with session.get(f"{server.url}{CMS}?resourceVersion={ahead + 50}") as resp:
        body = await resp.json()
        assert (resp.status, body["reason"]) == (504, "Timeout")
        assert body["details"]["causes"] == [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]


async def test_watch_sends_bookmarks_and_ends_at_timeout(server, session):
    await write(session, server, "POST", CMS, {"metadata": {"name": "a"}})
    version = str(server.store.resource_version)
    stream = await open_watch(session, server, f"resourceVersion={version}&allowWatchBookmarks=true&timeoutSeconds=1")
    event = await stream.next()
    assert event["type"] == "BOOKMARK" and event["object"]["metadata"]["resourceVersion"] == version
    while (event := await stream.next()) is not None:  # ends by itself after timeoutSeconds
        assert event["type"] == "BOOKMARK"


async def test_initial_events_end_with_annotated_bookmark(server, session):
    await write(session, server, "POST", CMS, {"metadata": {"name": "a"}})
    stream = await open_watch(session, server, "sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
                                               "&allowWatchBookmarks=true")
    assert (await stream.next())["type"] == "ADDED"
    bookmark = await stream.next()
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    stream.resp.close()


async def test_selector_watch_sees_objects_enter_and_leave(server, session):
    await write(session, server, "POST", CMS, {"metadata": {"name": "a"}})
    stream = await open_watch(session, server, f"resourceVersion={server.store.resource_version}"
                                               "&labelSelector=app%3Dx")
    await write(session, server, "PATCH", f"{CMS}/a", {"metadata": {"labels": {"app": "x"}}},
                "application/merge-patch+json")
    assert (await stream.next_non_bookmark())["type"] == "ADDED"
    await write(session, server, "PATCH", f"{CMS}/a", {"metadata": {"labels": {"app": "y"}}},
                "application/merge-patch+json")
    assert (await stream.next_non_bookmark())["type"] == "DELETED"
    stream.resp.close()


async def test_many_concurrent_watchers_all_see_a_change(server, session):
    streams = [await open_watch(session, server, f"resourceVersion={server.store.resource_version}")
               for _ in range(30)]
    await write(session, server, "POST", CMS, {"metadata": {"name": "a"}})
    events = await asyncio.gather(*(s.next_non_bookmark() for s in streams))
    assert all(e["type"] == "ADDED" and e["object"]["metadata"]["name"] == "a" for e in events)
    for s in streams:
        s.resp.close()


async def test_stopping_the_server_ends_open_watches(session, server):
    srv = APIServer(port=0, token=server.token)
    await srv.start()
    stream = Stream(await session.get(f"{srv.url}{CMS}?watch=1"))
    await srv.stop()
    try:
        assert await stream.next() is None
    except aiohttp.ClientPayloadError:
        pass  # a connection cut mid-chunk is an acceptable end too


async def test_a_list_at_exactly_an_old_version_is_410_expired(server, session):
    first = await write(session, server, "POST", CMS, {"metadata": {"name": "a"}})
    await write(session, server, "POST", CMS, {"metadata": {"name": "b"}})
    old = first["metadata"]["resourceVersion"]
    async with session.get(f"{server.url}{CMS}?resourceVersion={old}&resourceVersionMatch=Exact") as resp:
        body = await resp.json()
        assert (resp.status, body["reason"]) == (410, "Expired")
    now = server.store.resource_version
    async with session.get(f"{server.url}{CMS}?resourceVersion={now}&resourceVersionMatch=Exact") as resp:
        assert resp.status == 200 and len((await resp.json())["items"]) == 2
    async with session.get(f"{server.url}{CMS}?resourceVersion={old}") as resp:  # NotOlderThan: the current state
        assert resp.status == 200 and len((await resp.json())["items"]) == 2
