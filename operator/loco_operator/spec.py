"""The TrainingJob API (``loco.dev/v1alpha1``): the single source of truth.

``crds/trainingjob.yaml`` is generated from these models (``make crds``); a test fails when the
file and the models drift. The training sections (model, data, training, algorithm, checkpoint)
are the trainer's own config models, so the API and the trainer cannot disagree.

Every field carries a description: ``kubectl explain trainingjob.spec`` reads them.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import Field, model_validator

from loco_contract.detection import DetectorConfig
from loco_contract.config import (
    AlgorithmSpec,
    LIVE_MEMBERSHIP_ALGORITHMS,
    CheckpointSpec,
    DataSpec,
    FaultInjection,
    Model,
    ModelSpec,
    TrainingSpec,
)

GROUP = "loco.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingJob"
PLURAL = "trainingjobs"
SINGULAR = "trainingjob"
SHORT_NAMES = ["tj"]

DEFAULT_IMAGE = "ghcr.io/loco-dev/loco-trainer:0.1.0"


class ElasticSpec(Model):
    """Bounds for elastic resizing (docs/elastic.md): the job shrinks when a worker's replacement cannot be
    placed, waits below minReplicas, and grows back towards ``replicas`` when capacity returns."""

    min_replicas: int | None = Field(None, ge=1, description="Fewest workers the job keeps running with (default: replicas).")
    max_replicas: int | None = Field(None, ge=1, description="Most workers the job may grow to (default: replicas).")
    scale_up_delay_seconds: int = Field(
        30, ge=0, description="Wait this long after capacity returns before growing (avoids flapping)."
    )
    placement_timeout_seconds: int = Field(
        15, ge=0, description="A worker pod left Unschedulable this long is dropped: the job shrinks (down to minReplicas)."
    )
    live_resize: bool = Field(
        True,
        description="Resize without restarting the surviving workers where the algorithm allows (DiLoCo, Streaming "
        "DiLoCo, NoLoCo, CO2; one process per pod): they continue at their next outer step and joining workers adopt the global "
        "state from them. false, or any other algorithm: every resize is a coordinated restart from the last checkpoint.",
    )


def core_type(name: str, *, many: bool = False) -> dict[str, Any]:
    """Marks a field as Kubernetes core type ``name`` (a list of them with ``many``): the CRD gets that
    type's schema (:mod:`loco_operator.kubetypes`), so the API refuses what Pod validation would."""
    marker = {KUBERNETES_TYPE: name}
    return {"items": marker} if many else marker


#: The key of :func:`core_type`'s marker in a field's JSON schema (replaced when the CRD is built).
KUBERNETES_TYPE = "x-loco-kubernetes-type"


class TemplateSpec(Model):
    """Merged into every worker pod."""

    image: str = Field(DEFAULT_IMAGE, description="Trainer container image (recorded, not pulled, in the embedded cluster).")
    image_pull_policy: str | None = Field(None, description="Always | IfNotPresent | Never.")
    resources: dict[str, dict[str, int | str]] = Field(
        default_factory=dict,
        description="Container resources (a Kubernetes ResourceRequirements): {requests: {...}, limits: {...}}; e.g. limits: {nvidia.com/gpu: 1}.",
        json_schema_extra=core_type("ResourceRequirements"),
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra container environment variables (Kubernetes EnvVar objects).",
        json_schema_extra=core_type("EnvVar", many=True),
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations (Kubernetes Toleration objects).",
        json_schema_extra=core_type("Toleration", many=True),
    )
    affinity: dict[str, Any] | None = Field(
        None, description="Pod affinity (a Kubernetes Affinity: node/pod affinity and anti-affinity).",
        json_schema_extra=core_type("Affinity"),
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the worker pods.")
    scheduler_name: str | None = Field(None, description="Scheduler of the worker pods (e.g. a gang scheduler).")
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra pod volumes (Kubernetes Volume objects, e.g. the checkpoint PVC).",
        json_schema_extra=core_type("Volume", many=True),
    )
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra container volumeMounts (Kubernetes VolumeMount objects, e.g. the checkpoint PVC at checkpoint.path).",
        json_schema_extra=core_type("VolumeMount", many=True),
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on the worker pods.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on the worker pods.")
    command: list[str] | None = Field(
        None, description="Override of the container command (default: the trainer image's own command, which reads /etc/loco/config.json)."
    )


class CleanPodPolicy(str, Enum):
    """Which pods are deleted when the job finishes."""

    all = "All"
    running = "Running"
    none = "None"


class FailureAction(str, Enum):
    """What a failed worker does to the job (as the Job API's podFailurePolicy)."""

    fail_job = "FailJob"
    ignore = "Ignore"
    count = "Count"


class ExitCodeOperator(str, Enum):
    in_ = "In"
    not_in = "NotIn"


class OnExitCodes(Model):
    """Matches a failed worker by its trainer container's exit code."""

    operator: ExitCodeOperator = Field(description="In: the code is one of values; NotIn: it is none of them.")
    values: list[Annotated[int, Field(ge=1, le=255)]] = Field(
        min_length=1, max_length=255,
        description="Exit codes, 1-255 (the trainer's: 2 configuration error, 65 data error, 76 peer lost, 80 non-finite "
        "loss, 81 out of memory, 1 anything else; 128+N: killed by signal N).",
        json_schema_extra={"x-kubernetes-list-type": "set"})

    @model_validator(mode="after")
    def _unique(self) -> "OnExitCodes":
        if len(set(self.values)) != len(self.values):
            raise ValueError("values must not repeat an exit code")
        return self


class OnPodCondition(Model):
    """Matches a failed worker by a condition of its pod (e.g. DisruptionTarget: evicted, preempted, drained)."""

    type: str = Field(min_length=1, max_length=316, description="Pod condition type, e.g. DisruptionTarget.")
    status: str = Field("True", pattern="^(True|False|Unknown)$", description="True | False | Unknown.")


class FailureRule(Model):
    """One rule of the failure policy: a matcher (exit codes or pod conditions, exactly one) and an action."""

    action: FailureAction = Field(
        description="FailJob: the job fails at once, quoting the worker; Ignore: restart without counting against "
        "backoffLimit; Count: restart and count (the default for a failure no rule matches).")
    on_exit_codes: OnExitCodes | None = Field(None, description="Match by the trainer's exit code.")
    on_pod_conditions: list[OnPodCondition] = Field(
        default_factory=list, max_length=20, description="Match when the pod has any of these conditions.")

    @model_validator(mode="after")
    def _one_matcher(self) -> "FailureRule":
        if (self.on_exit_codes is None) == (not self.on_pod_conditions):
            raise ValueError("set exactly one of onExitCodes and onPodConditions")
        return self


class FailurePolicy(Model):
    """Rules applied in order to each failed worker; the first that matches decides (none: Count)."""

    rules: list[FailureRule] = Field(max_length=20, description="At most 20 rules, first match wins.")


class SchedulingPolicy(Model):
    """How the workers of an epoch start: together or one by one."""

    gang: bool = Field(
        True, description="Gang start: every worker of an epoch is created with the scheduling gate loco.dev/gang, "
        "released only when all of them exist and the cluster has room for all; until then none is bound, so no "
        "accelerator idles under a half-started job. Elastic jobs (spec.elastic) start with what fits instead.")
    schedule_timeout_seconds: int = Field(
        300, ge=1, le=86_400, description="How long a gang may wait for room before the GangScheduled condition turns "
        "False naming the resource that is short (it keeps waiting).")


#: A Kubernetes label key (a qualified name, optionally prefixed by a DNS subdomain): what a topologyKey must be.
LABEL_KEY_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                     r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


class PackPlacement(Model):
    """Workers close together: every worker goes where the job's other workers are, by a node label."""

    topology_key: str = Field(
        "topology.kubernetes.io/zone", max_length=316, pattern=LABEL_KEY_PATTERN,
        description="The node label whose value the workers share (a zone, a rack, a fabric block; "
        "kubernetes.io/hostname: one node).")
    required: bool = Field(
        False, description="True: a worker that cannot join the others' domain waits (required pod affinity); "
        "False: it prefers to (preferred pod affinity, weight 100).")


class SpreadPlacement(Model):
    """Workers apart: at most maxSkew more workers in one domain than in another (topologySpreadConstraints)."""

    topology_key: str = Field(
        "kubernetes.io/hostname", max_length=316, pattern=LABEL_KEY_PATTERN,
        description="The node label that defines the domains (kubernetes.io/hostname: one worker per node while "
        "nodes last).")
    max_skew: int = Field(1, ge=1, le=100, description="The largest allowed difference of worker counts between domains.")
    required: bool = Field(
        True, description="True: a worker that would break maxSkew waits (whenUnsatisfiable: DoNotSchedule); "
        "False: the scheduler only prefers to spread (ScheduleAnyway).")


class Placement(Model):
    """Where the workers go relative to each other: pack or spread (one of them). The worker is the job's only role:
    its node selector and tolerations are template.nodeSelector and template.tolerations."""

    pack: PackPlacement | None = Field(None, description="Keep the workers in one topology domain.")
    spread: SpreadPlacement | None = Field(None, description="Spread the workers over topology domains.")

    @model_validator(mode="after")
    def _one_way(self) -> "Placement":
        if self.pack is not None and self.spread is not None:
            raise ValueError("set pack or spread, not both")
        return self


class RunPolicy(Model):
    """Restarts, deadlines and clean-up."""

    backoff_limit: int = Field(
        3, ge=0, le=10_000, description="Restarts from the last checkpoint before the job is Failed (at most 10000)."
    )
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job when it has run longer than this.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the TrainingJob this long after it Succeeded or Failed (None: keep)."
    )
    clean_pod_policy: CleanPodPolicy = Field(
        CleanPodPolicy.running,
        description="Which pods to delete when the job finishes: All, Running (still running ones), None.",
    )
    suspend: bool = Field(False, description="Suspend the job: delete its pods, keep its checkpoint; unsuspend resumes.")
    checkpoint_before_stop_seconds: int = Field(
        60, ge=0, le=3600,
        description="On a suspend or a Kueue eviction, how long the running workers get to commit a checkpoint of where "
        "they are before they are stopped (the job resumes from it). 0: stop at once, resume from the last periodic "
        "checkpoint.")
    scheduling_policy: SchedulingPolicy = Field(default_factory=SchedulingPolicy, description="Gang start.")
    failure_policy: FailurePolicy | None = Field(
        None, description="How a failed worker counts, by its exit code or its pod's conditions. Unset: a configuration "
        "error (exit code 2) fails the job at once; a disruption (DisruptionTarget: eviction, preemption, drain) "
        "restarts without counting; anything else counts against backoffLimit. Set, the rules replace those defaults.")


class TrainingJobSpec(Model):
    """Desired state of a TrainingJob."""

    replicas: int = Field(2, ge=1, le=10_000, description="Worker pods (data-parallel replicas).")
    nproc_per_worker: int = Field(1, ge=1, le=64, description="Trainer processes per pod (one per GPU).")
    elastic: ElasticSpec | None = Field(None, description="Elastic bounds; requires minReplicas <= replicas <= maxReplicas.")
    template: TemplateSpec = Field(default_factory=TemplateSpec, description="Pod template merged into every worker pod.")
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec, description="Distributed algorithm (see docs/algorithms.md).")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model to train.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Inner training loop.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint location and cadence.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, clean-up and suspension.")
    placement: Placement | None = Field(
        None, description="Pack the workers into one topology domain or spread them over many (the scheduler honours it).")
    fault_injection: FaultInjection | None = Field(None, description="Faults injected into the trainer, for tests and demos only.")
    fault_detection: DetectorConfig | None = Field(
        None,
        description="C4-style fault detection thresholds (hangs, stragglers, slow links/nodes); defaults when omitted. See docs/fault-detection.md.",
    )

    @property
    def detector(self) -> DetectorConfig:
        """The fault detector's thresholds: ``faultDetection``, or the defaults when it is omitted."""
        return self.fault_detection or DetectorConfig()

    @property
    def live_membership(self) -> bool:
        """Whether resizes of this job keep the survivors running (docs/elastic.md "Live resizing"):
        elastic with ``elastic.liveResize``, an algorithm of ``LIVE_MEMBERSHIP_ALGORITHMS``, one process per pod."""
        return (self.elastic is not None and self.elastic.live_resize and self.nproc_per_worker == 1
                and self.algorithm.name in LIVE_MEMBERSHIP_ALGORITHMS)

    @model_validator(mode="after")
    def _cross_field(self) -> "TrainingJobSpec":
        if self.elastic is not None:
            lo = self.elastic.min_replicas if self.elastic.min_replicas is not None else self.replicas
            hi = self.elastic.max_replicas if self.elastic.max_replicas is not None else self.replicas
            if lo > hi:
                raise ValueError(f"elastic.minReplicas ({lo}) must be <= elastic.maxReplicas ({hi})")
            if not lo <= self.replicas <= hi:
                raise ValueError(
                    f"replicas ({self.replicas}) must lie within elastic.minReplicas..maxReplicas ({lo}..{hi}); "
                    f"change replicas or the elastic bounds"
                )
        if self.model.name == "gpt" and self.training.seq_len > self.model.gpt.block_size:
            raise ValueError(
                f"training.seqLen ({self.training.seq_len}) exceeds model.gpt.blockSize ({self.model.gpt.block_size}); "
                f"lower seqLen or raise blockSize"
            )
        return self


# ------------------------------------------------------------------------------------- status


class Phase(str, Enum):
    """Lifecycle phase of a TrainingJob."""

    pending = "Pending"
    running = "Running"
    restarting = "Restarting"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


class Condition(Model):
    """A Kubernetes-style condition."""

    type: str = Field(description=(
        "Created | Running | Restarting | Succeeded | Failed | Suspended (Kubeflow's names) | Checkpointed (the last "
        "commit: step, time, path) | Resized (the last change of the worker count: from -> to and why; ScaledUp or "
        "ScaledDown) | Degraded (True while running with fewer workers than spec.replicas, with how many) | "
        "ResumedFromPreviousJob."))
    status: str = Field(description="True | False | Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="RFC 3339 time of the last status change.")
    last_update_time: str | None = Field(
        None, description="RFC 3339 time the reason or message last changed (a new checkpoint, another resize).")


class WorkersStatus(Model):
    """Worker pod counts of the current membership epoch."""

    desired: int = Field(0, description="Worker pods wanted in this epoch.")
    ready: int = Field(0, description="Worker pods running and reporting progress.")


class CheckpointStatus(Model):
    step: int = Field(description="Inner step of the last committed checkpoint.")
    path: str = Field(description="Its directory.")
    time: str | None = Field(None, description="Its commit time.")


class PreviousJobStatus(Model):
    """An earlier job of the same name whose checkpoints this job's workers found (the trainer's checkpoint ownership check)."""

    uid: str = Field(description="The earlier job's uid.")
    steps: list[int] = Field(default_factory=list, description="Steps of its checkpoints (the newest, at most 8).")
    adopted: bool = Field(description="True: resumed from them (spec.checkpoint.adoptPreviousJob); false: kept aside, started at step 0.")
    path: str = Field(description="Where they are (container path).")


class FaultRecord(Model):
    """A fault the detector found and the operator acted on (docs/fault-detection.md)."""

    kind: str = Field(description="hang-noncomm | hang-comm | slow-noncomm | slow-comm-link | slow-comm-node.")
    ranks: list[int] = Field(default_factory=list, description="Blamed worker ranks (replica indices).")
    pods: list[str] = Field(default_factory=list, description="Their pods (deleted and replaced).")
    nodes: list[str] = Field(default_factory=list, description="Their nodes (added to avoidNodes).")
    epoch: int = Field(0, description="Membership epoch the fault was found in.")
    seq: int | None = Field(None, description="Collective the verdict was reached at.")
    message: str = Field("", description="The detector's one-sentence explanation.")
    evidence: dict[str, Any] = Field(default_factory=dict, description="Plain numbers behind the verdict (medians, thresholds, counts).")
    cordoned: bool = Field(False, description="Whether the node was cordoned (faultDetection.cordonNodes, under an operator run with --cordon-nodes).")
    time: str = Field(description="When the operator acted, RFC 3339 UTC.")


class FailureRecord(Model):
    """The newest worker failure or detected fault that restarted the job (docs/elastic.md): a
    resize because its replacement cannot be placed names it."""

    reason: str = Field(description="WorkerFailed (a worker failed, was evicted or vanished) | FaultDetected (the fault detector blamed it).")
    message: str = Field(description="What happened, as the event said it, e.g. 'job-worker-2 exited with code 137 on node n7: NodeLost'.")
    pods: list[str] = Field(default_factory=list, description="The failed or blamed pods.")
    nodes: list[str] = Field(default_factory=list, description="Their nodes, where known.")
    epoch: int = Field(0, description="Membership epoch the failure happened in (the restart started the next one).")
    time: str = Field(description="When the operator saw it, RFC 3339 UTC.")


class StepRate(Model):
    """The recent step rate the ETA comes from: a moving average, and the sample the next one is measured from."""

    steps_per_second: float | None = Field(None, description="Inner steps per second, recently (a moving average over ~30 s windows).")
    step: int = Field(0, description="status.step when the sample was taken.")
    time: str = Field(description="When the sample was taken, RFC 3339 UTC.")


class InitializedFrom(Model):
    """The other job's checkpoint this job started from (spec.checkpoint.initFrom), as the operator resolved it."""

    job_name: str = Field(description="The source TrainingJob.")
    step: int = Field(description="The step of its checkpoint.")
    path: str = Field(description="The checkpoint's directory (container path), handed to the workers as LOCO_INIT_FROM.")


class CheckpointBeforeStop(Model):
    """A checkpoint the operator asked the workers for because it is about to stop them."""

    id: str = Field(description="The request's id (sent to every worker in POST /checkpoint).")
    asked_at: str = Field(description="When the workers were asked, RFC 3339.")
    after_step: int = Field(description="status.step when asked: a checkpoint at this step or later is the one.")
    reason: str = Field(description="Why the workers stop: runPolicy.suspend, or the Kueue eviction.")


class WorkerLocalSteps(Model):
    """One worker's share of each round under spec.algorithm.adaptiveSteps, as it last reported it."""

    worker: int = Field(description="Replica index of the worker.")
    steps: int = Field(description="Inner steps it takes per round (syncEvery for the fastest workers).")
    step_seconds: float | None = Field(None, description="Its measured seconds per inner step the plan was made from.")


class TrainingJobStatus(Model):
    """Observed state, kept in the object so a restarted operator carries on."""

    phase: Phase | None = Field(None, description="Pending | Running | Restarting | Succeeded | Failed | Suspended.")
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    workers: WorkersStatus | None = Field(None, description="Desired and ready worker pods.")
    step: int | None = Field(None, description="Inner steps completed (slowest reporting worker).")
    total_steps: int | None = Field(None, description="Inner steps to run in all.")
    loss: float | None = Field(None, description="Latest training loss (worker 0).")
    eval_loss: float | None = Field(None, description="Latest held-out loss (worker 0).")
    tokens_per_second: float | None = Field(None, description="Tokens/s summed over the workers.")
    progress: str | None = Field(None, description="status.step of the total as a percentage, e.g. '45%' (the Progress printer column).")
    eta: str | None = Field(
        None, description="Time left at the recent step rate while Running, e.g. '4m10s' (the ETA printer column); unset while it is unknown.")
    step_rate: StepRate | None = Field(None, description="The recent step rate the ETA is computed from.")
    algorithm: str | None = Field(None, description="Algorithm in use.")
    local_steps: list[WorkerLocalSteps] | None = Field(
        None, description="Each worker's inner steps per round under spec.algorithm.adaptiveSteps (a LocalStepsChanged "
        "event says when one changes); unset without adaptiveSteps.")
    last_checkpoint: CheckpointStatus | None = Field(None, description="Last committed checkpoint; every restart resumes from it.")
    initialized_from: InitializedFrom | None = Field(
        None, description="The other job's checkpoint this job started from (spec.checkpoint.initFrom).")
    checkpoint_before_stop: CheckpointBeforeStop | None = Field(
        None, description="The workers were asked for a checkpoint before a suspend or an eviction stops them (cleared "
        "once they are stopped).")
    last_checkpoint_error: str | None = Field(
        None, description="Why the newest failed checkpoint save failed (reported by a worker; a CheckpointFailed Warning event says so)."
    )
    skipped_checkpoints: list[str] = Field(
        default_factory=list, description="Checkpoints a worker passed over at resume because they failed verification "
        "(paths, newest last, the last 20); a CheckpointSkipped Warning event names each once.")
    previous_job: PreviousJobStatus | None = Field(
        None, description="Checkpoints of an earlier job of the same name found in this job's directory at its first "
        "start, and what was done with them (the ResumedFromPreviousJob condition says it in words).")
    restarts: int = Field(0, description="Restarts so far (counted against runPolicy.backoffLimit).")
    ignored_failures: int = Field(
        0, description="Worker failures runPolicy.failurePolicy ignored (a disruption by default): each restarted the job "
        "without counting against backoffLimit.")
    membership_epoch: int = Field(0, description="Bumped on every restart or resize; pods carry it as label loco.dev/epoch.")
    start_time: str | None = Field(None, description="When the first workers were created.")
    completion_time: str | None = Field(None, description="When the job Succeeded or Failed.")
    observed_generation: int | None = Field(None, description="metadata.generation the status reflects.")
    message: str | None = Field(None, description="One-line summary of the current state.")
    # Added for the CRD: the scale subresource reads `selector`, the Workers printer column `workersReady`.
    selector: str | None = Field(None, description="Label selector of the worker pods (the scale subresource reads it).")
    workers_ready: str | None = Field(None, description="Ready/desired workers, e.g. '2/3' (the Workers printer column).")
    faults: list[FaultRecord] = Field(default_factory=list, description="Faults detected and acted on, oldest first (the last 20).")
    avoid_nodes: list[str] = Field(
        default_factory=list, description="Nodes blamed for faults; worker pods get a required node anti-affinity against them."
    )
    target_replicas: int | None = Field(
        None, description="spec.replicas the job is sized for; workers.desired is lower while an elastic job is shrunk."
    )
    last_resize_time: str | None = Field(None, description="When the worker count last changed (scaleUpDelaySeconds counts from it).")
    resizes: int = Field(0, description="Worker-count changes so far (they do not count against backoffLimit).")
    last_failure: FailureRecord | None = Field(
        None, description="The newest worker failure or detected fault that restarted the job (a shrink caused by it names it)."
    )
