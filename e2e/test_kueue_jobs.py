"""TrainingJobs queued in the real Kueue (v0.17.0) on the real control plane, the operator running with the chart's
RBAC: two jobs that together exceed the ClusterQueue's quota run one after the other, never side by side, on the
node their flavor names; a
higher-priority job preempts a running lower one, which stops, waits Suspended, and once re-admitted resumes from
its checkpoint and finishes, its restart budget untouched."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from e2e.conftest import dump_debug
from loco_local.kueue import Kueue, KueueBinaryMissing, kueue_binary
from loco_local.scenario import small_job
from loco_local.stack import LocalStack

CONTROL_PLANES = ("kubernetes",)
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
TIMEOUT_S = 420
#: 2 workers of 300m each: one job fits the queue's 1 CPU, two do not
WORKER = {"requests": {"cpu": "300m", "memory": "256Mi"}}
FLAVOR_NODE = "node-1"


@pytest.fixture(scope="module")
def kueue(stack: LocalStack) -> Iterator[Kueue]:
    try:
        kueue_binary()
    except KueueBinaryMissing as exc:
        pytest.skip(str(exc))
    with Kueue(stack.kubeconfig, stack.state_dir / "kueue") as k:
        api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(stack.kubeconfig)))

        def make(plural: str, body: dict, namespace: str | None = None) -> None:
            body = {"apiVersion": f"{GROUP}/{VERSION}", **body}
            if namespace:
                api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
            else:
                api.create_cluster_custom_object(GROUP, VERSION, plural, body)

        # the flavor's quota lives on node-1: admitted workers must go there (its nodeLabels become their selector)
        make("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": "default"},
                                 "spec": {"nodeLabels": {"kubernetes.io/hostname": FLAVOR_NODE}}})
        make("clusterqueues", {"kind": "ClusterQueue", "metadata": {"name": "cq"}, "spec": {
            "namespaceSelector": {}, "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{"name": "default", "resources": [
                {"name": "cpu", "nominalQuota": "1"}, {"name": "memory", "nominalQuota": "8Gi"}]}]}]}})
        make("localqueues", {"kind": "LocalQueue", "metadata": {"name": "lq"}, "spec": {"clusterQueue": "cq"}},
             stack.namespace)
        for name, value in (("low", 10), ("high", 1000)):
            make("workloadpriorityclasses", {"kind": "WorkloadPriorityClass", "metadata": {"name": name},
                                             "value": value, "description": f"{name} priority"})
        stack.wait_for(lambda: next((c for c in (api.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", "cq")
                                                 .get("status") or {}).get("conditions") or []
                                     if c["type"] == "Active" and c["status"] == "True"), None),
                       timeout_s=60, what="ClusterQueue cq Active")
        yield k
        k.check()


def queued(name: str, priority: str | None = None, **overrides) -> dict:
    doc = small_job(name, template__resources=WORKER, **overrides)
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "lq",
                                 **({"kueue.x-k8s.io/priority-class": priority} if priority else {})}
    return doc


class Overlap:
    """Watches, in the background, whether workers of two jobs ever run at the same time."""

    def __init__(self, stack: LocalStack, jobs: tuple[str, str]) -> None:
        self.stack, self.jobs, self.seen = stack, jobs, []
        self.nodes: set[str] = set()  # every node a worker of either job was bound to
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            pods = {job: self.stack.list_pods(job) for job in self.jobs}
            self.nodes.update(p["spec"].get("nodeName") for job in pods.values() for p in job if p["spec"].get("nodeName"))
            running = {job: [p["metadata"]["name"] for p in found if (p.get("status") or {}).get("phase") == "Running"]
                       for job, found in pods.items()}
            if all(running.values()):
                self.seen.append(running)

    def __enter__(self) -> "Overlap":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _events(stack: LocalStack, name: str, reason: str) -> list[str]:
    return [e["message"] for e in stack.events(name) if e["reason"] == reason]


def test_two_jobs_over_the_quota_run_one_after_the_other(stack: LocalStack, kueue: Kueue) -> None:
    first, second = "queued-a", "queued-b"
    with Overlap(stack, (first, second)) as overlap:
        stack.apply(queued(first, steps=30))
        stack.apply(queued(second, steps=30))
        try:
            for name in (first, second):
                job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
                assert job["status"]["phase"] == "Succeeded", dump_debug(stack, name)
        except TimeoutError:
            raise AssertionError(dump_debug(stack, first) + "\n" + dump_debug(stack, second)) from None
    assert overlap.seen == [], f"both jobs had running workers at once: {overlap.seen[:3]}"
    assert overlap.nodes == {FLAVOR_NODE}, overlap.nodes  # where the admitted flavor is, not least-allocated
    # each waited for Kueue, then was admitted; the later one was held for quota
    for name in (first, second):
        assert _events(stack, name, "Admitted"), stack.events(name)
    held = _events(stack, first, "Queued") + _events(stack, second, "Queued")
    assert any("insufficient unused quota for cpu" in m for m in held), held


def test_a_higher_priority_job_preempts_a_lower_one_which_resumes_from_its_checkpoint(stack: LocalStack,
                                                                                      kueue: Kueue) -> None:
    """The low job has no periodic checkpoint (everySteps beyond the end): what it resumes from is the checkpoint its
    workers commit when the operator asks, after Kueue evicts it and before the workers are stopped."""
    low, high = "prio-low", "prio-high"
    steps = 150  # 13 s left after step 20 for Kueue to preempt and the operator to ask, under CI's load
    stack.apply(queued(low, "low", steps=steps, faultInjection={"stepDelayS": 0.1}, runPolicy={"backoffLimit": 0},
                       checkpoint__everySteps=1000))
    try:
        stack.wait_for(lambda: ((stack.get_job(low) or {}).get("status") or {}).get("step", 0) >= 20,
                       timeout_s=TIMEOUT_S, what=f"{low} to train 20 steps")
        stack.apply(queued(high, "high", steps=20))
        stack.wait_for(lambda: _events(stack, low, "Evicted"), timeout_s=120, what=f"{low} evicted by Kueue")
        done = stack.wait_for_phase(high, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
        assert done["status"]["phase"] == "Succeeded", dump_debug(stack, high)
        job = stack.wait_for_phase(low, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, low) + "\n" + dump_debug(stack, high)) from None
    status = job["status"]
    # backoffLimit 0: a counted restart would have failed it; it resumed from what it had committed
    assert status["phase"] == "Succeeded" and status["step"] == steps and status["restarts"] == 0, dump_debug(stack, low)
    asked = _events(stack, low, "CheckpointBeforeStop")
    assert asked and "evicted by Kueue: Preempted" in asked[0], asked
    assert not _events(stack, low, "CheckpointBeforeStopTimedOut"), stack.events(low)
    evicted = _events(stack, low, "Evicted")
    assert "Preempted" in evicted[0], evicted
    resumed = _events(stack, low, "Resumed")
    assert resumed and 20 <= int(resumed[-1].split("from step ")[1].split()[0]) < steps, resumed
    assert len(_events(stack, low, "Admitted")) >= 2  # admitted, evicted, admitted again
