"""The words a plan speaks: event and condition reasons, condition types, event types, and the limits on
what the status keeps."""

from __future__ import annotations

from enum import Enum

from ..spec import Phase


TERMINAL = (Phase.succeeded, Phase.failed)

#: How long a pod's node may be not Ready before the pod counts as lost (the operator's
#: ``--node-lost-grace-seconds``): after the node lifecycle controller's own grace (50 s by default).
NODE_LOST_GRACE_S = 60.0

#: How many status.skippedCheckpoints paths are kept (oldest dropped first).
MAX_SKIPPED_RECORDS = 20

#: How many status.faults entries are kept (oldest dropped first).
MAX_FAULT_RECORDS = 20

class Reason(str, Enum):
    """Event and condition reasons (CamelCase, as Kubernetes expects)."""

    workers_created = "WorkersCreated"
    running = "Running"
    checkpoint_committed = "CheckpointCommitted"
    checkpoint_failed = "CheckpointFailed"
    checkpoint_skipped = "CheckpointSkipped"
    worker_failed = "WorkerFailed"
    restarting = "Restarting"
    resizing = "Resizing"
    succeeded = "Succeeded"
    backoff_limit_exceeded = "BackoffLimitExceeded"
    deadline_exceeded = "DeadlineExceeded"
    invalid_spec = "InvalidSpec"
    suspended = "Suspended"
    resumed = "Resumed"
    checkpoint_before_stop = "CheckpointBeforeStop"
    initialized_from = "InitializedFrom"
    init_source_not_found = "InitSourceNotFound"
    init_source_not_ready = "InitSourceNotReady"
    init_source_unusable = "InitSourceUnusable"
    checkpoint_before_stop_timed_out = "CheckpointBeforeStopTimedOut"
    config_updated = "ConfigUpdated"
    ttl_expired = "TTLExpired"
    cleanup = "CleanPodPolicy"
    stale_epoch = "StaleEpoch"
    fault_detected = "FaultDetected"
    fault_suspected = "FaultSuspected"
    node_cordoned = "NodeCordoned"
    cordon_not_enabled = "CordonNotEnabled"
    waiting_for_capacity = "WaitingForCapacity"
    node_avoidance_expired = "NodeAvoidanceExpired"
    force_deleted = "ForceDeleted"
    pod_refused = "PodRefused"
    previous_job_kept = "PreviousJobKept"
    previous_job_adopted = "PreviousJobAdopted"
    failure_policy = "FailurePolicy"
    local_steps_changed = "LocalStepsChanged"
    gang_released = "GangReleased"
    insufficient_capacity = "InsufficientCapacity"
    scaled_down = "ScaledDown"
    scaled_up = "ScaledUp"
    fewer_workers = "FewerWorkers"
    all_workers = "AllWorkers"
    queued = "Queued"
    admitted = "Admitted"
    evicted = "Evicted"

class ConditionType(str, Enum):
    created = "Created"
    running = "Running"
    restarting = "Restarting"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"
    resumed_from_previous_job = "ResumedFromPreviousJob"
    degraded = "Degraded"
    resized = "Resized"
    checkpointed = "Checkpointed"
    gang_scheduled = "GangScheduled"

class EventType(str, Enum):
    normal = "Normal"
    warning = "Warning"
