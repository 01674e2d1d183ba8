"""spec.checkpoint.initFrom on both control planes (issue 26 #1): a job starts from another job's committed
checkpoint at another world size and algorithm and trains on from its step; a source that does not exist fails the
job with a condition naming the field; a job naming itself is refused by the API (the CRD's CEL rule)."""

from __future__ import annotations

import subprocess

import yaml

from e2e.conftest import dump_debug
from loco_local.scenario import small_job
from loco_local.stack import LocalStack

TIMEOUT_S = 420
CONTROL_PLANES = ("embedded", "kubernetes")


def _finish(stack: LocalStack, name: str) -> dict:
    try:
        return stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)["status"]
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None


def test_a_job_starts_from_another_jobs_checkpoint_at_another_size_and_algorithm(stack: LocalStack) -> None:
    stack.apply(small_job("parent", replicas=2, steps=30, algorithm="diloco"))
    parent = _finish(stack, "parent")
    assert parent["phase"] == "Succeeded" and parent["lastCheckpoint"]["step"] == 30, dump_debug(stack, "parent")

    stack.apply(small_job("branch", replicas=3, steps=50, algorithm="ddp", checkpoint__initFrom={"jobName": "parent"}))
    # a source that is not there: the job fails at once, saying which field and why
    stack.apply(small_job("orphan", steps=50, checkpoint__initFrom={"jobName": "nobody"}))
    branch, orphan = _finish(stack, "branch"), _finish(stack, "orphan")
    assert branch["phase"] == "Succeeded" and branch["step"] == 50, dump_debug(stack, "branch")
    assert branch["initializedFrom"] == {"jobName": "parent", "step": 30,
                                         "path": f"/checkpoints/{stack.namespace}/parent/step-00000030"}, branch
    created = [e["message"] for e in stack.events("branch") if e["reason"] == "WorkersCreated"]
    assert created[0] == "Created 3 worker pods for epoch 0, starting from parent's step 30", created
    # it trained on from step 30: every checkpoint it committed is past step 30 (the operator's polls may skip some:
    # only the newest is reported), all in its own directory
    committed = [e["message"] for e in stack.events("branch") if e["reason"] == "CheckpointCommitted"]
    assert committed and all(int(m.split("at step ")[1].split(":")[0]) > 30 and "/branch/step-" in m
                             for m in committed), committed
    assert branch["lastCheckpoint"]["path"] == f"/checkpoints/{stack.namespace}/branch/step-00000050", branch
    assert orphan["phase"] == "Failed" and orphan["restarts"] == 0, dump_debug(stack, "orphan")
    failed = next(c for c in orphan["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InitSourceNotFound" and "spec.checkpoint.initFrom: TrainingJob nobody not found" in \
        failed["message"], failed
    assert not stack.list_pods("orphan")

    selfish = small_job("selfish", checkpoint__initFrom={"jobName": "selfish"})
    refused = _kubectl_apply(stack, selfish)
    assert refused.returncode != 0 and "spec.checkpoint.initFrom.jobName" in refused.stderr \
        and "names this job itself" in refused.stderr, refused.stderr


def _kubectl_apply(stack: LocalStack, doc: dict) -> subprocess.CompletedProcess[str]:
    path = stack.state_dir / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return stack.kubectl("apply", "-n", stack.namespace, "-f", str(path), check=False)
