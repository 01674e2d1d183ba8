"""The embedded API server's door: a bearer token on every request, Kubernetes media types only, bounded
bodies, no CORS, loopback unless asked, HTTPS with the kubeconfig's CA; and a real browser page on another
origin that tries to create a Pod creates nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from loco_local.apiserver import APIServer, auth
from loco_local.apiserver.auth import MAX_BODY_BYTES
from loco_local.cli import local as local_cli
from loco_local.cluster import LocalCluster, is_loopback
from loco_local.nodes import uniform_nodes

PODS = "/api/v1/namespaces/default/pods"
CMS = "/api/v1/namespaces/default/configmaps"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": "loco", "command": ["touch", "/tmp/pwned"]}]}}


@pytest.fixture
async def server():
    srv = APIServer(port=0)
    await srv.start()
    yield srv
    await srv.stop()


async def call(srv: APIServer, method: str, path: str, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    headers = headers or {}
    skip = () if "Content-Type" in headers else ("Content-Type",)  # aiohttp would send application/octet-stream
    async with aiohttp.ClientSession(skip_auto_headers=skip) as session, \
            session.request(method, srv.url + path, data=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text.startswith("{") else {"raw": text}), dict(resp.headers)


async def pod_names(srv: APIServer) -> list[str]:
    _, listed, _ = await call(srv, "GET", PODS, headers=srv.auth_headers)
    return [p["metadata"]["name"] for p in listed["items"]]


@pytest.mark.parametrize("path", ["/api", "/api/v1", "/apis", "/version", "/openapi/v2", PODS,
                                  f"{PODS}?watch=1", "/api/v1/nodes"])
async def test_every_request_without_the_token_is_401(server, path):
    status, body, _ = await call(server, "GET", path)
    assert (status, body["reason"], body["message"]) == (401, "Unauthorized", "Unauthorized")
    status, body, _ = await call(server, "GET", path, headers={"Authorization": "Bearer " + server.token[:-1] + "x"})
    assert status == 401
    status, _, _ = await call(server, "GET", path, headers={"Authorization": server.token})  # no scheme
    assert status == 401


async def test_health_probes_need_no_token_and_the_token_opens_the_rest(server):
    for probe in ("/healthz", "/livez", "/readyz"):
        assert (await call(server, "GET", probe))[0] == 200
    assert (await call(server, "GET", PODS, headers=server.auth_headers))[0] == 200
    assert (await call(server, "GET", PODS, headers={"Authorization": f"bearer {server.token}"}))[0] == 200


async def test_writes_without_the_token_create_nothing(server):
    for method, path in (("POST", PODS), ("PUT", f"{PODS}/p"), ("PATCH", f"{PODS}/p"), ("DELETE", f"{PODS}/p")):
        status, _, _ = await call(server, method, path, json.dumps(pod("p")).encode(),
                                  {"Content-Type": "application/json"})
        assert status == 401, method
    assert await pod_names(server) == []


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
async def test_a_body_in_a_browser_simple_request_type_is_415_even_with_the_token(server, content_type):
    status, body, _ = await call(server, "POST", PODS, json.dumps(pod("plain")).encode(),
                                 {**server.auth_headers, "Content-Type": content_type})
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")
    assert "application/json" in body["message"]
    assert await pod_names(server) == []


async def test_kubernetes_media_types_and_no_content_type_are_read(server):
    assert (await call(server, "POST", CMS, json.dumps({"metadata": {"name": "j"}}).encode(),
                       {**server.auth_headers, "Content-Type": "application/json"}))[0] == 201
    assert (await call(server, "POST", CMS, b"metadata: {name: y}\n",
                       {**server.auth_headers, "Content-Type": "application/yaml"}))[0] == 201
    # the kubernetes Python client sends no Content-Type; kube-apiserver reads that as JSON too
    assert (await call(server, "POST", CMS, json.dumps({"metadata": {"name": "n"}}).encode(), server.auth_headers))[0] == 201
    status, body, _ = await call(server, "POST", CMS, json.dumps({"metadata": {"name": "o"}}).encode(),
                                 {**server.auth_headers, "Content-Type": "application/octet-stream"})
    assert status == 415


async def test_no_cors_headers_and_a_preflight_is_refused(server):
    origin = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "content-type"}
    status, _, headers = await call(server, "OPTIONS", PODS, headers=origin)
    assert status == 401
    assert not any(h.lower().startswith("access-control-") for h in headers)
    _, _, headers = await call(server, "GET", PODS, headers={**server.auth_headers, "Origin": "http://evil.example"})
    assert not any(h.lower().startswith("access-control-") for h in headers)


async def test_bodies_are_bounded(server):
    huge = json.dumps({"metadata": {"name": "huge"}, "data": {"k": "x" * MAX_BODY_BYTES}}).encode()
    status, body, _ = await call(server, "POST", CMS, huge, {**server.auth_headers, "Content-Type": "application/json"})
    assert (status, body["reason"]) == (413, "RequestEntityTooLarge")
    bomb = "\n".join(["metadata: {name: bomb}", "a0: &a0 [lol]"]
                     + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)])
    status, body, _ = await call(server, "POST", CMS, bomb.encode(), {**server.auth_headers, "Content-Type": "application/yaml"})
    assert (status, body["reason"]) == (400, "BadRequest") and "excessive aliasing" in body["message"]
    deep = ('{"metadata": {"name": "deep"}, "data": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    status, body, _ = await call(server, "POST", CMS, deep, {**server.auth_headers, "Content-Type": "application/json"})
    assert (status, body["reason"]) == (400, "BadRequest")
    _, listed, _ = await call(server, "GET", CMS, headers=server.auth_headers)
    assert [c["metadata"]["name"] for c in listed["items"]] == []
    assert (await call(server, "GET", "/healthz"))[0] == 200  # and it still serves


def test_loopback_only_unless_asked():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="--allow-remote"):
        LocalCluster(Path("/nonexistent"), uniform_nodes(1), host="0.0.0.0")
    result = CliRunner().invoke(local_cli, ["up", "--host", "0.0.0.0", "--state-dir", "/nonexistent/state"])
    assert result.exit_code == 2
    assert "--host" in result.output and "--allow-remote" in result.output


def test_the_local_cluster_serves_https_with_a_private_kubeconfig(tmp_path):
    import yaml

    with LocalCluster(tmp_path / "state", uniform_nodes(1)) as cluster:
        assert cluster.url.startswith("https://127.0.0.1:")
        assert stat.S_IMODE(os.stat(cluster.kubeconfig).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tmp_path / "state" / "pki").st_mode) == 0o700
        user = yaml.safe_load(cluster.kubeconfig.read_text())["users"][0]["user"]
        assert len(user["token"]) >= 40
        if shutil.which("kubectl"):  # kubectl sends a bearer token over HTTPS only: this is why the server has TLS
            out = subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig), "get", "nodes", "-o", "name"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and out.stdout.strip() == "node/node-0", out.stderr


def test_allow_remote_serves_off_loopback_over_https(tmp_path):
    import requests
    import yaml

    with LocalCluster(tmp_path / "state", uniform_nodes(1), host="0.0.0.0", allow_remote=True) as cluster:
        doc = yaml.safe_load(cluster.kubeconfig.read_text())
        ca = doc["clusters"][0]["cluster"]["certificate-authority"]
        session = requests.Session()
        session.trust_env = False
        ok = session.get(cluster.url + "/api/v1/nodes", verify=ca, timeout=10,
                         headers={"Authorization": f"Bearer {doc['users'][0]['user']['token']}"})
        assert ok.status_code == 200 and [n["metadata"]["name"] for n in ok.json()["items"]] == ["node-0"]
        assert session.get(cluster.url + "/api/v1/nodes", verify=ca, timeout=10).status_code == 401
        with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP on that port
            session.get(cluster.url.replace("https:", "http:") + "/api/v1/nodes", timeout=10)


ATTACK_PAGE = """<!doctype html><html><body><script>
const api = "{api}{pods}";
const body = JSON.stringify({pod});
// the three ways a page may try: two CORS "simple" requests (no preflight) and one that needs a preflight
Promise.allSettled([
  fetch(api, {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}}),
  fetch(api, {{method: "POST", mode: "no-cors", body: new Blob([body])}}),
  fetch(api, {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}}),
]).then(results => fetch("/done", {{method: "POST", body: JSON.stringify(results.map(r => r.status))}}));
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make tools installs Debian's chromium)")
async def test_a_page_in_a_real_browser_cannot_create_a_pod(server, tmp_path):
    done = asyncio.get_running_loop().create_future()

    async def page(request: web.Request) -> web.Response:
        html = ATTACK_PAGE.format(api=server.url, pods=PODS, pod=json.dumps(pod("from-the-web")))
        return web.Response(text=html, content_type="text/html")

    async def finished(request: web.Request) -> web.Response:
        if not done.done():
            done.set_result(await request.text())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/done", finished)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}", f"http://127.0.0.1:{port}/",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        outcome = json.loads(await asyncio.wait_for(done, timeout=90))
    finally:
        browser.kill()
        await browser.wait()
        await runner.cleanup()
    assert len(outcome) == 3  # the page ran all three attempts
    assert server.refused[401] >= 2, "the simple requests did reach the server (and were refused)"
    assert await pod_names(server) == []


async def test_the_server_serves_tls_when_given_a_context(tmp_path):
    from loco_local.pki import serving_context

    ca, context = serving_context(tmp_path / "pki", ["127.0.0.1"])
    srv = APIServer(port=0, ssl_context=context)
    await srv.start()
    try:
        assert srv.url.startswith("https://")
        client = ssl.create_default_context(cafile=ca)
        async with aiohttp.ClientSession(headers=srv.auth_headers) as session, \
                session.get(srv.url + PODS, ssl=client) as resp:
            assert resp.status == 200
        assert stat.S_IMODE(os.stat(tmp_path / "pki" / "loco-local-apiserver.key").st_mode) == 0o600
    finally:
        await srv.stop()


@pytest.mark.parametrize("depth", [auth.MAX_DEPTH - 2, auth.MAX_DEPTH - 1, 2_000, 5_000, 50_000])
@pytest.mark.parametrize("recursion_limit", [1_000, 30_000])  # Python's default; the operator's (loco_operator.cli)
async def test_a_deeply_nested_body_is_400_never_500(server, depth, recursion_limit):
    """Past MAX_DEPTH levels a body is a 400 naming the limit. Up to it, the body gets past the depth check where
    the process allows the recursion, and is a 400 where the JSON decoder itself gives up first; never a 500."""
    name = f"deep-{depth}-{recursion_limit}"
    body = '{"metadata": {"name": "%s"}, "data": {"k": ' % name + "[" * depth + "]" * depth + "}}"  # depth + 2 levels
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(recursion_limit)
    try:
        status, answer, _ = await call(server, "POST", CMS, body.encode(),
                                       {**server.auth_headers, "Content-Type": "application/json"})
    finally:
        sys.setrecursionlimit(before)
    if depth + 2 > auth.MAX_DEPTH:
        assert (status, answer["reason"]) == (400, "BadRequest"), answer
        assert "nested" in answer["message"]
    elif recursion_limit > 10 * depth:
        # past the depth check: what refuses it is the ConfigMap's type (its data holds strings), as on kube-apiserver
        assert (status, answer["reason"]) == (400, "BadRequest")
        assert "cannot unmarshal array into Go struct field ConfigMap.data of type string" in answer["message"]
    else:
        assert (status, answer["reason"]) == (400, "BadRequest"), answer
        assert "nested too deeply" in answer["message"]
    assert (await call(server, "GET", "/healthz"))[0] == 200
