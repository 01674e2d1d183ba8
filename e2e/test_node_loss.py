"""A node lost for real: its node agent is killed (SIGKILL, its worker process dies with it), the real node
lifecycle controller marks the node unreachable, and the pod there stays Terminating forever, since no
kubelet is left to confirm its end (Kubeflow's "job never restarts"). The operator counts the worker
lost, force-deletes the stuck pod with an Event saying why, and the job finishes on the other nodes
from its last checkpoint.

Real control plane only: the embedded cluster's node controller marks a lost node's pods Failed itself,
so nothing ever sticks there (docs/local-cluster.md); its node failure is e2e/test_elastic.py's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest

from e2e.conftest import dump_debug
from loco_local.scenario import CHECKPOINT_CLAIM, small_job, worker_processes
from loco_local.stack import LocalStack, default_nodes

CONTROL_PLANES = ("kubernetes",)
TIMEOUT_S = 420
#: the operator's --node-lost-grace-seconds here; the controller manager's node-monitor grace is 20 s
GRACE_S = 5


@pytest.fixture(scope="module")
def lossy(tmp_path_factory: pytest.TempPathFactory, control_plane: str) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp(f"loco-e2e-node-loss-{control_plane}")
    with LocalStack(state, default_nodes(3), control_plane=control_plane,
                    operator_env={"LOCO_NODE_LOST_GRACE_SECONDS": str(GRACE_S)}) as s:
        s.apply(copy.deepcopy(CHECKPOINT_CLAIM))
        yield s
        assert not s.rbac_denials(), "\n".join(s.rbac_denials())


def _status(stack: LocalStack, name: str) -> dict:
    return (stack.get_job(name) or {}).get("status") or {}


def test_a_killed_node_agent_is_survived_with_the_stuck_pod_force_deleted(lossy: LocalStack) -> None:
    stack, name = lossy, "lost-node"
    stack.apply(small_job(name, steps=60, faultInjection={"stepDelayS": 0.05}))
    try:
        stack.wait_for(lambda: (_status(stack, name).get("lastCheckpoint") or {}).get("step", 0) >= 10,
                       timeout_s=TIMEOUT_S, what="a first checkpoint")
        placed = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in stack.list_pods(name)}
        lost = placed[f"{name}-worker-1"]
        stack.cluster.kill_node_agent(lost)
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = job["status"]
    assert status["phase"] == "Succeeded", dump_debug(stack, name)
    assert status["step"] == 60 and status["restarts"] >= 1, dump_debug(stack, name)

    # the real node lifecycle controller saw the node go: unreachable, tainted
    node = stack.resource("v1", "Node").get(name=lost).to_dict()
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "Unknown", ready
    assert any(t["key"] == "node.kubernetes.io/unreachable" for t in node["spec"].get("taints") or []), node["spec"]
    # the stuck pod was force-deleted, and the Event says which, where and why
    forced = [e for e in stack.events(name) if e["reason"] == "ForceDeleted"]
    assert forced, dump_debug(stack, name)
    assert f"{name}-worker-1" in forced[0]["message"] and f"on node {lost}" in forced[0]["message"], forced
    assert "stuck Terminating" in forced[0]["message"], forced
    # the workers of the last epoch ran elsewhere, and no worker process is left behind
    final = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in stack.list_pods(name)}
    assert final and lost not in final.values(), final
    assert not [p for p in worker_processes(name) if p.is_running() and p.status() != "zombie"]
