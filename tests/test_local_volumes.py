"""Nested volume mounts in the process kubelet: each volume keeps its own backing directory, the more
specific mount wins (as in Kubernetes), and pod teardown removes only the pod's own emptyDir backing."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from pathlib import Path, PurePosixPath

import pytest

from loco_local.cluster import LocalCluster
from loco_local.podpaths import MountStep, plan_mounts
from test_local_pod_paths import cluster, wait_for  # noqa: F401 - the fixture and the poll they share

pytestmark = pytest.mark.timeout(120)
NS = "default"


# ------------------------------------------------------------------------------------ pure plan


def test_nested_mounts_are_planned_parents_first_whatever_their_order():
    claim, scratch = Path("/vol/claim"), Path("/pod/volumes/scratch")
    steps = plan_mounts({PurePosixPath("data/checkpoints"): scratch, PurePosixPath("data"): claim})
    assert steps == [MountStep(PurePosixPath("data"), claim, link=False, within=claim),
                     MountStep(PurePosixPath("data/checkpoints"), scratch, link=True, within=scratch)]


def test_directories_between_a_volume_and_a_nested_mount_show_the_volume():
    claim, scratch, config = Path("/vol/claim"), Path("/pod/volumes/scratch"), Path("/pod/volumes/config")
    steps = plan_mounts({PurePosixPath("data"): claim, PurePosixPath("data/run/ckpt"): scratch,
                         PurePosixPath("etc/loco"): config})
    assert steps == [
        MountStep(PurePosixPath("data"), claim, link=False, within=claim),
        MountStep(PurePosixPath("etc"), None, link=False, within=None),  # no volume there: a plain directory
        MountStep(PurePosixPath("data/run"), claim / "run", link=False, within=claim),
        MountStep(PurePosixPath("etc/loco"), config, link=True, within=config),
        MountStep(PurePosixPath("data/run/ckpt"), scratch, link=True, within=scratch),
    ]


# ------------------------------------------------------------------------------ the kubelet


def claim_pod(name: str, script: str, mounts: list[dict], volumes: list[dict]) -> dict:
    container = {"name": "main", "image": "python", "command": ["python", "-c", textwrap.dedent(script)],
                 "volumeMounts": mounts}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes}}


async def run_to_end(cluster: LocalCluster, pod: dict) -> dict:
    api = cluster.api
    await api.create(f"/api/v1/namespaces/{NS}/pods", pod)
    name = pod["metadata"]["name"]
    done = await wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/pods/{name}"),
                          lambda p: p["status"].get("phase") in ("Succeeded", "Failed"), f"{name} finished")
    log = (cluster.state_dir / "pods" / NS / name / "main.log").read_text()
    assert done["status"]["phase"] == "Succeeded", (done["status"], log)
    return json.loads(log.strip().splitlines()[-1])


async def delete_pod(cluster: LocalCluster, name: str) -> None:
    await cluster.api.delete(f"/api/v1/namespaces/{NS}/pods/{name}")
    await wait_for(lambda: cluster.api.get(f"/api/v1/namespaces/{NS}/pods", fieldSelector=f"metadata.name={name}"),
                   lambda listing: not listing.get("items"), f"{name} removed")


# what each pod reports: the checkpoint directory it sees, the claim's dataset, and whether /data is the claim
REPORT = """
    import json, os
    data = os.path.join(os.environ["LOCO_LOCAL_ROOT"], "data")
    report = {"ckpt": sorted(os.listdir(os.path.join(data, "checkpoints"))),
              "dataset": open(os.path.join(data, "dataset")).read()}
"""
JUST_REPORT = REPORT + "    print(json.dumps(report), flush=True)\n"


async def test_an_empty_dir_nested_in_a_claim_shadows_it_and_teardown_keeps_the_claim(cluster: LocalCluster):
    claim = cluster.state_dir / "volumes" / NS / "shared"
    (claim / "checkpoints").mkdir(parents=True)
    (claim / "checkpoints" / "step-1").write_text("kept")
    (claim / "dataset").write_text("tokens")
    (claim / "logs").mkdir()
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}, {"name": "scratch", "emptyDir": {}}]
    nested = REPORT + """
    ckpt = os.path.join(data, "checkpoints")
    open(os.path.join(ckpt, "scratch-file"), "w").write("pod-local")
    os.symlink(data, os.path.join(ckpt, "to-claim"))  # teardown must not follow this into the claim
    open(os.path.join(data, "logs", os.environ["HOSTNAME"]), "w").write("shared")  # into the claim
    print(json.dumps(report), flush=True)
    """
    parent_first = [{"name": "data", "mountPath": "/data"}, {"name": "scratch", "mountPath": "/data/checkpoints"}]
    for name, mounts in (("parent-first", parent_first), ("child-first", parent_first[::-1])):
        report = await run_to_end(cluster, claim_pod(name, nested, mounts, volumes))
        assert report == {"ckpt": [], "dataset": "tokens"}, name  # the emptyDir, not the claim's checkpoints
        scratch = cluster.state_dir / "pods" / NS / name / "volumes" / "scratch"
        assert (scratch / "scratch-file").read_text() == "pod-local"
        await delete_pod(cluster, name)
        # the claim is untouched: its checkpoint directory is still a directory holding its file
        assert (claim / "checkpoints").is_dir() and not (claim / "checkpoints").is_symlink(), name
        assert sorted(os.listdir(claim / "checkpoints")) == ["step-1"]
        assert (claim / "checkpoints" / "step-1").read_text() == "kept"
        assert (claim / "dataset").read_text() == "tokens"
        assert (claim / "logs" / name).read_text() == "shared"
        await wait_for(lambda: asyncio.sleep(0, os.path.lexists(scratch)), lambda there: not there,
                       f"{name}'s emptyDir removed")
    # a pod mounting only the claim sees the claim's own checkpoint directory
    plain = await run_to_end(cluster, claim_pod("plain", JUST_REPORT,
                                                [{"name": "data", "mountPath": "/data"}], volumes[:1]))
    assert plain == {"ckpt": ["step-1"], "dataset": "tokens"}


async def test_a_mount_nested_in_a_hostpath_leaves_the_host_directory_alone(cluster: LocalCluster, tmp_path: Path):
    host = tmp_path / "host-data"
    (host / "checkpoints").mkdir(parents=True)
    (host / "checkpoints" / "keep").write_text("host")
    (host / "dataset").write_text("tokens")
    volumes = [{"name": "data", "hostPath": {"path": str(host), "type": "Directory"}},
               {"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": "/data/checkpoints"}, {"name": "data", "mountPath": "/data"}]
    report = await run_to_end(cluster, claim_pod("on-host", JUST_REPORT,
                                                 mounts, volumes))
    assert report == {"ckpt": [], "dataset": "tokens"}
    await delete_pod(cluster, "on-host")
    assert sorted(os.listdir(host)) == ["checkpoints", "dataset"]
    assert (host / "checkpoints" / "keep").read_text() == "host"
