"""The real control plane as a user meets it: ``loco local up --control-plane kubernetes --detach``, kubectl with
the kubeconfig it prints, credentials that are files only their owner reads, node agents held by the Node
authorizer and NodeRestriction, Pod Security ``restricted`` enforced by the real admission plugin, Helm's
upgrade and uninstall of the chart, and ``loco local down`` leaving no process behind."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from loco_local.chart import ChartRelease

CONTROL_PLANES = ("kubernetes",)


def _loco(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import loco_cli; loco_cli.main()", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def _processes_of(state_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if str(state_dir) in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, control_plane: str) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("loco-up-kubernetes")
    up = _loco("local", "up", "--control-plane", control_plane, "--nodes", "2", "--state-dir", str(state), "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    info = json.loads((state / "cluster.json").read_text())
    try:
        yield {"state": state, **info}
    finally:
        down = _loco("local", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr


def _kubectl(cluster: dict, *args: str, kubeconfig: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", kubeconfig or cluster["kubeconfig"], *args],
                          capture_output=True, text=True, timeout=60, check=check)


def test_kubectl_reaches_a_real_kube_apiserver_with_the_printed_kubeconfig(cluster: dict) -> None:
    version = json.loads(_kubectl(cluster, "version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.37.2", version
    nodes = _kubectl(cluster, "get", "nodes", "-o", "json")
    ready = {n["metadata"]["name"]: next(c["status"] for c in n["status"]["conditions"] if c["type"] == "Ready")
             for n in json.loads(nodes.stdout)["items"]}
    assert ready == {"node-0": "True", "node-1": "True"}
    status = _loco("local", "status", "--state-dir", str(cluster["state"]))
    assert status.returncode == 0 and "node-1" in status.stdout, status.stderr
    # TLS and authentication everywhere: without a credential the API answers 401, not data
    anonymous = subprocess.run(["curl", "-s", "--cacert", str(cluster["state"] / "pki" / "ca.crt"),
                                cluster["url"] + "/api/v1/pods"], capture_output=True, text=True, timeout=30)
    assert json.loads(anonymous.stdout)["code"] == 401, anonymous.stdout


def test_credentials_are_readable_by_their_owner_only(cluster: dict) -> None:
    state: Path = cluster["state"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "pki").stat().st_mode) == 0o700
    secrets = [state / "kubeconfig", *(state / "kubeconfigs").glob("*.kubeconfig"), *(state / "pki").glob("*.key")]
    assert len(secrets) >= 10
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_node_agent_may_touch_only_its_own_node(cluster: dict) -> None:
    node0 = str(cluster["state"] / "kubeconfigs" / "node-node-0.kubeconfig")
    who = _kubectl(cluster, "auth", "whoami", "-o", "json", kubeconfig=node0)
    user = json.loads(who.stdout)["status"]["userInfo"]
    assert user["username"] == "system:node:node-0" and "system:nodes" in user["groups"], user
    own = _kubectl(cluster, "label", "node", "node-0", "example.dev/own=yes", kubeconfig=node0, check=False)
    assert own.returncode == 0, own.stderr
    other = _kubectl(cluster, "label", "node", "node-1", "example.dev/other=yes", kubeconfig=node0, check=False)
    assert other.returncode != 0 and "forbidden" in other.stderr.lower(), other.stderr
    secrets = _kubectl(cluster, "get", "secrets", "-A", kubeconfig=node0, check=False)
    assert secrets.returncode != 0 and "forbidden" in secrets.stderr.lower(), secrets.stderr


def test_pod_security_restricted_refuses_a_pod_that_could_escalate(cluster: dict, tmp_path: Path) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "escalates"},
           "spec": {"containers": [{"name": "c", "image": "x", "command": ["true"],
                                    "securityContext": {"allowPrivilegeEscalation": True}}]}}
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    refused = _kubectl(cluster, "apply", "-f", str(path), check=False)
    assert refused.returncode != 0, refused.stdout
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr
    assert "allowPrivilegeEscalation != false" in refused.stderr, refused.stderr


def test_the_worker_pod_the_operator_renders_passes_restricted(cluster: dict, tmp_path: Path) -> None:
    from loco_operator.render import JobRef, render_pod
    from loco_operator.spec import TrainingJobSpec

    spec = TrainingJobSpec.model_validate({"replicas": 2})
    pod = render_pod(JobRef("psa", "default", "uid-1"), spec, 0, 0)
    pod["metadata"].pop("ownerReferences", None)
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(pod))
    admitted = _kubectl(cluster, "create", "--dry-run=server", "-f", str(path), check=False)
    assert admitted.returncode == 0, admitted.stderr
    assert "Warning" not in admitted.stderr, admitted.stderr  # not even a restricted warning


def test_helm_installs_upgrades_and_uninstalls_the_chart_leaving_nothing(cluster: dict) -> None:
    release = ChartRelease(cluster["state"], Path(cluster["kubeconfig"]), namespace="loco-helm")
    _kubectl(cluster, "create", "namespace", "loco-helm")
    _kubectl(cluster, "label", "namespace", "loco-helm", "pod-security.kubernetes.io/enforce=restricted",
             "pod-security.kubernetes.io/warn=restricted")
    release.install({"watchNamespaces": ["default"]})
    kinds = sorted({o["kind"] for o in release.manifest()})
    assert {"ServiceAccount", "ClusterRole", "Role", "RoleBinding", "Deployment"} <= set(kinds), kinds
    # the chart's operator pod template is admitted by Pod Security restricted too (server-side dry run)
    deployment = next(o for o in release.manifest() if o["kind"] == "Deployment")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "operator-psa", "namespace": "loco-helm"},
           "spec": deployment["spec"]["template"]["spec"]}
    path = cluster["state"] / "operator-pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    admitted = _kubectl(cluster, "create", "--dry-run=server", "-f", str(path), check=False)
    assert admitted.returncode == 0 and "Warning" not in admitted.stderr, admitted.stderr
    release.install({"watchNamespaces": ["default"], "nodeLostGraceSeconds": 120}, upgrade=True)
    args = _kubectl(cluster, "get", "deployment", "-n", "loco-helm", "-o", "jsonpath={..args}").stdout
    assert "--node-lost-grace-seconds=120" in args, args
    release.uninstall()
    left = _kubectl(cluster, "get", "all,roles,rolebindings,serviceaccounts,configmaps", "-n", "loco-helm",
                    "-l", "app.kubernetes.io/instance=loco-operator", "-o", "name").stdout
    assert left.strip() == "", left
    cluster_left = _kubectl(cluster, "get", "clusterroles,clusterrolebindings", "-o", "name",
                            "-l", "app.kubernetes.io/instance=loco-operator").stdout
    assert cluster_left.strip() == "", cluster_left


def test_down_stops_every_process_it_started(tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path_factory.mktemp("loco-up-down")
    up = _loco("local", "up", "--control-plane", "kubernetes", "--nodes", "1", "--state-dir", str(state), "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    started = _processes_of(state)
    names = " ".join(" ".join(p.cmdline()) for p in started)
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "loco_local.nodeagent"):
        assert component in names, (component, names)
    down = _loco("local", "down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive
    assert not _processes_of(state)


#: the kubectl releases the image ships beside the default one (Google Cloud SDK's kubectl.1.NN)
KUBECTLS = sorted(Path("/usr/lib/google-cloud-sdk/bin").glob("kubectl.1.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))


def test_the_kubeconfig_works_with_every_kubectl_on_the_machine(cluster: dict) -> None:
    """kubectl 1.27 to 1.33 (what the image ships) read the kubeconfig, authenticate with its client certificate
    and talk to kube-apiserver v1.37.2."""
    assert {f"kubectl.1.{minor}" for minor in range(27, 34)} <= {p.name for p in KUBECTLS}, KUBECTLS
    for kubectl in ["kubectl", *map(str, KUBECTLS)]:
        nodes = subprocess.run([kubectl, "--kubeconfig", cluster["kubeconfig"], "get", "nodes", "-o", "name"],
                               capture_output=True, text=True, timeout=60)
        assert nodes.returncode == 0, (kubectl, nodes.stderr)
        assert nodes.stdout.split() == ["node/node-0", "node/node-1"], (kubectl, nodes.stdout)
        version = json.loads(subprocess.run([kubectl, "--kubeconfig", cluster["kubeconfig"], "version", "-o", "json"],
                                            capture_output=True, text=True, timeout=60, check=True).stdout)
        assert version["serverVersion"]["gitVersion"] == "v1.37.2", (kubectl, version)
