"""Paths a pod names (mountPath, subPath, subPathExpr, workingDir, terminationMessagePath, volume item
paths) cannot reach outside the pod's directories: the API server refuses what kube-apiserver refuses,
with its messages, and the process kubelet refuses again (it also runs pods it did not validate)."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

import pytest

from loco_local.apiserver.errors import APIError
from loco_local.apiserver.operations import Operations
from loco_local.apiserver.resources import Registry
from loco_local.apiserver.store import Store
from loco_local.apiserver.validation import pod_path_causes
from loco_local.cluster import LocalCluster
from loco_local.nodes import NodeSpec
from loco_local.podpaths import (PathError, container_path, local_path_problems, open_within, pod_path_problems,
                                 resolve_within, volume_path)
from test_local_kubelet import wait_for  # the kubelet tests' poll

pytestmark = pytest.mark.timeout(120)
NS = "default"


# -------------------------------------------------------------------------------- pure rules


def test_local_paths_follow_kube_apiserver():
    assert local_path_problems("ckpt/step-1") == []
    assert local_path_problems("../x") == ["must not contain '..'"]
    assert local_path_problems("a/../../x") == ["must not contain '..'"]  # one complaint however many
    assert local_path_problems("/x") == ["must be a relative path"]
    assert local_path_problems("/../x") == ["must be a relative path", "must not contain '..'"]
    assert local_path_problems("..data") == []  # a subPath may start with '..'
    assert local_path_problems("..data", reserved=True) == ["must not start with '..'"]  # an item path may not
    assert local_path_problems("../x", reserved=True) == ["must not contain '..'"]


def test_container_paths_are_rooted_and_never_climb():
    assert container_path("/data/ckpt/") == PurePosixPath("data/ckpt")
    assert container_path("data/./ckpt") == PurePosixPath("data/ckpt")  # relative: made absolute, as the kubelet does
    assert container_path("/") == PurePosixPath(".")
    for bad in ("/data/../../etc", "..", "/a/.."):
        with pytest.raises(PathError, match="must not contain '..'"):
            container_path(bad)
    assert volume_path("ckpt/a") == PurePosixPath("ckpt/a")
    with pytest.raises(PathError, match="must be a relative path"):
        volume_path("/etc")
    with pytest.raises(PathError, match="must name a file"):
        volume_path("./", reserved=True)


def test_resolving_a_path_refuses_symlinks_that_leave_the_root(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "inner").symlink_to(root / "sub")
    (root / "evil").symlink_to(outside)
    assert resolve_within(root / "inner" / "new", [root]) == root / "sub" / "new"  # not created
    with pytest.raises(PathError, match="outside"):
        resolve_within(root / "evil" / "x", [root])
    assert resolve_within(root / "evil" / "x", [root, outside]) == outside / "x"
    (outside / "secret").write_text("s3cret")
    (root / "sub" / "term").symlink_to(outside / "secret")
    with pytest.raises(PathError):
        open_within(root / "sub" / "term", [root], os.O_RDONLY)
    os.mkfifo(root / "sub" / "fifo")  # a reader must not block on a pipe a container left
    with pytest.raises(PathError, match="regular file"):
        open_within(root / "sub" / "fifo", [root], os.O_RDONLY)
    assert (outside / "secret").read_text() == "s3cret"


def bad_pod() -> dict:
    """A pod naming an unsafe path in every place a pod can name one."""
    return {"metadata": {"name": "climber"}, "spec": {
        "volumes": [{"name": "cfg", "configMap": {"name": "c", "items": [{"key": "k", "path": "../k"}]}},
                    {"name": "sec", "secret": {"secretName": "s", "items": [{"key": "k", "path": "/etc/k"}]}},
                    {"name": "info", "downwardAPI": {"items": [{"path": "..data", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                    {"name": "../up", "emptyDir": {}}],
        "containers": [{"name": "main", "image": "python", "command": ["true"],
                        "workingDir": "/work/../..", "terminationMessagePath": "/../../term",
                        "volumeMounts": [{"name": "cfg", "mountPath": "/cfg", "subPath": "../x"},
                                         {"name": "sec", "mountPath": "/../../sec", "subPathExpr": "/$(HOME)"}]}]}}


def test_the_api_server_refuses_what_kube_apiserver_refuses_with_its_fields_and_messages():
    causes = pod_path_causes(bad_pod())
    assert causes == [
        ("spec.volumes[0].configMap.items[0].path",
         "spec.volumes[0].configMap.items[0].path: Invalid value: \"../k\": must not contain '..'"),
        ("spec.volumes[1].secret.items[0].path",
         'spec.volumes[1].secret.items[0].path: Invalid value: "/etc/k": must be a relative path'),
        ("spec.volumes[2].downwardAPI.items[0].path",
         "spec.volumes[2].downwardAPI.items[0].path: Invalid value: \"..data\": must not start with '..'"),
        ("spec.volumes[3].name",
         'spec.volumes[3].name: Invalid value: "../up": a lowercase RFC 1123 label must consist of lower case '
         "alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  "
         "or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"),
        # kube-apiserver names these on the volumeMounts list, without the index (validateVolumeMounts)
        ("spec.containers[0].volumeMounts.subPath",
         "spec.containers[0].volumeMounts.subPath: Invalid value: \"../x\": must not contain '..'"),
        ("spec.containers[0].volumeMounts.subPathExpr",
         'spec.containers[0].volumeMounts.subPathExpr: Invalid value: "/$(HOME)": must be a relative path'),
    ]
    # mountPath, workingDir and terminationMessagePath are not checked by kube-apiserver either


def test_a_pod_with_an_unsafe_path_is_422_invalid():
    registry = Registry()
    ops = Operations(Store(), registry)
    ops.create(registry.get("", "v1", "namespaces"), None, {"metadata": {"name": NS}})
    with pytest.raises(APIError) as err:
        ops.create(registry.get("", "v1", "pods"), NS, bad_pod())
    assert (err.value.code, err.value.reason) == (422, "Invalid")
    assert err.value.message.startswith('Pod "climber" is invalid: [spec.volumes[0].configMap.items[0].path: ')
    fields = [c["field"] for c in err.value.details["causes"]]
    assert "spec.containers[0].volumeMounts.subPath" in fields and "spec.volumes[3].name" in fields
    assert err.value.details["causes"][0]["message"] == "Invalid value: \"../k\": must not contain '..'"


def test_objects_of_the_wrong_shape_are_skipped_not_a_crash():
    spec = {"volumes": ["x", {"name": "v", "configMap": "nope"}, {"name": "w", "secret": {"items": [3]}}],
            "containers": [7, {"name": "c", "volumeMounts": "no"}]}
    assert pod_path_causes({"spec": spec}) == [] and pod_path_causes({"spec": "nope"}) == []
    assert pod_path_problems(spec) == []


def test_the_kubelet_checks_every_path_a_pod_names():
    problems = pod_path_problems(bad_pod()["spec"])
    assert problems == [
        "spec.volumes[0].configMap.items[0].path: \"../k\" must not contain '..'",
        'spec.volumes[1].secret.items[0].path: "/etc/k" must be a relative path',
        "spec.volumes[2].downwardAPI.items[0].path: \"..data\" must not start with '..'",
        'spec.volumes[3].name: "../up" is not a valid volume name',
        "spec.containers[0].workingDir: \"/work/../..\" must not contain '..'",
        "spec.containers[0].terminationMessagePath: \"/../../term\" must not contain '..'",
        "spec.containers[0].volumeMounts[0].subPath: \"../x\" must not contain '..'",
        "spec.containers[0].volumeMounts[1].mountPath: \"/../../sec\" must not contain '..'",
    ]  # subPathExpr is checked once expanded, with the container's environment


# ------------------------------------------------------------------- the kubelet, end to end


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    c = LocalCluster(tmp_path / "state", [NodeSpec("node-0", cpu="8", memory="8Gi")], crd_paths=[],
                     restart_backoff_s=0.2)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def python_pod(name: str, script: str, container: dict | None = None, volumes: list | None = None) -> dict:
    spec = {"name": "main", "image": "python", "command": ["python", "-c", textwrap.dedent(script)], **(container or {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [spec], "volumes": volumes or []}}


async def config_error(cluster: LocalCluster, pod: dict) -> str:
    """Create ``pod``; the message of the CreateContainerConfigError its container waits in."""
    api, name = cluster.api, pod["metadata"]["name"]
    await api.create(f"/api/v1/namespaces/{NS}/pods", pod)

    def waiting(p: dict) -> dict:
        return ((p["status"].get("containerStatuses") or [{}])[0].get("state") or {}).get("waiting") or {}

    got = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/{name}"),
                         lambda p: waiting(p).get("reason") == "CreateContainerConfigError"
                         or p["status"].get("phase") in ("Succeeded", "Failed"), f"{name} refused")
    assert got["status"]["phase"] == "Pending", got["status"]
    return waiting(got)["message"]


async def test_the_kubelet_refuses_paths_that_climb_out_of_the_container_root(cluster: LocalCluster):
    state = cluster.state_dir
    (state / "precious").write_text("keep me")
    pod = python_pod("climber", "print('ran')", container={
        "workingDir": "/../../../../wd", "terminationMessagePath": "/../../../../precious",
        "volumeMounts": [{"name": "scratch", "mountPath": "/../../../escape"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}])
    message = await config_error(cluster, pod)
    for field in ("workingDir", "terminationMessagePath", "volumeMounts[0].mountPath"):
        assert f"spec.containers[0].{field}" in message
    assert "must not contain '..'" in message
    assert (state / "precious").read_text() == "keep me"
    assert not os.path.lexists(state / "wd") and not os.path.lexists(state / "pods" / "escape")
    assert "ran" not in (state / "pods" / NS / "climber" / "main.log").read_text()


async def test_the_kubelet_refuses_config_map_keys_that_climb_out_of_the_volume(cluster: LocalCluster):
    # kube-apiserver refuses such a key on the ConfigMap; the embedded one does not, the kubelet must
    await cluster.api.create(f"/api/v1/namespaces/{NS}/configmaps",
                             {"metadata": {"name": "climbing"}, "data": {"../../../../planted": "x"}})
    pod = python_pod("cm-climber", "print('ran')", container={"volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]},
                     volumes=[{"name": "cfg", "configMap": {"name": "climbing"}}])
    message = await config_error(cluster, pod)
    assert "must not contain '..'" in message and "planted" in message
    assert not [p for p in cluster.state_dir.rglob("planted")]


async def test_the_kubelet_checks_a_sub_path_expression_once_expanded(cluster: LocalCluster):
    pod = python_pod("expr-climber", "print('ran')", volumes=[{"name": "scratch", "emptyDir": {}}], container={
        "env": [{"name": "UP", "value": "../../../.."}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch", "subPathExpr": "$(UP)/expr-planted"}]})
    message = await config_error(cluster, pod)
    assert "subPath" in message and "must not contain '..'" in message
    assert not [p for p in cluster.state_dir.rglob("expr-planted")]


async def test_a_symlink_planted_in_a_volume_cannot_lead_a_mount_outside(cluster: LocalCluster, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s3cret")
    claim = cluster.state_dir / "volumes" / NS / "shared"
    claim.mkdir(parents=True)
    (claim / "evil").symlink_to(outside)
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}]
    sub = python_pod("via-subpath", "print(open(__import__('os').environ['LOCO_LOCAL_ROOT'] + '/data/secret').read())",
                     container={"volumeMounts": [{"name": "data", "mountPath": "/data", "subPath": "evil"}]},
                     volumes=volumes)
    assert "outside" in await config_error(cluster, sub)
    term = python_pod("via-termination-path", "print('ran')", volumes=volumes, container={
        "terminationMessagePath": "/data/evil/secret", "volumeMounts": [{"name": "data", "mountPath": "/data"}]})
    api = cluster.api
    await api.create(f"/api/v1/namespaces/{NS}/pods", term)
    done = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/via-termination-path"),
                          lambda p: p["status"].get("phase") in ("Succeeded", "Failed"), "via-termination-path ended")
    state = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert state["reason"] == "StartError" and "outside" in state["message"]
    assert (outside / "secret").read_text() == "s3cret"  # not truncated
    assert sorted(os.listdir(outside)) == ["secret"]


async def test_a_termination_message_symlink_is_not_followed_out_of_the_pod(cluster: LocalCluster, tmp_path: Path):
    secret = tmp_path / "host-secret"
    secret.write_text("s3cret")
    script = f"""
        import os
        term = os.path.join(os.environ["LOCO_LOCAL_ROOT"], "dev", "termination-log")
        os.unlink(term)
        os.symlink({str(secret)!r}, term)
    """
    api = cluster.api
    await api.create(f"/api/v1/namespaces/{NS}/pods", python_pod("leaker", script))
    done = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/leaker"),
                          lambda p: p["status"].get("phase") in ("Succeeded", "Failed"), "leaker ended")
    state = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert state["exitCode"] == 0
    assert "s3cret" not in json.dumps(done["status"])
