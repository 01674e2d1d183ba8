"""Foundation scenarios: quickstart, worker crash -> restart from checkpoint, invalid spec refused,
deletion cleans up, operator restart carries the job on."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import yaml

from e2e.conftest import REPO, dump_debug
from loco_local.scenario import small_job, worker_processes
from loco_local.stack import LocalStack

TIMEOUT_S = 420
CONTROL_PLANES = ("embedded", "kubernetes")


def _status(stack: LocalStack, name: str) -> dict:
    return (stack.get_job(name) or {}).get("status") or {}


def test_quickstart_succeeds_with_checkpoint_on_disk(stack: LocalStack) -> None:
    stack.apply_file(REPO / "examples" / "quickstart.yaml")
    try:
        job = stack.wait_for_phase("quickstart", {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, "quickstart")) from None
    status = job["status"]
    assert status["phase"] == "Succeeded", dump_debug(stack, "quickstart")
    spec = yaml.safe_load_all((REPO / "examples" / "quickstart.yaml").read_text())
    steps = [d for d in spec if d and d["kind"] == "TrainingJob"][0]["spec"]["training"]["steps"]
    assert status["step"] == steps
    assert status["lastCheckpoint"]["step"] == steps
    # a byte-level model starts at ln(256) = 5.55 nats; training must have learned something
    assert status["loss"] < math.log(256) - 1.0, status
    assert status["restarts"] == 0, dump_debug(stack, "quickstart")
    # the checkpoint is really on the shared volume
    ckpt_dirs = list((stack.state_dir / "volumes").rglob(f"step-{steps:08d}"))
    assert ckpt_dirs, f"no step-{steps:08d} checkpoint under {stack.state_dir / 'volumes'}"
    assert any(p.name == "manifest.json" for p in ckpt_dirs[0].iterdir())  # the commit record of the universal checkpoint
    assert stack.wait_for_events("quickstart", "Succeeded")
    # kubectl shows the printer columns
    out = stack.kubectl("get", "tj", "quickstart").stdout
    assert "PHASE" in out and "Succeeded" in out and f"{steps}" in out, out


def test_worker_killed_mid_run_restarts_from_last_checkpoint(stack: LocalStack) -> None:
    name = "crash"
    stack.apply(small_job(name, steps=60, faultInjection={"stepDelayS": 0.05}))
    try:
        stack.wait_for(lambda: (_status(stack, name).get("lastCheckpoint") or {}).get("step", 0) >= 10,
                       timeout_s=TIMEOUT_S, what="a first checkpoint")
        # training workers are Ready pods: the readinessProbe (GET /ready) passes while the trainer takes steps
        stack.wait_for(lambda: _ready_pods(stack, name) == 2, timeout_s=10, what="both training pods Ready")
        victims = [p for p in worker_processes(name) if p.environ().get("LOCO_REPLICA_INDEX") == "1"]
        assert victims, "no worker process of replica 1 found"
        for proc in victims:
            proc.send_signal(signal.SIGKILL)
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = job["status"]
    assert status["phase"] == "Succeeded", dump_debug(stack, name)
    assert status["restarts"] == 1, dump_debug(stack, name)
    assert status["membershipEpoch"] >= 1
    messages = " | ".join(f"{e['reason']}: {e['message']}" for e in stack.events(name))
    assert "Restarting" in messages and "from step" in messages, messages


def test_invalid_job_is_refused_with_the_field_named(stack: LocalStack, tmp_path: Path) -> None:
    bad = small_job("bad-spec", replicas=0)
    bad["spec"]["elastic"] = {"minReplicas": 3, "maxReplicas": 4}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = stack.kubectl("apply", "-f", str(path), check=False)
    assert result.returncode != 0
    assert "spec.replicas" in result.stderr, result.stderr
    assert stack.get_job("bad-spec") is None
    assert stack.list_pods("bad-spec") == []

    cross = small_job("bad-cross", replicas=2)
    cross["spec"]["elastic"] = {"minReplicas": 3, "maxReplicas": 4}
    path.write_text(yaml.safe_dump(cross))
    result = stack.kubectl("apply", "-f", str(path), check=False)
    assert result.returncode != 0
    assert "minReplicas" in result.stderr, result.stderr
    assert stack.get_job("bad-cross") is None


def test_deleting_a_job_removes_its_pods_and_service(stack: LocalStack) -> None:
    name = "deleteme"
    stack.apply(small_job(name, steps=2000))
    stack.wait_for(lambda: len(stack.list_pods(name)) == 2, timeout_s=120, what="2 worker pods")
    stack.kubectl("delete", "tj", name, "--wait=true", timeout_s=120)

    def gone() -> bool:
        services = stack.resource("v1", "Service").get(namespace="default", label_selector=f"loco.dev/job={name}").items
        return not stack.list_pods(name) and not services and not worker_processes(name)

    stack.wait_for(gone, timeout_s=120, what="pods, service and processes of the deleted job to go away")


def test_operator_killed_and_restarted_carries_the_job_on(stack: LocalStack) -> None:
    name = "survivor"
    stack.apply(small_job(name, steps=60, faultInjection={"stepDelayS": 0.05}))
    try:
        stack.wait_for(lambda: (_status(stack, name).get("step") or 0) >= 5, timeout_s=TIMEOUT_S, what="training to start")
        pods_before = {p["metadata"]["uid"] for p in stack.list_pods(name)}
        stack.restart_operator(kill=True)
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = job["status"]
    assert status["phase"] == "Succeeded", dump_debug(stack, name)
    assert status["restarts"] == 0
    assert status["step"] == 60
    pods_after = {p["metadata"]["uid"] for p in stack.list_pods(name)}
    # cleanPodPolicy Running keeps finished pods: the same pods ran to the end, none was recreated
    assert pods_after <= pods_before, (pods_before, pods_after)


def _ready_pods(stack: LocalStack, name: str) -> int:
    return sum(1 for pod in stack.list_pods(name)
               if any(c.get("type") == "Ready" and c.get("status") == "True" for c in pod["status"].get("conditions") or []))


def test_suspend_saves_where_the_workers_are_deletes_them_and_resume_carries_on_from_there(stack: LocalStack) -> None:
    """No periodic checkpoint (everySteps beyond the end): the only checkpoint to resume from is the one the workers
    commit when the operator asks before it stops them (runPolicy.checkpointBeforeStopSeconds)."""
    name = "pausable"
    # 150 steps of 0.1 s: the ask has ~14 s to land before the end (CI once saw 20 steps of 0.05 s go by between the
    # status read and the suspension, and the job finished before its workers were asked)
    steps = 150
    stack.apply(small_job(name, steps=steps, faultInjection={"stepDelayS": 0.1}, checkpoint__everySteps=1000))
    jobs = stack.resource("loco.dev/v1alpha1", "TrainingJob")

    def suspend(value: bool) -> None:
        jobs.patch(name=name, namespace=stack.namespace, body={"spec": {"runPolicy": {"suspend": value}}},
                   content_type="application/merge-patch+json")

    try:
        stack.wait_for(lambda: (_status(stack, name).get("step") or 0) >= 12, timeout_s=TIMEOUT_S,
                       what="training under way")
        assert not _status(stack, name).get("lastCheckpoint"), dump_debug(stack, name)
        at = _status(stack, name)["step"]
        suspend(True)
        stack.wait_for(lambda: _status(stack, name).get("phase") == "Suspended" and not stack.list_pods(name)
                       and not worker_processes(name), timeout_s=120, what="the job suspended, its pods and processes gone")
        kept = _status(stack, name)["lastCheckpoint"]["step"]
        assert at <= kept < steps, (at, kept)
        suspend(False)
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = job["status"]
    assert status["phase"] == "Succeeded" and status["step"] == steps, dump_debug(stack, name)
    assert status["restarts"] == 0, dump_debug(stack, name)  # a suspension is not a failure
    reasons = [e["reason"] for e in stack.events(name)]
    assert "CheckpointBeforeStop" in reasons and "Suspended" in reasons and "Resumed" in reasons, reasons
    assert "CheckpointBeforeStopTimedOut" not in reasons, reasons
    when = {e["reason"]: e.get("lastTimestamp") or e.get("eventTime") or "" for e in stack.events(name)}
    assert when["CheckpointBeforeStop"] <= when["Suspended"], when  # asked first (events carry whole seconds)
    resumed = [e["message"] for e in stack.events(name) if e["reason"] == "WorkersCreated"][-1]
    assert f"resuming from step {kept}" in resumed, resumed


def test_a_job_created_again_under_a_deleted_jobs_name_starts_fresh_unless_it_adopts_the_old_checkpoints(
        stack: LocalStack) -> None:
    """Issue 30 #6: the checkpoints live under <path>/<namespace>/<name>, so a new job of a deleted job's name
    found them and, the old job having finished, 'succeeded' at once without training. Now it starts at
    step 0 with the old checkpoints kept aside, or resumes from them when it asks to."""
    name = "again"

    def run(job: dict) -> dict:
        stack.apply(job)
        try:
            done = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(dump_debug(stack, name)) from None
        assert done["status"]["phase"] == "Succeeded", dump_debug(stack, name)
        return done

    def delete() -> None:
        stack.kubectl("delete", "tj", name, "--wait=true", timeout_s=120)
        stack.wait_for(lambda: stack.get_job(name) is None and not worker_processes(name), timeout_s=120,
                       what="the job and its workers gone")

    first = run(small_job(name, steps=20))
    assert "previousJob" not in first["status"]
    delete()

    second = run(small_job(name, steps=20))
    prev = second["status"]["previousJob"]
    assert (prev["uid"], prev["steps"], prev["adopted"]) == (first["metadata"]["uid"], [10, 20], False), prev
    cond = next(c for c in second["status"]["conditions"] if c["type"] == "ResumedFromPreviousJob")
    assert (cond["status"], cond["reason"]) == ("False", "PreviousJobKept"), cond
    # the first job's checkpoints are on the volume still, whole, where the condition says
    kept = list((stack.state_dir / "volumes").rglob(f"previous-job-{prev['uid']}"))
    assert kept and sorted(p.name for p in kept[0].glob("step-*")) == ["step-00000010", "step-00000020"], kept
    assert prev["path"].endswith(f"/default/{name}/previous-job-{prev['uid']}")
    # and this one trained from step 0: its own step 10 and 20 beside them, written after them
    root = kept[0].parent
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000010", "step-00000020"]
    written = {step: (root / f"step-000000{step}" / "manifest.json").stat().st_mtime for step in (10, 20)}
    assert written[10] > (kept[0] / "step-00000020" / "manifest.json").stat().st_mtime
    delete()

    third = run(small_job(name, steps=30, checkpoint__adoptPreviousJob=True))
    prev = third["status"]["previousJob"]
    assert (prev["uid"], prev["adopted"]) == (second["metadata"]["uid"], True), prev
    cond = next(c for c in third["status"]["conditions"] if c["type"] == "ResumedFromPreviousJob")
    assert (cond["status"], cond["reason"]) == ("True", "PreviousJobAdopted"), cond
    assert third["status"]["step"] == 30 and not list(root.glob(f"previous-job-{second['metadata']['uid']}"))
    # it resumed from the second job's step 20 (left as it was) and wrote step 30
    assert (root / "step-00000020" / "manifest.json").stat().st_mtime == written[20]
    assert (root / "step-00000030" / "manifest.json").exists()


def test_a_configuration_error_fails_the_job_within_one_attempt_quoting_the_trainer(stack: LocalStack) -> None:
    """runPolicy.failurePolicy's default: the trainer exits 2 (the built-in data does not fit the model's vocabulary),
    and the job is Failed at once, the condition saying why in the trainer's words, nothing retried."""
    name = "bad-vocab"
    stack.apply(small_job(name, model={"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32, "vocabSize": 100}}))
    try:
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = job["status"]
    assert status["phase"] == "Failed" and status["restarts"] == 0 and status["membershipEpoch"] == 0, dump_debug(stack, name)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "FailurePolicy", failed
    assert "exited with code 2" in failed["message"] and "model.gpt.vocabSize is 100" in failed["message"], failed
    assert "(FailJob on exit code 2, configuration error)" in failed["message"], failed
    assert not [e for e in stack.events(name) if e["reason"] == "Restarting"]


def test_a_drained_worker_restarts_the_job_without_counting_it(stack: LocalStack) -> None:
    """`kubectl drain` evicts a worker (the Eviction API marks it DisruptionTarget): the job restarts from its
    checkpoint on the other nodes, and the restart is not counted against backoffLimit."""
    name = "drained"
    stack.apply(small_job(name, steps=60, faultInjection={"stepDelayS": 0.05}, runPolicy={"backoffLimit": 0}))
    node = None
    try:
        stack.wait_for(lambda: (_status(stack, name).get("lastCheckpoint") or {}).get("step", 0) >= 10,
                       timeout_s=TIMEOUT_S, what="a first checkpoint")
        node = next(p["spec"]["nodeName"] for p in stack.list_pods(name) if p["metadata"]["name"] == f"{name}-worker-1")
        stack.kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--force", "--timeout=120s",
                      timeout_s=150)
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    finally:
        if node:
            stack.kubectl("uncordon", node)
    status = job["status"]
    # backoffLimit 0: a counted restart would have failed the job
    assert status["phase"] == "Succeeded" and status["step"] == 60, dump_debug(stack, name)
    assert status["restarts"] == 0 and status["ignoredFailures"] >= 1, dump_debug(stack, name)
    restarting = [e["message"] for e in stack.events(name) if e["reason"] == "Restarting"]
    assert restarting and "not counted against backoffLimit" in restarting[0], restarting
    assert "DisruptionTarget=True (EvictionByEvictionAPI" in restarting[0], restarting


def _condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def test_a_gang_that_cannot_fit_binds_no_worker_and_names_the_short_resource(stack: LocalStack) -> None:
    """Gang start: 4 workers of 3 CPUs on 3 nodes of 4 CPUs never fit together, so none is bound (no worker sits
    Running waiting for the others); past scheduleTimeoutSeconds GangScheduled=False says cpu is short. Lowered to
    3 replicas, the gang is released together and the job finishes."""
    name = "gang"
    stack.apply(small_job(name, replicas=4, steps=20, template__resources={"requests": {"cpu": "3", "memory": "256Mi"}},
                          runPolicy={"backoffLimit": 2, "schedulingPolicy": {"scheduleTimeoutSeconds": 5}}))
    try:
        short = stack.wait_for(lambda: (c := _condition(_status(stack, name), "GangScheduled")) and c["status"] == "False"
                               and c, timeout_s=120, what="GangScheduled=False")
        pods = stack.list_pods(name)
        assert len(pods) == 4 and not [p for p in pods if p["spec"].get("nodeName")], dump_debug(stack, name)
        for pod in pods:  # held by the gate, as the API server says (the scheduler has not even tried)
            assert pod["spec"]["schedulingGates"] == [{"name": "loco.dev/gang"}], pod["spec"]
            scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
            assert (scheduled["status"], scheduled["reason"]) == ("False", "SchedulingGated"), scheduled
        assert short["reason"] == "InsufficientCapacity", short
        assert "cpu: 4 workers request 3 each, room for 3" in short["message"], short
        assert stack.wait_for_events(name, "InsufficientCapacity")
        described = stack.kubectl("describe", "tj", name).stdout
        assert "GangScheduled" in described and "InsufficientCapacity" in described, described
        stack.kubectl("patch", "tj", name, "--type=merge", "-p", '{"spec": {"replicas": 3}}')
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = job["status"]
    assert status["phase"] == "Succeeded" and status["step"] == 20 and status["restarts"] == 0, dump_debug(stack, name)
    released = _condition(status, "GangScheduled")
    assert released["status"] == "True" and released["reason"] == "GangReleased", released
    assert "Released 3 workers" in released["message"], released
    assert stack.wait_for_events(name, "GangReleased")


def _nodes_of(stack: LocalStack, name: str) -> list[str]:
    return sorted(p["spec"].get("nodeName") or "" for p in stack.list_pods(name))


def test_placement_packs_or_spreads_the_workers_as_the_scheduler_is_told(stack: LocalStack) -> None:
    """spec.placement reaches the scheduler: pack (required, per node) with a node selector puts all three workers
    on the selected node; spread (one per node) wins over a template affinity that prefers one node."""
    packed, spread = "packed", "spread"
    stack.apply(small_job(packed, replicas=3, steps=20, placement={"pack": {"topologyKey": "kubernetes.io/hostname",
                                                                            "required": True}},
                          template__nodeSelector={"kubernetes.io/hostname": "node-2"}))
    prefer_node_0 = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {
        "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-0"]}]}}]}}
    stack.apply(small_job(spread, replicas=3, steps=20, placement={"spread": {}}, template__affinity=prefer_node_0))
    try:
        for name in (packed, spread):
            stack.wait_for(lambda: all(_nodes_of(stack, name)) and len(_nodes_of(stack, name)) == 3, timeout_s=120,
                           what=f"3 bound workers of {name}")
        assert _nodes_of(stack, packed) == ["node-2"] * 3, dump_debug(stack, packed)
        assert _nodes_of(stack, spread) == ["node-0", "node-1", "node-2"], dump_debug(stack, spread)
        for name in (packed, spread):
            job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
            assert job["status"]["phase"] == "Succeeded", dump_debug(stack, name)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, packed) + "\n" + dump_debug(stack, spread)) from None
