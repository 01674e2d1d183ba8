"""Which other job's checkpoint a new job starts from (``spec.checkpoint.initFrom``): resolved once, before the first
workers exist, from the source TrainingJob as observed, and kept in ``status.initializedFrom`` (the workers get its
path as ``LOCO_INIT_FROM`` until the job commits a checkpoint of its own). A source that is not there, or that keeps
its checkpoints where this job's workers cannot read them, fails the job; one that has not committed the step yet
(still training) holds the job Pending; one that finished without it fails the job."""

from __future__ import annotations

from ..spec import InitializedFrom, Phase, TrainingJobSpec, WorkersStatus
from .context import Planner, requeue
from .vocabulary import TERMINAL, ConditionType, EventType, Reason

#: how often a job waiting for its source's checkpoint looks again
WAIT_S = 10.0
FIELD = "spec.checkpoint.initFrom"


def hold_for_init_source(p: Planner, spec: TrainingJobSpec) -> bool:
    """Resolve ``spec.checkpoint.initFrom`` for a job that has not started from it yet. True when the reconcile ends
    here (the job failed, or waits for its source)."""
    wanted, st = spec.checkpoint.init_from, p.status
    if wanted is None or st.initialized_from is not None or st.last_checkpoint is not None:
        return False
    source = p.observed.init_source
    name = wanted.job_name
    if source is None or not source.found:
        return _refuse(p, spec, Reason.init_source_not_found,
                       f"{FIELD}: TrainingJob {name} not found in namespace {p.ref.namespace}")
    if source.checkpoint_path.rstrip("/") != spec.checkpoint.path.rstrip("/"):
        return _refuse(p, spec, Reason.init_source_unusable,
                       f"{FIELD}: {name} keeps its checkpoints under {source.checkpoint_path}, this job under "
                       f"{spec.checkpoint.path}: give both the same checkpoint.path (one volume) so that this job's "
                       "workers can read them")
    last = source.last_step
    finished = any(source.phase == phase.value for phase in TERMINAL)
    if last is None or (wanted.step is not None and last < wanted.step):
        has = "no committed checkpoint" if last is None else f"committed up to step {last}"
        if finished:
            return _refuse(p, spec, Reason.init_source_unusable, f"{FIELD}: {name} finished ({source.phase}) and has "
                           f"{has}" + (f", not step {wanted.step}" if wanted.step is not None else ""))
        return _wait(p, spec, f"Waiting for {name} to commit "
                     + (f"step {wanted.step}" if wanted.step is not None else "a checkpoint") + f" ({FIELD}): it has {has}")
    step = last if wanted.step is None else wanted.step
    path = (source.last_path if wanted.step is None and source.last_path
            else f"{source.checkpoint_path.rstrip('/')}/{p.ref.namespace}/{name}/step-{step:08d}")
    st.initialized_from = InitializedFrom(job_name=name, step=step, path=path)
    p.event(EventType.normal, Reason.initialized_from, f"Starting from {name}'s checkpoint at step {step} ({path})")
    return False


def _refuse(p: Planner, spec: TrainingJobSpec, reason: Reason, message: str) -> bool:
    p.fail(reason, message, spec.run_policy.clean_pod_policy)
    return True


def _wait(p: Planner, spec: TrainingJobSpec, message: str) -> bool:
    st = p.status
    if st.message != message:
        p.event(EventType.normal, Reason.init_source_not_ready, message)
    st.phase, st.message = Phase.pending, message
    p.condition(ConditionType.created, False, Reason.init_source_not_ready, message, record_false=True)
    st.workers = WorkersStatus(desired=spec.replicas, ready=0)
    requeue(p, WAIT_S)
    return True
