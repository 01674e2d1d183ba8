"""A checkpoint before the workers are stopped (a suspend, a Kueue eviction or preemption): the training since the
last periodic checkpoint is not thrown away. The operator asks every training worker for a checkpoint
(``POST /checkpoint``; the ranks agree on one step, see ``loco_trainer.train``), keeps the workers running until one
at or past the job's step when it asked has committed, then stops them. Never longer than
``runPolicy.checkpointBeforeStopSeconds``: a worker that cannot save must not hold a preempting job back for long.
A worker that is not training (starting, failed, gone), or nothing trained since the last checkpoint: stop at once."""

from __future__ import annotations

from datetime import timedelta

from loco_contract.protocol import CheckpointRequest, WorkerState

from ..spec import CheckpointBeforeStop, TrainingJobSpec
from .actions import RequestCheckpoint
from .context import Planner, requeue
from .observe import ObservedPod, parse_time, rfc3339
from .vocabulary import EventType, Reason

#: how often the plan looks again while the workers save
POLL_S = 1.0


def stopped_after_checkpoint(p: Planner, spec: TrainingJobSpec, why: str) -> bool:
    """True when the workers may be stopped now (then the request, if any, is cleared from the status). False while
    the workers are saving: the reconcile ends with them still running and looks again within a second."""
    st = p.status
    asked = st.checkpoint_before_stop
    training = _training(p)
    timeout_s = spec.run_policy.checkpoint_before_stop_seconds
    if asked is None:
        done = st.last_checkpoint is not None and st.last_checkpoint.step >= (st.step or 0)
        if not training or timeout_s == 0 or done or not st.step:
            return True
        asked = CheckpointBeforeStop(id=f"e{st.membership_epoch}-s{st.step}", asked_at=rfc3339(p.now),
                                     after_step=st.step, reason=why)
        st.checkpoint_before_stop = asked
        p.event(EventType.normal, Reason.checkpoint_before_stop,
                f"Stopping the workers ({why}): first asking {len(training)} for a checkpoint at step {asked.after_step} "
                f"or later (up to {timeout_s}s)")
    if st.last_checkpoint is not None and st.last_checkpoint.step >= asked.after_step:
        st.checkpoint_before_stop = None
        return True
    since = parse_time(asked.asked_at)
    if not training or since is None or p.now >= since + timedelta(seconds=timeout_s):
        resume = f"step {st.last_checkpoint.step}" if st.last_checkpoint else "the start"
        p.event(EventType.warning, Reason.checkpoint_before_stop_timed_out,
                f"No checkpoint at step {asked.after_step} or later "
                f"{'within %ds' % timeout_s if training else '(a worker stopped training)'}: stopping the workers "
                f"({asked.reason}); the job will resume from {resume}")
        st.checkpoint_before_stop = None
        return True
    body = CheckpointRequest(id=asked.id, reason=asked.reason).model_dump(by_alias=True)
    for pod in training:
        p.actions.append(RequestCheckpoint(pod.name, pod.pod_ip or "", body, token=p.observed.membership_token or ""))
    st.message = f"Stopping ({asked.reason}): the workers are saving a checkpoint first"
    requeue(p, POLL_S)
    return False


def _training(p: Planner) -> list[ObservedPod]:
    """The workers of the current epoch when every one of them reports it is training and has an address to be asked
    at (a save is collective: one worker that failed, vanished or is still starting means no checkpoint can commit);
    otherwise none."""
    epoch = [pod for pod in p.observed.pods if pod.epoch == p.status.membership_epoch and not pod.deleting]
    ready = [pod for pod in epoch
             if pod.live and pod.pod_ip and (report := p.observed.reports.get(pod.name)) is not None
             and report.state is WorkerState.running]
    return ready if ready and len(ready) == len(epoch) else []
