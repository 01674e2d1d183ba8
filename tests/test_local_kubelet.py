"""The embedded cluster end to end: real API server, scheduler, node controller and kubelet running
pods as local processes. Each test drives the cluster only through the HTTP API, like a user would."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from loco_local.apiclient import ApiClient, ApiError
from loco_local.cluster import LocalCluster, claim_octet, octet_for_port
from loco_local.kubelet import next_readiness
from loco_local.nodes import NodeSpec

pytestmark = pytest.mark.timeout(120)
NS = "default"
POD_TIMEOUT_S = 60.0  # generous: the machine may be loaded


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    nodes = [NodeSpec("node-0", cpu="4", memory="8Gi", labels={"pool": "a"}),
             NodeSpec("node-1", cpu="4", memory="8Gi", gpus=1, labels={"pool": "b"})]
    c = LocalCluster(tmp_path / "state", nodes, crd_paths=[], pod_eviction_timeout_s=1.0, heartbeat_s=1.0,
                     restart_backoff_s=0.2)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[ApiClient]:
    client = ApiClient.from_kubeconfig(cluster.kubeconfig)
    yield client
    await client.close()


async def wait_for(fetch: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], what: str,
                   timeout_s: float = POD_TIMEOUT_S) -> Any:
    """Poll ``fetch()`` until ``check`` holds on its value; fail with the last value seen."""
    deadline = time.monotonic() + timeout_s
    value: Any = None
    while time.monotonic() < deadline:
        try:
            value = await fetch()
            if check(value):
                return value
        except ApiError as exc:
            value = exc
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}; last value: {json.dumps(value, default=str)[:3000]}")


def python_pod(name: str, script: str, **spec: Any) -> dict:
    container = {"name": "main", "image": "python", "command": ["python", "-c", textwrap.dedent(script)]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "t", "rank": "7"}},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


async def create_pod(api: ApiClient, pod: dict) -> dict:
    return await api.create(f"/api/v1/namespaces/{NS}/pods", pod)


async def wait_phase(api: ApiClient, name: str, phases: set[str]) -> dict:
    return await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/{name}"),
                          lambda p: p.get("status", {}).get("phase") in phases, f"pod {name} in {phases}")


def terminated(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


async def test_pod_succeeds_with_env_volumes_and_termination_message(cluster: LocalCluster, api: ApiClient):
    await api.create(f"/api/v1/namespaces/{NS}/configmaps", {
        "metadata": {"name": "job-trainer"}, "data": {"config.json": '{"steps": 3}', "greeting": "hello"}})
    script = """
        import json, os, sys
        root = os.environ["LOCO_LOCAL_ROOT"]
        config = json.load(open(os.path.join(root, "etc/loco/config.json")))
        hosts = open(os.environ["LOCO_LOCAL_HOSTS"]).read()
        keys = ["POD_NAME", "POD_NS", "POD_UID", "POD_IP", "HOST_IP", "NODE_NAME", "RANK", "GREETING", "DERIVED", "CPU"]
        report = {k: os.environ.get(k) for k in keys}
        report.update(steps=config["steps"], cwd=os.getcwd(), exe=sys.executable, hosts=hosts)
        print(json.dumps(report), flush=True)
        with open(os.path.join(root, "dev/termination-log"), "w") as f:
            f.write(json.dumps({"final": True}))
    """
    field = lambda path: {"valueFrom": {"fieldRef": {"fieldPath": path}}}  # noqa: E731
    pod = python_pod(
        "job-worker-0", script, hostname="job-worker-0", subdomain="job", nodeSelector={"pool": "b"},
        volumes=[{"name": "config", "configMap": {"name": "job-trainer", "items": [{"key": "config.json", "path": "config.json"}]}}],
        container={
            "workingDir": "/workspace",
            "volumeMounts": [{"name": "config", "mountPath": "/etc/loco"}],
            "resources": {"limits": {"cpu": "2"}},
            "env": [
                {"name": "POD_NAME", **field("metadata.name")}, {"name": "POD_NS", **field("metadata.namespace")},
                {"name": "POD_UID", **field("metadata.uid")}, {"name": "POD_IP", **field("status.podIP")},
                {"name": "HOST_IP", **field("status.hostIP")}, {"name": "NODE_NAME", **field("spec.nodeName")},
                {"name": "RANK", **field("metadata.labels['rank']")},
                {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "job-trainer", "key": "greeting"}}},
                {"name": "DERIVED", "value": "$(POD_NAME)-x"},
                {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            ],
        })
    created = await create_pod(api, pod)
    done = await wait_phase(api, "job-worker-0", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded", done["status"]
    state = terminated(done)
    assert (state["exitCode"], state["reason"]) == (0, "Completed")
    assert json.loads(state["message"]) == {"final": True}
    log_file = cluster.state_dir / "pods" / NS / "job-worker-0" / "main.log"
    report = json.loads(log_file.read_text().strip().splitlines()[-1])
    ip = done["status"]["podIP"]
    assert ip.startswith("127.") and ip != "127.0.0.1"
    assert report["POD_IP"] == ip and report["HOST_IP"] == done["status"]["hostIP"]
    assert report["POD_NAME"] == "job-worker-0" and report["POD_NS"] == NS
    assert report["POD_UID"] == created["metadata"]["uid"]
    assert report["NODE_NAME"] == "node-1" == done["spec"]["nodeName"]
    assert (report["RANK"], report["GREETING"], report["DERIVED"], report["CPU"]) == ("7", "hello", "job-worker-0-x", "2")
    assert report["steps"] == 3
    assert report["exe"] == sys.executable
    assert report["cwd"] == str(cluster.state_dir / "pods" / NS / "job-worker-0" / "root" / "workspace")
    # the pod saw its own DNS name in the hosts file while it ran
    assert f"{ip}\tjob-worker-0.job.{NS}.svc.cluster.local job-worker-0.job.{NS}.svc job-worker-0.job" in report["hosts"]
    conditions = {c["type"]: c["status"] for c in done["status"]["conditions"]}
    assert conditions == {"PodScheduled": "True", "Initialized": "True", "ContainersReady": "False", "Ready": "False"}


async def test_failing_command_fails_the_pod_with_its_exit_code(cluster: LocalCluster, api: ApiClient):
    pod = python_pod("fails", "import sys; print('something broke'); sys.exit(3)",
                     container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    await create_pod(api, pod)
    done = await wait_phase(api, "fails", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Failed"
    state = terminated(done)
    assert (state["exitCode"], state["reason"]) == (3, "Error")
    assert state["message"].strip() == "something broke"


async def test_unknown_executable_is_a_start_error(cluster: LocalCluster, api: ApiClient):
    pod = python_pod("nocmd", "")
    pod["spec"]["containers"][0]["command"] = ["definitely-not-a-command-xyz"]
    await create_pod(api, pod)
    done = await wait_phase(api, "nocmd", {"Failed"})
    assert terminated(done)["reason"] == "StartError"
    assert "definitely-not-a-command-xyz" in terminated(done)["message"]


async def test_on_failure_restarts_until_success(cluster: LocalCluster, api: ApiClient):
    script = """
        import os, sys
        marker = os.path.join(os.environ["LOCO_LOCAL_ROOT"], "data", "tried")
        if not os.path.exists(marker):
            open(marker, "w").close()
            sys.exit(1)
    """
    pod = python_pod("flaky", script, restartPolicy="OnFailure", volumes=[{"name": "data", "emptyDir": {}}],
                     container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]})
    await create_pod(api, pod)
    done = await wait_phase(api, "flaky", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"
    status = done["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1
    events = await api.get(f"/api/v1/namespaces/{NS}/events")
    reasons = [e["reason"] for e in events["items"] if e["involvedObject"]["name"] == "flaky"]
    assert {"Scheduled", "Created", "Started", "BackOff"} <= set(reasons)


async def test_a_burst_of_pods_spreads_over_the_nodes(cluster: LocalCluster, api: ApiClient):
    for i in range(2):  # 3 of 4 cpus each: only one fits per node
        await create_pod(api, python_pod(f"big-{i}", "import time; time.sleep(30)",
                                         container={"resources": {"requests": {"cpu": "3"}}}))
    placed = []
    for i in range(2):
        pod = await wait_for(lambda i=i: api.get(f"/api/v1/namespaces/{NS}/pods/big-{i}"),
                             lambda p: p["spec"].get("nodeName"), f"big-{i} scheduled")
        placed.append(pod["spec"]["nodeName"])
    assert sorted(placed) == ["node-0", "node-1"]


async def test_persistent_volume_claim_is_shared_between_pods(cluster: LocalCluster, api: ApiClient):
    volume = [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "shared"}}]
    mount = {"volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}]}
    writer = python_pod("writer", """
        import os
        open(os.path.join(os.environ["LOCO_LOCAL_ROOT"], "ckpt", "step"), "w").write("42")
    """, volumes=volume, container=mount, nodeSelector={"pool": "a"})
    reader = python_pod("reader", """
        import os, sys
        sys.exit(0 if open(os.path.join(os.environ["LOCO_LOCAL_ROOT"], "ckpt", "step")).read() == "42" else 9)
    """, volumes=volume, container=mount, nodeSelector={"pool": "b"})
    await create_pod(api, writer)
    assert (await wait_phase(api, "writer", {"Succeeded", "Failed"}))["status"]["phase"] == "Succeeded"
    await create_pod(api, reader)
    done = await wait_phase(api, "reader", {"Succeeded", "Failed"})
    assert terminated(done)["exitCode"] == 0
    assert (cluster.state_dir / "volumes" / NS / "shared" / "step").read_text() == "42"


async def test_delete_sends_sigterm_then_removes_the_pod(cluster: LocalCluster, api: ApiClient):
    script = """
        import os, signal, sys, time
        root = os.environ["LOCO_LOCAL_ROOT"]
        def bye(*_):
            open(os.path.join(root, "data", "got-sigterm"), "w").close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        open(os.path.join(root, "data", "started"), "w").close()
        while True:
            time.sleep(0.1)
    """
    pod = python_pod("sleeper", script, hostname="sleeper", subdomain="svc", terminationGracePeriodSeconds=20,
                     volumes=[{"name": "data", "hostPath": {"path": str(cluster.state_dir / "marks"), "type": "DirectoryOrCreate"}}],
                     container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]})
    await create_pod(api, pod)
    running = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/sleeper"),
                             lambda p: p["status"].get("phase") == "Running"
                             and {c["type"]: c["status"] for c in p["status"]["conditions"]}.get("Ready") == "True"
                             and (cluster.state_dir / "marks" / "started").exists(), "sleeper running and ready")
    ip = running["status"]["podIP"]
    hosts = cluster.state_dir / "hosts"
    assert f"{ip}\tsleeper.svc.{NS}.svc.cluster.local sleeper.svc.{NS}.svc sleeper.svc" in hosts.read_text()
    pid = int(running["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    assert psutil.pid_exists(pid)
    await api.delete(f"/api/v1/namespaces/{NS}/pods/sleeper")
    await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods", fieldSelector="metadata.name=sleeper"),
                   lambda listing: not listing.get("items"), "sleeper removed")
    assert (cluster.state_dir / "marks" / "got-sigterm").exists()
    assert not _alive(pid)
    await wait_for(lambda: asyncio.sleep(0, hosts.read_text()), lambda text: ip not in text, "hosts entry removed")


async def test_force_delete_kills_the_processes(cluster: LocalCluster, api: ApiClient):
    await create_pod(api, python_pod("forced", "import time\nwhile True: time.sleep(0.1)", restartPolicy="Always"))
    running = await wait_phase(api, "forced", {"Running"})
    pid = int(running["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    await api.delete(f"/api/v1/namespaces/{NS}/pods/forced", {"gracePeriodSeconds": 0})
    await wait_for(lambda: asyncio.sleep(0, _alive(pid)), lambda alive: not alive, "forced pod's process killed")


async def test_node_not_ready_fails_its_pods_with_node_lost(cluster: LocalCluster, api: ApiClient):
    pod = python_pod("victim", "import time\nwhile True: time.sleep(0.1)", nodeSelector={"pool": "a"})
    await create_pod(api, pod)
    running = await wait_phase(api, "victim", {"Running"})
    assert running["spec"]["nodeName"] == "node-0"
    pid = int(running["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    await cluster.set_node_ready("node-0", False)
    node = await wait_for(lambda: api.get("/api/v1/nodes/node-0"),
                          lambda n: any(t["key"] == "node.kubernetes.io/not-ready" and t["effect"] == "NoExecute"
                                        for t in n["spec"].get("taints") or []), "node-0 tainted")
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "False"
    await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/victim"),
                   lambda p: {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "False",
                   "victim not ready")
    lost = await wait_phase(api, "victim", {"Failed"})
    assert lost["status"]["reason"] == "NodeLost"
    await wait_for(lambda: asyncio.sleep(0, _alive(pid)), lambda alive: not alive, "victim's process killed")
    # a lost pod is deleted at once although its node is still down
    await api.delete(f"/api/v1/namespaces/{NS}/pods/victim")
    await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods", fieldSelector="metadata.name=victim"),
                   lambda listing: not listing.get("items"), "victim removed")
    # a new pod for pool a cannot be placed while node-0 is down, and runs once it is back
    await create_pod(api, python_pod("after", "pass", nodeSelector={"pool": "a"}))
    await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/after"),
                   lambda p: any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                                 for c in p["status"].get("conditions") or []), "after unschedulable")
    await cluster.set_node_ready("node-0", True)
    assert (await wait_phase(api, "after", {"Succeeded"}))["spec"]["nodeName"] == "node-0"


async def test_node_back_before_the_eviction_timeout_keeps_its_pods(tmp_path: Path):
    c = LocalCluster(tmp_path / "state", [NodeSpec("only")], crd_paths=[], pod_eviction_timeout_s=120, heartbeat_s=1)
    await c.start()
    api = ApiClient.from_kubeconfig(c.kubeconfig)
    try:
        await create_pod(api, python_pod("survivor", "import time\nwhile True: time.sleep(0.1)"))
        running = await wait_phase(api, "survivor", {"Running"})
        pid = int(running["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])

        def ready(p: dict) -> str:
            return {x["type"]: x["status"] for x in p["status"]["conditions"]}["Ready"]

        await c.set_node_ready("only", False)
        await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/survivor"), lambda p: ready(p) == "False",
                       "survivor marked not ready")
        assert _alive(pid)  # a partitioned node's processes keep running until the eviction timeout
        await c.set_node_ready("only", True)
        back = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/survivor"), lambda p: ready(p) == "True",
                              "survivor ready again")
        assert back["status"]["phase"] == "Running" and _alive(pid)
        node = await api.get("/api/v1/nodes/only")
        assert not [t for t in node["spec"].get("taints") or [] if t["key"] == "node.kubernetes.io/not-ready"]
    finally:
        await api.close()
        await c.stop()


async def test_unschedulable_pod_reports_why(cluster: LocalCluster, api: ApiClient):
    pod = python_pod("greedy", "pass", container={"resources": {"requests": {"nvidia.com/gpu": "2"}}})
    await create_pod(api, pod)
    got = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/greedy"),
                         lambda p: any(c["type"] == "PodScheduled" for c in p["status"].get("conditions") or []),
                         "PodScheduled condition")
    cond = next(c for c in got["status"]["conditions"] if c["type"] == "PodScheduled")
    assert (cond["status"], cond["reason"]) == ("False", "Unschedulable")
    assert cond["message"] == "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    events = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/events"),
                            lambda e: any(x["reason"] == "FailedScheduling" for x in e["items"]), "FailedScheduling event")
    assert any(x["involvedObject"]["name"] == "greedy" and x["type"] == "Warning" for x in events["items"])
    await cluster.cordon("node-1")
    node = await api.get("/api/v1/nodes/node-1")
    assert node["spec"]["unschedulable"] is True


async def test_init_containers_run_first_and_share_volumes(cluster: LocalCluster, api: ApiClient):
    pod = python_pod("with-init", """
        import os, sys
        sys.exit(0 if open(os.path.join(os.environ["LOCO_LOCAL_ROOT"], "work", "prepared")).read() == "yes" else 4)
    """, volumes=[{"name": "work", "emptyDir": {}}], container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]})
    pod["spec"]["initContainers"] = [{
        "name": "prepare", "image": "python", "volumeMounts": [{"name": "work", "mountPath": "/w"}],
        "command": ["python", "-c", "import os; open(os.environ['LOCO_LOCAL_ROOT'] + '/w/prepared', 'w').write('yes')"],
    }]
    await create_pod(api, pod)
    done = await wait_phase(api, "with-init", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


async def test_http_readiness_probe_gates_ready(cluster: LocalCluster, api: ApiClient):
    gate = cluster.state_dir / "serve-now"
    script = f"""
        import http.server, os, time
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.05)
        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/ready" else 404)
                self.end_headers()
        http.server.HTTPServer((os.environ["POD_IP"], 8080), Ready).serve_forever()
    """
    pod = python_pod("probed", script, container={
        "ports": [{"name": "status", "containerPort": 8080}],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "status"}, "periodSeconds": 1}})
    await create_pod(api, pod)

    def ready(p: dict) -> str | None:
        return {c["type"]: c["status"] for c in p["status"].get("conditions") or []}.get("Ready")

    running = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/probed"),
                             lambda p: p["status"].get("phase") == "Running", "probed running")
    assert ready(running) == "False"
    assert running["status"]["containerStatuses"][0]["ready"] is False
    gate.touch()
    await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/probed"), lambda p: ready(p) == "True", "probed ready")


def test_readiness_follows_the_probe_thresholds_like_the_kubelet():
    probe = {"failureThreshold": 2, "successThreshold": 2}
    state = (False, 0, 0)  # a started container is not Ready

    def fold(*results: bool) -> bool:
        nonlocal state
        for ok in results:
            state = next_readiness(probe, *state, ok)
        return state[0]

    assert fold(True) is False  # one success of the two required
    assert fold(False, True) is False  # a failure resets the successes
    assert fold(True) is True
    assert fold(False) is True  # one failure of the two that make it NotReady
    assert fold(True, False) is True  # a success resets the failures
    assert fold(False) is False
    # defaults: successThreshold 1, failureThreshold 3
    assert next_readiness({}, False, 0, 0, True)[0] is True
    assert next_readiness({}, True, 0, 1, False)[0] is True and next_readiness({}, True, 0, 2, False)[0] is False


def test_two_clusters_claim_different_loopback_ranges(tmp_path: Path):
    first, lock = claim_octet(4000, tmp_path)
    second, lock2 = claim_octet(4000, tmp_path)
    assert first == octet_for_port(4000) and second != first
    lock.close()
    again, lock3 = claim_octet(4000, tmp_path)
    assert again == first
    lock2.close()
    lock3.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stopping_the_cluster_leaves_no_orphan_processes(tmp_path: Path):
    script = """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        while True:
            time.sleep(0.1)
    """
    with LocalCluster(tmp_path / "state", [NodeSpec("solo")], crd_paths=[]) as c:
        async def run() -> list[int]:
            client = ApiClient.from_kubeconfig(c.kubeconfig)
            try:
                await create_pod(client, python_pod("parent", script))
                pod = await wait_phase(client, "parent", {"Running"})
                pid = int(pod["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
                await wait_for(lambda: asyncio.sleep(0, psutil.Process(pid).children()), bool, "child spawned")
                return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
            finally:
                await client.close()

        pids = c.call(run(), timeout_s=120)
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        assert c.cordon("solo") is None  # sync mode: done when it returns
        assert c.call(c.api.get("/api/v1/nodes/solo"))["spec"]["unschedulable"] is True
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]


def test_a_pod_an_earlier_kubelet_ran_fails_or_restarts_as_after_a_reboot():
    from loco_local.kubelet import lost_containers_status

    def pod(policy: str, state: dict, restarts: int = 0) -> dict:
        return {"spec": {"restartPolicy": policy, "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "containerStatuses": [
                    {"name": "c", "state": state, "restartCount": restarts, "ready": True}]}}

    running = {"running": {"startedAt": "2026-12-06T00:00:00Z"}}
    lost = lost_containers_status(pod("Never", running))
    assert lost is not None and lost["phase"] == "Failed"
    terminated = lost["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"], terminated["startedAt"]) == (
        "ContainerStatusUnknown", 137, "2026-12-06T00:00:00Z")
    assert lost["containerStatuses"][0]["ready"] is False
    assert lost_containers_status(pod("Always", running)) is None  # started again, restarts counted
    assert lost_containers_status(pod("OnFailure", running)) is None
    assert lost_containers_status(pod("Never", {"waiting": {"reason": "ContainerCreating"}})) is None  # never ran
    assert lost_containers_status({"spec": {"restartPolicy": "Never"}, "status": {"phase": "Pending"}}) is None


async def test_a_volume_source_the_api_refuses_for_now_is_retried_not_the_end_of_the_pod(cluster: LocalCluster,
                                                                                       api: ApiClient):
    """On a real control plane the Node authorizer refuses a just-bound pod's ConfigMap (403, "no relationship found
    between node ...") until its graph has seen the binding; the kubelet retries the mount, as a real one does."""
    await api.create(f"/api/v1/namespaces/{NS}/configmaps", {"metadata": {"name": "cfg"}, "data": {"k": "v"}})
    kubelet_api = cluster.kubelet.api
    real_get, refused = kubelet_api.get, []

    async def refusing_get(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.endswith("/configmaps/cfg") and len(refused) < 2:
            refused.append(path)
            raise ApiError(403, 'configmaps "cfg" is forbidden: User "system:node:node-0" cannot get resource '
                                '"configmaps": no relationship found between node', "GET", path)
        return await real_get(path, *args, **kwargs)

    kubelet_api.get = refusing_get
    try:
        script = "import os; assert open(os.path.join(os.environ['LOCO_LOCAL_ROOT'], 'cfg/k')).read() == 'v'"
        pod = python_pod("mounted", script, volumes=[{"name": "c", "configMap": {"name": "cfg"}}],
                         container={"volumeMounts": [{"name": "c", "mountPath": "/cfg"}]})
        await create_pod(api, pod)
        done = await wait_phase(api, "mounted", {"Succeeded", "Failed"})
    finally:
        kubelet_api.get = real_get
    assert done["status"]["phase"] == "Succeeded" and len(refused) == 2, done["status"]
    events = await api.get(f"/api/v1/namespaces/{NS}/events")
    assert [e for e in events["items"] if e["reason"] == "FailedMount" and "no relationship" in e["message"]]
