"""Decisions about the job's life: an invalid spec, a finished job (cleanup, TTL), suspend and resume, the
deadline, failed workers (restart, live shrink or Failed), a restart itself, success."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from ..spec import CleanPodPolicy, FailureAction, FailureRecord, Phase, RunPolicy, TrainingJobSpec, WorkersStatus
from ..validation import FieldError
from .actions import DeleteJob
from .context import Planner
from .failure_policy import decide
from .membership import live_shrink
from .observe import ObservedPod, parse_time, rfc3339
from .stop import stopped_after_checkpoint
from .vocabulary import ConditionType, EventType, Reason


def invalid(p: Planner, errors: list[FieldError]) -> None:
    message = "invalid spec: " + "; ".join(str(e) for e in errors)
    p.status.workers = WorkersStatus(desired=0, ready=0)
    p.fail(Reason.invalid_spec, message, CleanPodPolicy.all)

def finished(p: Planner, spec: TrainingJobSpec | None) -> None:
    """Succeeded or Failed: keep cleaning up per policy, and delete the job once its TTL passed."""
    policy = spec.run_policy.clean_pod_policy if spec else CleanPodPolicy.all
    p.cleanup(policy)
    ttl = spec.run_policy.ttl_seconds_after_finished if spec else None
    done = parse_time(p.status.completion_time)
    if ttl is not None and done is not None:
        due = done + timedelta(seconds=ttl)
        if p.now >= due:
            p.actions.append(DeleteJob(f"{Reason.ttl_expired.value}: finished {ttl}s ago"))
        else:
            p.requeue_after_s = (due - p.now).total_seconds()
    if p.status.workers:
        ready = sum(1 for pod in p.observed.pods if pod.live and pod.phase == "Running" and pod.epoch == p.status.membership_epoch)
        p.status.workers = WorkersStatus(desired=p.status.workers.desired, ready=ready)

def failure_message(pod: ObservedPod, phase: Phase | None) -> str:
    node = f" on node {pod.node_name}" if pod.node_name else ""
    if pod.deleting:
        return f"{pod.name} was deleted while {pod.phase}{node} ({pod.disruption or 'evicted or preempted?'})"
    if pod.phase == "Failed":
        code = f"exited with code {pod.exit_code}" if pod.exit_code is not None else "failed"
        detail = pod.termination_report.message if pod.termination_report and pod.termination_report.message else ""
        detail = detail or (pod.termination_reason or "")
        return f"{pod.name} {code}{node}" + (f": {detail}" if detail else "")
    return f"{pod.name} disappeared while the job was {phase.value if phase else 'starting'}"

def restart(
    p: Planner, spec: TrainingJobSpec, failures: list[str], resize_from: int | None = None, cause: str | None = None,
    size: int | None = None, uncounted: str | None = None,
) -> None:
    """Start a new membership epoch of ``size`` workers (default ``spec.replicas``): delete every
    worker; they are recreated once all are gone. ``resize_from``: the worker count changes (a
    ``Resizing`` event ``Resized 3→2 (cause)``; not counted against backoffLimit). ``uncounted``: the failure
    policy rule that says this restart does not count against backoffLimit either."""
    st = p.status
    size = spec.replicas if size is None else size
    for message in failures:
        p.event(EventType.warning, Reason.worker_failed, message)
    ckpt = st.last_checkpoint
    origin = f"step {ckpt.step}" if ckpt else "scratch (no checkpoint yet)"
    if resize_from is not None:
        reason = Reason.resizing
        message = f"Resized {resize_from}→{size} ({cause or 'spec.replicas changed'}), resuming from {origin}"
        p.resized(resize_from, size, message)
    elif uncounted is not None:
        reason = Reason.restarting
        message = f"Restarting from {origin} (not counted against backoffLimit: {uncounted})"
        if failures:
            message += f": {failures[0]}"
    else:
        st.restarts += 1
        reason = Reason.restarting
        message = f"Restarting from {origin} (restart {st.restarts}/{spec.run_policy.backoff_limit})"
        if failures or cause:
            message += f": {failures[0] if failures else cause}"
    st.membership_epoch += 1
    st.phase = Phase.restarting
    st.message = message
    p.condition(ConditionType.restarting, True, reason, message)
    p.condition(ConditionType.running, False, reason, message)
    p.event(EventType.warning if resize_from is None else EventType.normal, reason, message)
    p.delete_pods(p.observed.pods, f"{reason.value}: epoch {st.membership_epoch}")
    st.workers = WorkersStatus(desired=size, ready=0)


def suspend(p: Planner, spec: TrainingJobSpec) -> None:
    """``runPolicy.suspend``: every worker deleted (once they have saved a checkpoint of where they are, see
    :mod:`.stop`), the status (and with it the resume point) kept."""
    st = p.status
    if st.phase is not Phase.suspended and not stopped_after_checkpoint(p, spec, "runPolicy.suspend"):
        return
    if st.phase is not Phase.suspended:
        st.phase = Phase.suspended
        st.message = "Suspended: workers deleted, status and checkpoint kept"
        p.condition(ConditionType.suspended, True, Reason.suspended, st.message)
        p.condition(ConditionType.running, False, Reason.suspended, st.message)
        p.event(EventType.normal, Reason.suspended, f"Job suspended: deleting {sum(not x.deleting for x in p.observed.pods)} workers")
    p.delete_pods(p.observed.pods, Reason.suspended.value)
    st.workers = WorkersStatus(desired=spec.replicas, ready=0)


def resume(p: Planner) -> None:
    """Unsuspended: a new epoch, Pending, from the last checkpoint (every pod of before is stale now)."""
    st = p.status
    st.membership_epoch += 1
    st.phase = Phase.pending
    st.start_time = None  # activeDeadlineSeconds counts from the resumed start, like a Job
    ckpt = st.last_checkpoint
    st.message = f"Resumed: recreating workers from {'step %d' % ckpt.step if ckpt else 'scratch'}"
    p.condition(ConditionType.suspended, False, Reason.resumed, st.message)
    p.event(EventType.normal, Reason.resumed, st.message)


def deadline_passed(p: Planner, policy: RunPolicy) -> bool:
    """``activeDeadlineSeconds`` since the start passed: the job failed (True). Otherwise reconcile when it falls due."""
    started = parse_time(p.status.start_time)
    if policy.active_deadline_seconds is None or started is None:
        return False
    due = started + timedelta(seconds=policy.active_deadline_seconds)
    if p.now >= due:
        p.fail(Reason.deadline_exceeded,
               f"Job ran longer than activeDeadlineSeconds ({policy.active_deadline_seconds}s)", policy.clean_pod_policy)
        return True
    p.requeue_after_s = (due - p.now).total_seconds()
    return False


def act_on_failures(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], stale: Sequence[ObservedPod],
                    size: int) -> bool:
    """Workers of this epoch that failed, were deleted under it, or vanished: a live shrink when the job can, else
    a restart, or Failed once ``backoffLimit`` is spent. True when there were any."""
    st, policy, epoch = p.status, spec.run_policy, p.status.membership_epoch
    by_rank = {pod.rank: pod for pod in current}
    failed = [pod for pod in sorted(current, key=lambda x: x.rank)
              if pod.phase == "Failed" or (pod.deleting and pod.phase != "Succeeded")]
    if st.phase is Phase.running and not stale:
        failed += [ObservedPod(p.ref.pod_name(r), r, epoch) for r in range(size) if r not in by_rank]
    failures = [failure_message(pod, st.phase) for pod in failed]
    if not failures:
        return False
    st.last_failure = FailureRecord(
        reason=Reason.worker_failed.value, message="; ".join(failures), pods=[pod.name for pod in failed],
        nodes=list(dict.fromkeys(pod.node_name for pod in failed if pod.node_name)), epoch=epoch, time=rfc3339(p.now),
    )
    judged = decide(failed, policy.failure_policy)
    if judged.action is FailureAction.fail_job:
        for message in failures:
            p.event(EventType.warning, Reason.worker_failed, message)
        p.fail(Reason.failure_policy, f"{failure_message(judged.pod, st.phase)} ({judged.rule})", policy.clean_pod_policy)
        st.workers = WorkersStatus(desired=spec.replicas, ready=0)
        return True
    if live_shrink(p, spec, current, failed, size, "; ".join(failures), failures=failures):
        return True
    if judged.action is FailureAction.ignore:
        st.ignored_failures += 1
        restart(p, spec, failures, size=size, uncounted=judged.rule)
    elif st.restarts + 1 > policy.backoff_limit:
        for message in failures:
            p.event(EventType.warning, Reason.worker_failed, message)
        p.fail(Reason.backoff_limit_exceeded,
               f"{failures[0]}; backoffLimit ({policy.backoff_limit}) reached after {st.restarts} restarts",
               policy.clean_pod_policy)
        st.workers = WorkersStatus(desired=spec.replicas, ready=0)
    else:
        restart(p, spec, failures, size=size)
    return True


def succeed(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], size: int) -> bool:
    """Every worker of this epoch exited 0: Succeeded (True), pods cleaned up per policy."""
    by_rank = {pod.rank: pod for pod in current}
    if len(by_rank) != size or not all(pod.phase == "Succeeded" for pod in by_rank.values()):
        return False
    st = p.status
    st.phase = Phase.succeeded
    st.completion_time = rfc3339(p.now)
    st.message = f"All {size} workers finished at step {st.step if st.step is not None else '?'}"
    p.condition(ConditionType.succeeded, True, Reason.succeeded, st.message)
    for cond_type in (ConditionType.running, ConditionType.restarting):
        if any(c.type == cond_type.value and c.status == "True" for c in st.conditions):
            p.condition(cond_type, False, Reason.succeeded, st.message)
    p.event(EventType.normal, Reason.succeeded, st.message)
    p.cleanup(spec.run_policy.clean_pod_policy)
    st.workers = WorkersStatus(desired=size, ready=0)
    return True
