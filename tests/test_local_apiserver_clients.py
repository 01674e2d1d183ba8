"""Real clients against the embedded API server: the ``kubectl`` binary, the official
``kubernetes`` Python client and a kopf operator (``--standalone``), each as against a real cluster."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
import yaml

from loco_local.apiserver import APIServer, write_kubeconfig
from loco_local.pki import serving_context

from test_local_apiserver_crd import WIDGET_CRD  # the small test CRD

#: the real kubectl; CI's machine has it on PATH (the 0-skipped CI runs show it), so the tests marked with it skip only
#: on a developer's machine without kubectl, where they could not run at all
KUBECTL = shutil.which("kubectl")


@pytest.fixture
async def cluster(tmp_path):
    """The server as LocalCluster runs it: HTTPS, and a kubeconfig with its CA and token."""
    ca, context = serving_context(tmp_path / "pki", ["127.0.0.1"])
    srv = APIServer(port=0, log_root=tmp_path / "logs", ssl_context=context)
    await srv.start()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", srv.url, token=srv.token, ca=ca)
    yield srv, kubeconfig
    await srv.stop()


def http(server: APIServer, kubeconfig: Path) -> aiohttp.ClientSession:
    """A plain HTTP client for the fixture's server: its token, its CA."""
    context = ssl.create_default_context(cafile=kubeconfig.parent / "pki" / "ca.crt")
    return aiohttp.ClientSession(headers=server.auth_headers, connector=aiohttp.TCPConnector(ssl=context))


def run_kubectl(kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True, binary: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    cache = kubeconfig.parent / f"kube-cache-{Path(binary or KUBECTL or 'kubectl').name}"
    proc = subprocess.run([binary or KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache),
                           "--request-timeout", "20s", *args],
                          input=stdin, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)} failed: {proc.stderr}"
    return proc


async def kubectl(kubeconfig: Path, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    """kubectl in a thread: the server shares this test's event loop."""
    return await asyncio.to_thread(run_kubectl, kubeconfig, *args, **kw)


# The machine image (developers and CI) ships kubectl, so this runs there; it can only skip on a
# machine without one, where the Python-client and kopf tests still cover the server.
@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")  # see KUBECTL
async def test_kubectl_apply_get_describe_explain_scale_patch_logs_delete(cluster, tmp_path):
    server, kc = cluster
    crd_file = tmp_path / "crd.yaml"
    crd_file.write_text(yaml.safe_dump(WIDGET_CRD))
    assert "created" in (await kubectl(kc, "apply", "-f", str(crd_file))).stdout
    manifest = {"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w1", "labels": {"app": "w"}},
                "spec": {"replicas": 2}}
    assert "widget.example.dev/w1 created" in (await kubectl(kc, "apply", "-f", "-", stdin=json.dumps(manifest))).stdout
    table = (await kubectl(kc, "get", "widgets", "-l", "app=w")).stdout
    assert table.split("\n")[0].split() == ["NAME", "REPLICAS", "PHASE", "AGE"] and "w1" in table
    as_yaml = yaml.safe_load((await kubectl(kc, "get", "wg", "w1", "-o", "yaml")).stdout)
    assert as_yaml["spec"] == {"replicas": 2, "color": "red"}

    bad = dict(manifest, metadata={"name": "bad"}, spec={"replicas": 0})
    proc = await kubectl(kc, "apply", "-f", "-", stdin=json.dumps(bad), check=False)
    assert proc.returncode != 0 and "spec.replicas" in proc.stderr and "greater than or equal to 1" in proc.stderr

    typo = dict(manifest, metadata={"name": "typo"}, spec={"replicas": 1, "colour": "red"})
    proc = await kubectl(kc, "apply", "-f", "-", stdin=json.dumps(typo), check=False)
    assert proc.returncode != 0 and 'unknown field "spec.colour"' in proc.stderr  # kubectl asks for Strict

    explained = (await kubectl(kc, "explain", "widget.spec")).stdout
    assert "Desired state of the widget." in explained and "Number of workers." in explained

    await kubectl(kc, "scale", "widget", "w1", "--replicas=3")
    await kubectl(kc, "patch", "widget", "w1", "--type", "merge", "-p", '{"spec":{"color":"blue"}}')
    await kubectl(kc, "patch", "widget", "w1", "--type", "json", "-p",
                  '[{"op":"replace","path":"/spec/replicas","value":4}]')
    spec = json.loads((await kubectl(kc, "get", "widget", "w1", "-o", "jsonpath={.spec}")).stdout)
    assert spec == {"replicas": 4, "color": "blue"}

    uid = as_yaml["metadata"]["uid"]
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "w1.1", "namespace": "default"},
             "involvedObject": {"apiVersion": "example.dev/v1", "kind": "Widget", "name": "w1",
                                "namespace": "default", "uid": uid},
             "reason": "Resized", "message": "scaled to 4 workers", "type": "Normal", "count": 1,
             "source": {"component": "test"}}
    await kubectl(kc, "create", "-f", "-", stdin=json.dumps(event))
    described = (await kubectl(kc, "describe", "widget", "w1")).stdout
    assert "Replicas:  4" in described and "scaled to 4 workers" in described

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1"},
           "spec": {"containers": [{"name": "main", "image": "busybox"}]}}
    await kubectl(kc, "apply", "-f", "-", stdin=json.dumps(pod))
    log_file = tmp_path / "logs" / "default" / "p1" / "main.log"
    log_file.parent.mkdir(parents=True)
    log_file.write_text("hello\nworld\n")
    assert (await kubectl(kc, "logs", "p1", "--tail=1")).stdout == "world\n"
    pods = (await kubectl(kc, "get", "pods")).stdout
    assert pods.split("\n")[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert "Pending" in (await kubectl(kc, "describe", "pod", "p1")).stdout

    # kubectl's typed `create` subcommands post protobuf bodies
    await kubectl(kc, "create", "namespace", "team")
    await kubectl(kc, "create", "configmap", "settings", "-n", "team", "--from-literal=lr=0.1")
    await kubectl(kc, "create", "service", "clusterip", "svc", "-n", "team", "--tcp=80:http")
    got = json.loads((await kubectl(kc, "get", "configmap,service", "-n", "team", "-o", "json")).stdout)["items"]
    assert got[0]["data"] == {"lr": "0.1"} and got[0]["metadata"]["namespace"] == "team"
    assert got[1]["spec"]["ports"] == [{"name": "80-http", "port": 80, "protocol": "TCP", "targetPort": "http"}]
    assert 'namespace "team" deleted' in (await kubectl(kc, "delete", "namespace", "team")).stdout

    assert 'widget.example.dev "w1" deleted' in (await kubectl(kc, "delete", "widget", "w1")).stdout
    assert 'pod "p1" deleted' in (await kubectl(kc, "delete", "pod", "p1")).stdout
    assert "No resources found" in (await kubectl(kc, "get", "widgets")).stderr


#: the kubectl releases the machine image ships beside the default one (Google Cloud SDK's kubectl.1.NN)
KUBECTLS = sorted(Path("/usr/lib/google-cloud-sdk/bin").glob("kubectl.1.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))


def test_the_image_ships_kubectl_1_27_to_1_33():
    """The version test below runs what is there; this one says when what is there is less than promised."""
    assert {f"kubectl.1.{minor}" for minor in range(27, 34)} <= {p.name for p in KUBECTLS}, KUBECTLS


@pytest.mark.parametrize("binary", KUBECTLS, ids=lambda p: p.name)
async def test_every_kubectl_on_the_machine_applies_explains_and_diffs(cluster, tmp_path, binary):
    """kubectl 1.27 and 1.28 read /openapi/v2 only as protobuf (issue 30 #5: they could not apply, explain or diff)."""
    server, kc = cluster

    async def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_kubectl, kc, *args, binary=str(binary), **kw)

    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "labels": {"app": "a"}},
          "data": {"lr": "0.1"}}
    assert "configmap/settings created" in (await run("apply", "-f", "-", stdin=json.dumps(cm))).stdout
    changed = {**cm, "data": {"lr": "0.2"}}
    diff = await run("diff", "-f", "-", stdin=json.dumps(changed), check=False)
    assert diff.returncode == 1 and '-  lr: "0.1"' in diff.stdout and '+  lr: "0.2"' in diff.stdout, diff.stderr
    assert "configmap/settings configured" in (await run("apply", "-f", "-", stdin=json.dumps(changed))).stdout
    await run("delete", "configmap", "settings")
    crd_file = tmp_path / "crd.yaml"
    crd_file.write_text(yaml.safe_dump(WIDGET_CRD))
    await run("apply", "-f", str(crd_file))
    explained = await run("explain", "widget.spec", check=False)
    for _ in range(20):  # the CRD's schema reaches the served documents a moment after the CRD is established
        if explained.returncode == 0:
            break
        await asyncio.sleep(0.25)
        explained = await run("explain", "widget.spec", check=False)
    assert "Desired state of the widget." in explained.stdout and "Number of workers." in explained.stdout, explained


# kubectl ships in the machine image (developers and CI), so this runs there; it skips only on a machine without one.
@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")  # see KUBECTL
async def test_kubectl_server_side_apply_owns_fields_and_reports_conflicts(cluster, tmp_path):
    """docs/helm.md tells users to `kubectl apply --server-side`: it works on the embedded cluster too."""
    server, kc = cluster
    crd_file = tmp_path / "crd.yaml"
    crd_file.write_text(yaml.safe_dump(WIDGET_CRD))
    assert "serverside-applied" in (await kubectl(kc, "apply", "--server-side", "-f", str(crd_file))).stdout
    manifest = {"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "ssa"}, "spec": {"replicas": 2}}
    out = (await kubectl(kc, "apply", "--server-side", "-f", "-", stdin=json.dumps(manifest))).stdout
    assert "widget.example.dev/ssa serverside-applied" in out
    got = json.loads((await kubectl(kc, "get", "widget", "ssa", "-o", "json", "--show-managed-fields")).stdout)
    assert [(m["manager"], m["operation"]) for m in got["metadata"]["managedFields"]] == [("kubectl", "Apply")]
    rival = dict(manifest, spec={"replicas": 5})
    proc = await kubectl(kc, "apply", "--server-side", "--field-manager", "rival", "-f", "-",
                         stdin=json.dumps(rival), check=False)
    assert proc.returncode != 0 and 'conflict with "kubectl"' in proc.stderr and ".spec.replicas" in proc.stderr
    await kubectl(kc, "apply", "--server-side", "--field-manager", "rival", "--force-conflicts", "-f", "-",
                  stdin=json.dumps(rival))
    assert (await kubectl(kc, "get", "widget", "ssa", "-o", "jsonpath={.spec.replicas}")).stdout == "5"


# The machine image (developers and CI) ships kubectl, so this runs there; it can only skip on a
# machine without one, where the Python-client and kopf tests still cover the server.
@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")  # see KUBECTL
async def test_kubectl_get_watch_prints_rows_as_objects_change(cluster):
    server, kc = cluster
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, "--kubeconfig", str(kc), "--cache-dir", str(kc.parent / "kube-cache"), "get", "pods", "-w",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with http(server, kc) as session:
            async def wait_for_line(needle: str) -> str:
                while True:
                    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
                    assert line, "kubectl get -w ended early"
                    if needle in line:
                        return line
            pod = {"metadata": {"name": "watched"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
            async with session.post(f"{server.url}/api/v1/namespaces/default/pods", json=pod) as resp:
                assert resp.status == 201
            assert (await wait_for_line("watched")).split()[:3] == ["watched", "0/1", "Pending"]
            async with session.patch(f"{server.url}/api/v1/namespaces/default/pods/watched/status",
                                  json={"status": {"phase": "Running"}},
                                  headers={"Content-Type": "application/merge-patch+json"}) as resp:
                assert resp.status == 200
            assert (await wait_for_line("Running")).split()[0] == "watched"
    finally:
        proc.terminate()
        await proc.wait()


async def test_kubernetes_client_crud_and_watch(cluster):
    kubernetes = pytest.importorskip("kubernetes")
    server, kc = cluster

    def scenario() -> list[str]:
        client = kubernetes.config.new_client_from_config(config_file=str(kc))
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespaced_config_map("default", {"metadata": {"name": "c", "labels": {"a": "b"}},
                                                      "data": {"k": "v"}})
        listed = core.list_namespaced_config_map("default", label_selector="a=b")
        version = listed.metadata.resource_version
        core.patch_namespaced_config_map("c", "default", {"data": {"k": "w"}})
        core.delete_namespaced_config_map("c", "default")
        try:
            core.read_namespaced_config_map("c", "default")
        except kubernetes.client.ApiException as exc:
            assert exc.status == 404
        else:
            raise AssertionError("the config map should be gone")
        watch = kubernetes.watch.Watch()
        return [e["type"] for e in watch.stream(core.list_namespaced_config_map, "default",
                                                resource_version=version, timeout_seconds=1)]

    assert await asyncio.to_thread(scenario) == ["MODIFIED", "DELETED"]


OPERATOR = textwrap.dedent('''
    import kopf
    import kubernetes

    @kopf.on.create("example.dev", "v1", "widgets")
    def create_child(spec, name, namespace, body, **_):
        child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-cfg"},
                 "data": {"replicas": str(spec["replicas"])}}
        kopf.adopt(child, owner=body)
        kubernetes.config.load_kube_config()
        kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, child)
        return {"child": child["metadata"]["name"]}

    @kopf.on.delete("example.dev", "v1", "widgets")
    def goodbye(name, **_):
        pass
''')


async def test_kopf_operator_reconciles_and_deletion_collects_children(cluster, tmp_path):
    pytest.importorskip("kopf")
    server, kc = cluster
    (tmp_path / "operator.py").write_text(OPERATOR)
    async with http(server, kc) as session:
        async def call(method: str, path: str, body=None):
            async with session.request(method, server.url + path, json=body) as resp:
                return resp.status, await resp.json()

        crd = copy.deepcopy(WIDGET_CRD)  # kopf stores handler results in status: let it keep them
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"] = {
            "type": "object", "x-kubernetes-preserve-unknown-fields": True}
        status, _ = await call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        assert status == 201
        widgets = "/apis/example.dev/v1/namespaces/default/widgets"
        await call("POST", widgets, {"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"},
                                     "spec": {"replicas": 3}})
        env = {**os.environ, "KUBECONFIG": str(kc)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", "default", str(tmp_path / "operator.py"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            async def poll(check, timeout_s=60.0):
                deadline = asyncio.get_running_loop().time() + timeout_s
                while not await check():
                    assert asyncio.get_running_loop().time() < deadline, "kopf did not converge"
                    await asyncio.sleep(0.1)

            async def reconciled() -> bool:
                status, body = await call("GET", f"{widgets}/w")
                return (body.get("status") or {}).get("create_child", {}).get("child") == "w-cfg"
            try:
                await poll(reconciled)
            except AssertionError:
                proc.terminate()
                print((await proc.communicate())[0].decode()[-5000:])
                raise
            status, child = await call("GET", "/api/v1/namespaces/default/configmaps/w-cfg")
            assert status == 200 and child["data"] == {"replicas": "3"}
            _, owner = await call("GET", f"{widgets}/w")
            assert owner["metadata"]["finalizers"]  # kopf's finalizer went in through its JSON-patch `test` op

            await call("DELETE", f"{widgets}/w")

            async def all_gone() -> bool:
                gone_owner = (await call("GET", f"{widgets}/w"))[0] == 404
                gone_child = (await call("GET", "/api/v1/namespaces/default/configmaps/w-cfg"))[0] == 404
                return gone_owner and gone_child
            await poll(all_gone)
        finally:
            proc.terminate()
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert b"Traceback" not in output, output.decode()[-3000:]


# Skips only on a machine without kubectl (the project's machines and CI ship it, so it runs there).
@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")  # see KUBECTL
async def test_kubectl_explains_the_templates_kubernetes_types_and_apply_names_a_bad_one(cluster, tmp_path):
    """spec.template's env, volumes... carry Kubernetes' own schemas: explain describes them, apply refuses early."""
    _, kc = cluster
    await kubectl(kc, "apply", "-f", str(Path(__file__).resolve().parents[1] / "crds" / "trainingjob.yaml"))
    explained = (await kubectl(kc, "explain", "trainingjob.spec.template.env.valueFrom")).stdout
    assert "configMapKeyRef" in explained and "secretKeyRef" in explained, explained
    job = {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "envy"},
           "spec": {"template": {"env": [{"name": "A", "value": 1}],
                                 "volumes": [{"name": "v", "emptyDir": {}, "hostPth": {"path": "/"}}]}}}
    proc = await kubectl(kc, "apply", "-f", "-", stdin=json.dumps(job), check=False)
    assert proc.returncode != 0, proc.stdout
    assert 'unknown field "spec.template.volumes[0].hostPth"' in proc.stderr, proc.stderr  # kubectl asks for Strict
    job["spec"]["template"]["volumes"][0].pop("hostPth")
    proc = await kubectl(kc, "apply", "-f", "-", stdin=json.dumps(job), check=False)
    assert proc.returncode != 0 and "spec.template.env[0].value" in proc.stderr, proc.stderr
