"""What the object should say about training: the workers' reports folded into the status (step, losses,
throughput, the newest committed checkpoint, skipped and failed checkpoints, a previous job's checkpoints
found under this name) and the printer-column summary."""

from __future__ import annotations

import re
from collections.abc import Sequence

from loco_contract.protocol import ProgressReport, WorkerState

from ..spec import CheckpointStatus, Phase, PreviousJobStatus, StepRate, TrainingJobSpec, WorkerLocalSteps
from .context import Planner
from .observe import ObservedPod, parse_time, rfc3339
from .vocabulary import MAX_SKIPPED_RECORDS, ConditionType, EventType, Reason


def fold_progress(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod]) -> None:
    """Fold the progress reports into the status: numbers from the current epoch's workers (the
    final termination message wins over a poll), checkpoints from any worker (never backwards)."""
    st = p.status
    st.total_steps = spec.training.steps
    reports: list[ProgressReport] = []
    for pod in current:
        report = pod.termination_report or p.observed.reports.get(pod.name)
        if report is not None:
            reports.append(report)
    if reports:
        # a worker still loading (a joiner of a live grow, the workers of a restart, state starting) reports
        # step 0 until it has resumed or adopted the running workers' step: the job's step comes from the
        # others, and while every worker is starting it stays where it was (a restart never shows step 0)
        counted = [r for r in reports if r.state != WorkerState.starting]
        if counted:
            st.step = min(r.step for r in counted)
        elif st.step is None:
            st.step = min(r.step for r in reports)
        st.total_steps = max([spec.training.steps, *(r.total_steps for r in reports)])
        by_rank = sorted(reports, key=lambda r: r.replica_index)
        # rounded for display (`kubectl get tj` prints numbers as stored)
        st.loss = next((round(r.loss, 4) for r in by_rank if r.loss is not None), st.loss)
        st.eval_loss = next((round(r.eval_loss, 4) for r in by_rank if r.eval_loss is not None), st.eval_loss)
        rates = [r.tokens_per_second for r in reports if r.tokens_per_second is not None]
        if rates:
            st.tokens_per_second = round(sum(rates), 1)
        _local_steps(p, spec, by_rank)
    candidates = [r.last_checkpoint for r in p.observed.reports.values() if r.last_checkpoint is not None]
    candidates += [pod.termination_report.last_checkpoint for pod in p.observed.pods
                   if pod.termination_report is not None and pod.termination_report.last_checkpoint is not None]
    # the checkpoint a job started from (checkpoint.initFrom) is another job's: the workers report it until they commit
    started_from = st.initialized_from.path if st.initialized_from else None
    candidates = [c for c in candidates if c.path != started_from]
    if candidates:
        best = max(candidates, key=lambda c: c.step)
        if st.last_checkpoint is None or best.step > st.last_checkpoint.step:
            st.last_checkpoint = CheckpointStatus(step=best.step, path=best.path, time=best.time)
            p.event(EventType.normal, Reason.checkpoint_committed, f"Checkpoint committed at step {best.step}: {best.path}")
            p.condition(ConditionType.checkpointed, True, Reason.checkpoint_committed,
                        f"Step {best.step} committed at {best.time or rfc3339(p.now)}: {best.path}")
    # a committed checkpoint that failed verification at resume: the workers took an older one
    for report in p.observed.reports.values():
        for skipped in report.skipped_checkpoints or []:
            if skipped.path not in st.skipped_checkpoints:
                st.skipped_checkpoints = [*st.skipped_checkpoints, skipped.path][-MAX_SKIPPED_RECORDS:]
                p.event(EventType.warning, Reason.checkpoint_skipped,
                        f"Checkpoint {skipped.path} (step {skipped.step}) failed verification and was skipped "
                        f"({skipped.reason}): {skipped.message}")
    _previous_job(p)
    # a failed background save: the workers go on and the previous checkpoint stays the resume point
    errors = [r.checkpoint_error for r in p.observed.reports.values() if r.checkpoint_error]
    newest = max(errors, key=_checkpoint_error_order, default=None)
    if newest is not None and newest != st.last_checkpoint_error:
        st.last_checkpoint_error = newest
        p.event(EventType.warning, Reason.checkpoint_failed,
                f"Checkpoint save failed (training continues; resume point stays "
                f"{'step ' + str(st.last_checkpoint.step) if st.last_checkpoint else 'the start'}): {newest}")

def _local_steps(p: Planner, spec: TrainingJobSpec, reports: Sequence[ProgressReport]) -> None:
    """Each worker's inner steps per round under algorithm.adaptiveSteps, from its reports; an event when the
    trainers' plan gave a worker another count (not when a worker first reports its count)."""
    if not any(r.local_steps is not None for r in reports):
        return
    before = {w.worker: w for w in p.status.local_steps or []}
    now: dict[int, WorkerLocalSteps] = {}
    for r in reports:
        if r.local_steps is None:  # still starting: keep what it said before, if anything
            if r.replica_index in before:
                now[r.replica_index] = before[r.replica_index]
            continue
        seconds = None if r.step_seconds is None else round(r.step_seconds, 4)
        now[r.replica_index] = WorkerLocalSteps(worker=r.replica_index, steps=r.local_steps, step_seconds=seconds)
    sync_every = spec.algorithm.resolved().sync_every
    timed = [w.step_seconds for w in now.values() if w.step_seconds]
    fastest = min(timed) if timed else None
    for worker, entry in sorted(now.items()):
        old = before.get(worker)
        if old is None or old.steps == entry.steps:
            continue
        pace = ""
        if entry.step_seconds and fastest:
            pace = f" ({entry.step_seconds:.3g} s per step, {entry.step_seconds / fastest:.2g}x the fastest worker's)"
        p.event(EventType.normal, Reason.local_steps_changed,
                f"Worker {worker} now takes {entry.steps} of {sync_every} inner steps per round, was {old.steps}{pace}")
    p.status.local_steps = [now[w] for w in sorted(now)]


def _previous_job(p: Planner) -> None:
    """A job created under the name of a deleted one found its checkpoints: say once what was done with them
    (set aside and started fresh, or resumed from: spec.checkpoint.adoptPreviousJob)."""
    st = p.status
    found = [r.previous_job for r in p.observed.reports.values() if r.previous_job is not None]
    found += [pod.termination_report.previous_job for pod in p.observed.pods
              if pod.termination_report is not None and pod.termination_report.previous_job is not None]
    if not found or st.previous_job is not None:
        return
    prev = found[0]
    st.previous_job = PreviousJobStatus(uid=prev.uid, steps=prev.steps, adopted=prev.adopted, path=prev.path)
    steps = ", ".join(map(str, prev.steps))
    if prev.adopted:
        reason, message = Reason.previous_job_adopted, (
            f"Resumed from the checkpoints of an earlier job of this name (uid {prev.uid}, steps {steps}) in {prev.path}, "
            f"as spec.checkpoint.adoptPreviousJob asks")
    else:
        reason, message = Reason.previous_job_kept, (
            f"Started from step 0: the checkpoints of an earlier job of this name (uid {prev.uid}, steps {steps}) are "
            f"kept in {prev.path}; set spec.checkpoint.adoptPreviousJob to resume from them instead")
    p.condition(ConditionType.resumed_from_previous_job, prev.adopted, reason, message, record_false=True)
    p.event(EventType.normal if prev.adopted else EventType.warning, reason, message)

def _checkpoint_error_order(message: str) -> tuple[int, str]:
    """Order of worker checkpoint errors: by the step in ``checkpoint step N failed: ...``, then text."""
    match = re.search(r"checkpoint step (\d+)", message)
    return (int(match.group(1)) if match else -1, message)

#: How long a step-rate sample must be before it counts (shorter ones measure the report cadence, not training).
RATE_WINDOW_S = 30.0
#: No new step for this long: the ETA is unknown until training moves again.
STALLED_AFTER_S = 4 * RATE_WINDOW_S
#: Weight of the newest window in the moving average of the step rate.
RATE_SMOOTHING = 0.5


def summarise(p: Planner, spec: TrainingJobSpec | None) -> None:
    """What `kubectl get tj` and `kubectl describe tj` read at a glance: ready/desired workers, progress as a
    percentage, the ETA at the recent step rate, and whether the job runs with fewer workers than it asked for."""
    st = p.status
    desired = st.workers.desired if st.workers else 0
    st.workers_ready = f"{st.workers.ready if st.workers else 0}/{desired}"
    if st.step is not None and st.total_steps:
        st.progress = f"{min(100, 100 * st.step // st.total_steps)}%"
    _step_rate(p)
    if spec is not None:
        _degraded(p, spec.replicas, desired)


def _step_rate(p: Planner) -> None:
    """Update the moving-average step rate from a sample at least :data:`RATE_WINDOW_S` old, and the ETA from it.
    Only while Running: a restart, a suspension or the end clears the ETA and starts the rate afresh (the step a
    restart resumes from is behind the one the sample took)."""
    st, now = p.status, p.now
    if st.phase is not Phase.running or st.step is None:
        st.eta, st.step_rate = None, None
        return
    sample = st.step_rate
    if sample is None or st.step < sample.step:
        st.step_rate = StepRate(step=st.step, time=rfc3339(now))
    else:
        elapsed = (now - parse_time(sample.time)).total_seconds()
        if elapsed >= RATE_WINDOW_S and st.step > sample.step:
            recent = (st.step - sample.step) / elapsed
            rate = recent if sample.steps_per_second is None else (
                RATE_SMOOTHING * recent + (1 - RATE_SMOOTHING) * sample.steps_per_second)
            st.step_rate = StepRate(steps_per_second=round(rate, 4), step=st.step, time=rfc3339(now))
    rate = st.step_rate.steps_per_second if st.step_rate else None
    if st.step_rate and (now - parse_time(st.step_rate.time)).total_seconds() >= STALLED_AFTER_S:
        rate = None  # no step for minutes: an ETA would be a guess
    left = max(0, (st.total_steps or 0) - st.step)
    st.eta = human_duration(left / rate) if rate and left else ("0s" if rate else None)


def human_duration(seconds: float) -> str:
    """``4m10s``, ``2h5m``, ``3d4h``: the two largest units, as kubectl prints ages."""
    s = max(0, int(round(seconds)))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    return f"{s}s"


def _degraded(p: Planner, replicas: int, size: int) -> None:
    """``Degraded``: a live job running with fewer workers than spec.replicas (an elastic shrink), with how many
    and why; False again once it is back to full size or has finished."""
    st = p.status
    if st.phase in (Phase.running, Phase.restarting) and 0 < size < replicas:
        resized = next((c.message for c in st.conditions if c.type == ConditionType.resized.value), "")
        p.condition(ConditionType.degraded, True, Reason.fewer_workers,
                    f"Running {size} of {replicas} workers" + (f": {resized}" if resized else ""))
    elif st.phase in (Phase.running, Phase.succeeded, Phase.failed, Phase.suspended):
        p.condition(ConditionType.degraded, False, Reason.all_workers,
                    f"Running all {replicas} workers" if st.phase is Phase.running else f"Job {st.phase.value}")
