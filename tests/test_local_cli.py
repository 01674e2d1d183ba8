"""``loco local``: a detached cluster driven through the CLI and the real kubectl."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from loco_local.cli import local

pytestmark = pytest.mark.timeout(180)


def loco(*args: str) -> subprocess.CompletedProcess[str]:
    """``loco local ARGS`` as a user runs it (a new process through the ``loco`` dispatcher)."""
    return subprocess.run([sys.executable, "-m", "loco_cli", "local", *args], capture_output=True, text=True,
                          timeout=150)


def loco_in_process(*args: str):
    """``loco local ARGS`` in this process (faster; same code)."""
    return CliRunner().invoke(local, list(args))


def wait_until(check, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_up_detach_status_node_and_down(tmp_path: Path):
    state = tmp_path / "state"
    nodes_file = tmp_path / "nodes.yaml"
    nodes_file.write_text("- {name: gpu, count: 2, gpus: 2, cpu: '4', memory: 8Gi}\n")
    up = loco("up", "--detach", "--nodes-file", str(nodes_file), "--state-dir", str(state))
    assert up.returncode == 0, up.stderr + up.stdout
    kubeconfig = state / "kubeconfig"
    assert f"export KUBECONFIG={kubeconfig}" in up.stdout
    daemon_pid = json.loads((state / "cluster.json").read_text())["pid"]
    pod_pid = None
    try:
        again = loco_in_process("up", "--detach", "--state-dir", str(state))
        assert again.exit_code != 0 and "already runs" in again.output

        status = loco_in_process("status", "--state-dir", str(state))
        assert status.exit_code == 0, status.output
        assert "gpu-0" in status.output and "gpu-1" in status.output and f"KUBECONFIG={kubeconfig}" in status.output

        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        kubectl = shutil.which("kubectl")
        assert kubectl, "the real kubectl must be on PATH for this test"
        nodes = subprocess.run([kubectl, "get", "nodes", "-o", "json"], capture_output=True, text=True, env=env,
                               check=True, timeout=60)
        items = json.loads(nodes.stdout)["items"]
        assert sorted(n["metadata"]["name"] for n in items) == ["gpu-0", "gpu-1"]
        assert items[0]["status"]["capacity"]["nvidia.com/gpu"] == "2"
        # a long-running pod, to check that `down` kills it
        from kubernetes import client, config

        api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        api.create_namespaced_pod("default", {
            "metadata": {"name": "long"},
            "spec": {"restartPolicy": "Never", "nodeName": "gpu-1",
                     "containers": [{"name": "c", "image": "x", "command": ["python", "-c", "import time; time.sleep(600)"]}]},
        })

        def running_pid():
            pod = api.read_namespaced_pod("long", "default")
            statuses = pod.status.container_statuses or []
            if statuses and statuses[0].state.running:
                return int(statuses[0].container_id.rsplit("/", 1)[1])
            return None

        pod_pid = wait_until(running_pid, "pod long running")

        bad = loco_in_process("node", "not-ready", "nope", "--state-dir", str(state))
        assert bad.exit_code != 0 and "no node named 'nope'" in bad.output
        out = loco_in_process("node", "cordon", "gpu-0", "--state-dir", str(state))
        assert out.exit_code == 0, out.output
        assert api.read_node("gpu-0").spec.unschedulable is True
        out = loco_in_process("node", "not-ready", "gpu-1", "--state-dir", str(state))
        assert out.exit_code == 0, out.output

        def ready_status():
            conds = api.read_node("gpu-1").status.conditions or []
            return next(c.status for c in conds if c.type == "Ready") == "False"

        wait_until(ready_status, "gpu-1 NotReady")
    finally:
        down = loco("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    wait_until(lambda: not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == psutil.STATUS_ZOMBIE,
               "daemon gone")
    if pod_pid is not None:
        wait_until(lambda: not psutil.pid_exists(pod_pid), "pod process gone")
    assert not (state / "cluster.json").exists()
    assert loco_in_process("status", "--state-dir", str(state)).exit_code != 0


def test_up_rejects_bad_node_options(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(local, ["up", "--memory", "lots", "--state-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "memory 'lots' is not a Kubernetes quantity" in result.output
    bad_file = tmp_path / "nodes.yaml"
    bad_file.write_text("- {name: a, gpu: 1}\n")
    result = runner.invoke(local, ["up", "--nodes-file", str(bad_file), "--state-dir", str(tmp_path)])
    assert result.exit_code != 0 and "unknown field(s) ['gpu']" in result.output


def test_down_without_a_cluster_says_so(tmp_path: Path):
    result = CliRunner().invoke(local, ["down", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0 and "no local cluster is running" in result.output


def test_a_cluster_killed_with_sigkill_takes_its_pods_with_it(tmp_path: Path):
    """Pods must not outlive their cluster (issue 22, finding 4): each container gets SIGKILL when the kubelet
    that started it dies, however it dies, so `kill -9` of `loco local up` leaves no pod running."""
    state = tmp_path / "state"
    up = loco("up", "--detach", "--nodes", "1", "--state-dir", str(state))
    assert up.returncode == 0, up.stderr + up.stdout
    daemon = psutil.Process(json.loads((state / "cluster.json").read_text())["pid"])
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(state / "kubeconfig")))
    api.create_namespaced_pod("default", {
        "metadata": {"name": "orphan"},
        "spec": {"restartPolicy": "Never", "containers": [
            {"name": "c", "image": "x", "command": ["python", "-c", "import time; time.sleep(600)"]}]},
    })

    def running_pid():
        statuses = api.read_namespaced_pod("orphan", "default").status.container_statuses or []
        return int(statuses[0].container_id.rsplit("/", 1)[1]) if statuses and statuses[0].state.running else None

    try:
        pod_pid = wait_until(running_pid, "pod orphan running")
        daemon.kill()
        daemon.wait(timeout=30)
        wait_until(lambda: not psutil.pid_exists(pod_pid) or psutil.Process(pod_pid).status() == psutil.STATUS_ZOMBIE,
                   "the pod's process to die with its cluster", timeout_s=30)
    finally:
        loco("down", "--state-dir", str(state))


def test_a_cluster_killed_with_sigkill_comes_back_with_its_objects_and_reaps_what_it_left(tmp_path: Path):
    """Issue 22, finding 4, the rest: the API state survives `kill -9` (every object, its token, resourceVersions
    that only grow), and a process a container started (which its parent-death signal cannot reach) is killed
    by the next `loco local up` on the same state dir."""
    from kubernetes import client, config

    state = tmp_path / "state"
    up = loco("up", "--detach", "--nodes", "1", "--state-dir", str(state))
    assert up.returncode == 0, up.stderr + up.stdout
    daemon = psutil.Process(json.loads((state / "cluster.json").read_text())["pid"])
    token = (state / "kubeconfig").read_text()
    api = client.CoreV1Api(config.new_client_from_config(config_file=str(state / "kubeconfig")))
    created = api.create_namespaced_config_map("default", {"metadata": {"name": "kept"}, "data": {"k": "v"}})
    # the container's main process starts a grandchild in its process group, then waits
    grandchild_file = tmp_path / "grandchild.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '600']); "
              f"open({str(grandchild_file)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    api.create_namespaced_pod("default", {
        "metadata": {"name": "parent"},
        "spec": {"restartPolicy": "Never", "containers": [
            {"name": "c", "image": "x", "command": [sys.executable, "-c", script]}]}})
    try:
        grandchild = psutil.Process(int(wait_until(lambda: grandchild_file.exists() and grandchild_file.read_text(),
                                                   "the grandchild to start")))
        daemon.kill()
        daemon.wait(timeout=30)
        time.sleep(1)
        assert grandchild.is_running(), "the grandchild outlives its cluster (no parent-death signal reaches it)"

        again = loco("up", "--detach", "--nodes", "1", "--state-dir", str(state))
        assert again.returncode == 0, again.stderr + again.stdout
        grandchild.wait(timeout=30)  # reaped by the new cluster before it started anything
        assert (state / "kubeconfig").read_text().split("token:")[1] == token.split("token:")[1]
        api = client.CoreV1Api(config.new_client_from_config(config_file=str(state / "kubeconfig")))
        kept = api.read_namespaced_config_map("kept", "default")
        assert kept.data == {"k": "v"} and kept.metadata.uid == created.metadata.uid
        newer = api.create_namespaced_config_map("default", {"metadata": {"name": "after"}})
        assert int(newer.metadata.resource_version) > int(kept.metadata.resource_version)
        # its containers died with the old cluster: a restartPolicy Never pod fails, as after a node reboot
        lost = wait_until(lambda: (p := api.read_namespaced_pod("parent", "default")).status.phase == "Failed" and p,
                          "the parent pod to fail")
        terminated = lost.status.container_statuses[0].state.terminated
        assert (terminated.reason, terminated.exit_code) == ("ContainerStatusUnknown", 137)
    finally:
        loco("down", "--state-dir", str(state))
        with contextlib.suppress(psutil.Error, NameError):
            grandchild.kill()
