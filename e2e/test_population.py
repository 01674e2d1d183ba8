"""Population-based training on both control planes (issue 26 #2): examples/population-local.yaml, 4 members over
4 rounds (3 exploit steps), applied from the file as a user would. The members exploit and explore through checkpoint.initFrom, the
lineage in the status matches the member jobs the operator made, an operator killed mid-round resumes it without
duplicating a member, and deleting the Population deletes its members."""

from __future__ import annotations

from typing import Any

from e2e.conftest import REPO, dump_debug
from loco_local.stack import LocalStack

CONTROL_PLANES = ("embedded", "kubernetes")
EXAMPLE = REPO / "examples" / "population-local.yaml"
assert EXAMPLE.name == "population-local.yaml"  # e2e/test_examples_run.py leaves this example to this scenario
NAME = "pbt-local"
TIMEOUT_S = 600


def _population(stack: LocalStack) -> dict[str, Any] | None:
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        return stack.resource("loco.dev/v1alpha1", "Population").get(name=NAME, namespace=stack.namespace).to_dict()
    except NotFoundError:
        return None


def _members(stack: LocalStack) -> dict[str, dict[str, Any]]:
    jobs = stack.resource("loco.dev/v1alpha1", "TrainingJob").get(
        namespace=stack.namespace, label_selector=f"loco.dev/population={NAME}").items
    return {j["metadata"]["name"]: j.to_dict() for j in jobs}


def _debug(stack: LocalStack) -> str:
    pop = _population(stack) or {}
    members = _members(stack)
    running = [n for n, j in members.items() if (j.get("status") or {}).get("phase") != "Succeeded"]
    return (f"population status: {pop.get('status')}\nevents: "
            f"{[(e['reason'], e['message']) for e in stack.events(NAME)]}\nmember jobs: {sorted(members)}\n"
            + "\n".join(dump_debug(stack, n) for n in running[:2]))


def test_a_population_exploits_and_explores(stack: LocalStack) -> None:
    stack.apply_file(EXAMPLE)

    # round 3 has started: kill the operator while its members train (or are still being created)
    try:
        stack.wait_for(lambda: ((_population(stack) or {}).get("status") or {}).get("round", 0) >= 2,
                       timeout_s=TIMEOUT_S, what="round 3 to start")
    except TimeoutError:
        raise AssertionError(_debug(stack)) from None
    before = {n: j["metadata"]["uid"] for n, j in _members(stack).items() if n.endswith("-g2")}
    stack.restart_operator(kill=True)

    def done() -> dict[str, Any] | None:
        pop = _population(stack) or {}
        return pop if (pop.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    try:
        pop = stack.wait_for(done, timeout_s=TIMEOUT_S, what="the Population to finish")
    except TimeoutError:
        raise AssertionError(_debug(stack)) from None
    status = pop["status"]
    assert status["phase"] == "Succeeded", _debug(stack)
    assert status["round"] == 3 and status["rounds"] == 4, status

    # no member was made twice: the round-3 jobs seen before the kill are the same objects
    members = _members(stack)
    assert {n: members[n]["metadata"]["uid"] for n in before} == before
    # the last two rounds' jobs: the older ones were deleted
    assert sorted(members) == sorted(f"{NAME}-m{i}-g{r}" for i in range(4) for r in (2, 3)), sorted(members)
    events = stack.events(NAME)
    assert sum(e["reason"] == "MembersCreated" for e in events) == 1, events

    # the lineage: one exploit per round (the worst quarter of 4), each one a member job started from its parent's
    # checkpoint at the round's end, with the recorded hyper-parameters
    lineage = status["lineage"]
    assert [r["round"] for r in lineage] == [0, 1, 2], lineage
    for record in lineage[1:]:  # round 1's jobs are gone
        job = members[f"{NAME}-m{record['member']}-g{record['round'] + 1}"]
        assert job["spec"]["checkpoint"]["initFrom"] == {"jobName": record["parentJob"], "step": record["step"]}
        assert record["step"] == 20 * (record["round"] + 1) and record["parent"] != record["member"]
        assert record["parentScore"] <= record["score"], record  # a bottom member copies a top one
        assert job["status"]["initializedFrom"]["jobName"] == record["parentJob"], job["status"]
        assert job["spec"]["training"]["lr"] == record["hyperparameters"]["training.lr"]
        assert job["spec"]["algorithm"]["outerLr"] == record["hyperparameters"]["algorithm.outerLr"]
    exploited = [e["message"] for e in events if e["reason"] == "Exploited"]
    assert len(exploited) >= 3 and all("checkpoint at step" in m for m in exploited), exploited
    # every member of the last round trained on from step 60 to 80 and was scored
    for m in status["members"]:
        job = members[m["job"]]
        assert job["status"]["phase"] == "Succeeded" and job["status"]["step"] == 80, job["status"]
        assert m["score"] == job["status"]["evalLoss"]
    assert status["best"]["score"] == min(m["score"] for m in status["members"]) <= status["medianScore"]

    # deleting the Population deletes its members (owner references, the garbage collector) and their pods
    stack.resource("loco.dev/v1alpha1", "Population").delete(name=NAME, namespace=stack.namespace)
    stack.wait_for(lambda: not _members(stack) and not [p for p in stack.list_pods()
                                                        if p["metadata"]["name"].startswith(f"{NAME}-m")],
                   timeout_s=120, what="the member jobs and their pods to go")
