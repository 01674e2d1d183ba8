"""A worker pod the real API refuses for good (Pod Security ``restricted`` here: a hostPath volume) ends the job
Failed at once, with a condition quoting the API, instead of a retry every reconcile forever.

Real control plane only: the embedded server has no admission plugins (docs/local-cluster.md), so the same
job runs there.
"""

from __future__ import annotations

from e2e.conftest import dump_debug
from loco_local.scenario import small_job
from loco_local.stack import LocalStack

CONTROL_PLANES = ("kubernetes",)


def test_a_pod_refused_by_pod_security_fails_the_job_quoting_the_api(stack: LocalStack) -> None:
    name = "hostpath"
    stack.apply(small_job(name, template__volumes=[{"name": "data", "hostPath": {"path": "/tmp"}}],
                          template__volumeMounts=[{"name": "data", "mountPath": "/data"}]))
    try:
        job = stack.wait_for_phase(name, {"Failed", "Succeeded"}, timeout_s=60)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "PodRefused", failed
    assert 'violates PodSecurity "restricted:latest"' in failed["message"], failed
    assert 'restricted volume type "hostPath"' in failed["message"], failed
    assert job["status"]["restarts"] == 0 and not stack.list_pods(name)
    refused = stack.wait_for_events(name, "PodRefused")
    assert len(refused) == 1, refused  # said once, not on every reconcile
