"""The progress protocol: the only channel from the workers to the operator.

Every worker pod serves, on ``LOCO_STATUS_PORT`` (default 8080) of its pod IP:

* ``GET /status``  -> a :class:`ProgressReport` as JSON (this module; ``protocolVersion`` 1);
* ``GET /metrics`` -> Prometheus text format (the same numbers, for scraping).

The operator polls ``/status`` of every worker pod of a job while it runs. When a worker's
trainer exits it writes the same :class:`ProgressReport` JSON (``state`` finished or failed) to
the container's termination message file (``/dev/termination-log``), so the final numbers reach
the operator through the pod status even if no poll caught the last seconds. The document is the
same on both paths; see docs/progress-protocol.md.

Torch-free by contract: the operator imports this module.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from loco_contract.config import Model

PROTOCOL_VERSION = 1
STATUS_PATH = "/status"
METRICS_PATH = "/metrics"
MEMBERSHIP_PATH = "/membership"
#: ``POST`` a :class:`CheckpointRequest`: save before the operator stops the workers (suspend, Kueue eviction)
CHECKPOINT_PATH = "/checkpoint"
#: 200 while the worker trains (state ``running``), 503 otherwise: the worker pod's readinessProbe
READY_PATH = "/ready"


class WorkerState(str, Enum):
    starting = "starting"  # process up, rendezvous / model build / resume in progress
    running = "running"  # training steps are being taken
    finished = "finished"  # all steps done, final checkpoint committed
    failed = "failed"  # the trainer hit an error it could not recover from


class CheckpointRef(Model):
    """A committed checkpoint."""

    step: int = Field(description="Inner step the checkpoint was taken after.")
    path: str = Field(description="Directory of the checkpoint (container path).")
    time: str = Field(description="Commit time, RFC 3339 UTC.")


class SkippedCheckpoint(Model):
    """A committed checkpoint the worker passed over at resume because it failed verification."""

    step: int = Field(description="Step its directory name says.")
    path: str = Field(description="Directory of the checkpoint (container path).")
    reason: str = Field(description="manifest, unsafe_path, missing_file, size, checksum or header (loco_trainer.ucp.SkipReason).")
    message: str = Field("", description="What was wrong (the file, atom and fragment), at most 240 characters.")


#: at most this many skipped checkpoints are reported (the termination message holds 4096 bytes)
MAX_SKIPPED_REPORTED = 4
#: at most this many steps of an earlier job's checkpoints are reported (the newest)
MAX_PREVIOUS_STEPS_REPORTED = 8


class PreviousJobReport(Model):
    """Checkpoints of an earlier job of the same name (another uid) found in this job's directory at start
    (``loco_trainer.ucp.ownership``), and what the trainer did with them."""

    uid: str = Field(description="The earlier job's uid (from the directory's fence).")
    steps: list[int] = Field(default_factory=list, description="Steps of its checkpoints (the newest, at most 8).")
    adopted: bool = Field(description="True: this job resumed from them (checkpoint.adoptPreviousJob); false: set aside, started at step 0.")
    path: str = Field(description="Where they are now (container path).")


class CollectiveSummary(Model):
    """One collective call of the pod leader's Comm (``loco_trainer.comm.Comm.export_records``)."""

    seq: int = Field(description="Call number of the communicator, from 0 (the same on every rank).")
    kind: str = Field(description="all_reduce, reduce_scatter, all_gather, broadcast, send, recv or barrier.")
    nbytes: int = Field(0, description="Payload bytes.")
    enter_s: float = Field(description="Entry time, seconds on the common clock (global rank 0's wall clock).")
    exit_s: float | None = Field(None, description="Exit time on the common clock; null while in flight.")
    peer: int | None = Field(None, description="Other end of a send/recv (group rank), or a broadcast's source.")


class LinkSummary(Model):
    """One transfer time from global rank ``src`` to global rank ``dst``: a probe (``Comm.probe``), a
    completed point-to-point receive, or a stalled connection (``seconds`` null; ``Comm.scan_p2p``)."""

    id: int = Field(description="Sample number on this pod, from 0 (the cursor for the next poll).")
    src: int
    dst: int
    seconds: float | None = Field(description="Transfer time; null for a stalled connection.")
    nbytes: int = 0
    at_s: float = Field(0.0, description="When the transfer started, common clock.")


class ProgressReport(Model):
    """What a worker pod reports about itself (rank 0 of the pod speaks for the pod)."""

    protocol_version: int = PROTOCOL_VERSION
    job_name: str
    namespace: str = "default"
    replica_index: int = Field(description="Pod index among the workers.")
    epoch: int = Field(0, description="Membership epoch the worker runs in.")
    state: WorkerState
    step: int = Field(0, description="Inner steps completed.")
    total_steps: int = Field(0, description="Inner steps to run in all.")
    loss: float | None = Field(None, description="Training loss, smoothed over the last log interval.")
    eval_loss: float | None = Field(None, description="Latest held-out loss.")
    tokens_per_second: float | None = Field(None, description="Tokens/s of this pod over the last log interval.")
    algorithm: str = ""
    bytes_sent: int = Field(0, description="Bytes this pod's ranks sent through collectives so far.")
    local_steps: int | None = Field(
        None, description="Inner steps this worker takes per round under algorithm.adaptiveSteps (null: every worker "
        "takes syncEvery).")
    step_seconds: float | None = Field(
        None, description="This worker's measured seconds per inner step it computes (algorithm.adaptiveSteps sets "
        "localSteps from it).")
    last_checkpoint: CheckpointRef | None = None
    checkpoint_failures: int = Field(0, description="Checkpoint saves of this pod that failed and were not committed.")
    checkpoint_error: str = Field("", description="Why the latest failed checkpoint save failed (empty if none failed).")
    skipped_checkpoints: list[SkippedCheckpoint] | None = Field(
        None, description="Checkpoints newer than the one resumed from that failed verification and were skipped, "
        "newest first (at most MAX_SKIPPED_REPORTED); absent when none was. The operator emits one Warning Event per "
        "checkpoint path.",
    )
    previous_job: PreviousJobReport | None = Field(
        None, description="An earlier job's checkpoints found in the directory at start and what was done with them "
        "(pod 0 only; absent when there were none).")
    message: str = Field("", description="Human-readable detail (the error when state is failed).")
    time: str = Field("", description="When this report was made, RFC 3339 UTC.")
    # Fault detection (docs/fault-detection.md): filled only when /status is asked with
    # ?sinceSeq=S&sinceLink=L, and never in the termination message.
    collectives: list[CollectiveSummary] | None = Field(
        None, description="The pod leader's collective records with seq > sinceSeq (at most 512, oldest first)."
    )
    links: list[LinkSummary] | None = Field(None, description="Probe samples with id > sinceLink (at most 512).")
    clock_error_s: float | None = Field(None, description="Spread of the clock-offset estimate against global rank 0.")


    @model_serializer(mode="wrap")
    def _omit_unset_optional(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave ``skippedCheckpoints``, ``localSteps`` and ``stepSeconds`` out when unset, so readers from before
        those fields (which refuse unknown fields) keep reading every report that does not need them."""
        data = handler(self)
        if isinstance(data, dict):
            for name, alias in (("skipped_checkpoints", "skippedCheckpoints"), ("local_steps", "localSteps"),
                                ("step_seconds", "stepSeconds")):
                if getattr(self, name) is None:
                    data.pop(alias, None)
                    data.pop(name, None)
        return data


class MembershipUpdate(Model):
    """``POST /membership``: the operator tells a running worker its place in a new membership epoch
    (a live resize, docs/elastic.md "Live resizing"). The worker switches at its next outer-step
    boundary (or at once when it lost a peer and is waiting): it leaves the old process group and
    joins the new one as ``rank`` of ``worldSize``, whose rank 0 hosts the rendezvous store on
    ``masterAddr:masterPort``. The endpoint answers 202 when the update is newer than what the
    worker holds, 200 when it holds it already, 400 naming the bad field."""

    epoch: int = Field(ge=0, description="The new membership epoch (status.membershipEpoch).")
    rank: int = Field(ge=0, description="This pod's rank in the new epoch.")
    world_size: int = Field(ge=1, description="Workers (pods) in the new epoch.")
    master_addr: str = Field(min_length=1, description="DNS name or IP of the new epoch's rank 0 pod.")
    master_port: int = Field(ge=1, le=65535, description="Rendezvous port of the new epoch (epoch_master_port).")


class CheckpointRequest(Model):
    """``POST /checkpoint``: the operator asks a running worker for a checkpoint of where it is now, because it is
    about to stop the job's workers (``runPolicy.suspend``, a Kueue eviction; ``runPolicy.checkpointBeforeStopSeconds``).
    Every rank saves at the same step: at each ``training.logEvery`` boundary the ranks agree whether any of them was
    asked. The endpoint answers 202 for a new ``id``, 200 for one it holds or took already (the operator sends it
    again on every reconcile until the checkpoint commits), 400 naming the bad field. Needs the membership token."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$",
                    description="Names the request: the same id asked again is one save.")
    reason: str = Field("", max_length=256, description="Why, for the worker's log (e.g. 'runPolicy.suspend').")


def epoch_master_port(base_port: int, epoch: int) -> int:
    """The rendezvous port of a live membership epoch: a new store per epoch, on a port no earlier
    epoch of the last 1,000 used (the old rank 0 may still hold the previous one)."""
    return base_port + 1 + epoch % 1000
