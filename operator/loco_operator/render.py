"""Render a TrainingJob's children: the headless Service, the trainer ConfigMap, the membership Secret, the
NetworkPolicy and the worker pods.

Pure functions from (job identity, validated spec, per-pod values) to Kubernetes manifests (plain
dicts), following the pod contract in docs/contracts.md. Every child carries the job's labels and a
controller owner reference, so Kubernetes garbage-collects it with the job.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loco_contract.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_STATUS_PORT,
    TERMINATION_MESSAGE_PATH,
    TRAINER_COMMAND,
    EnvVar,
    TrainerConfig,
)
from loco_contract.detection import ProbeSettings
from loco_contract.protocol import READY_PATH

from .spec import API_VERSION, KIND, Placement, TrainingJobSpec

LABEL_JOB = "loco.dev/job"
LABEL_RANK = "loco.dev/rank"
LABEL_EPOCH = "loco.dev/epoch"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "loco"
CONTAINER_NAME = "trainer"
CONFIG_VOLUME = "loco-config"
CONFIG_DIR = DEFAULT_CONFIG_PATH.rsplit("/", 1)[0]  # /etc/loco
CONFIG_KEY = DEFAULT_CONFIG_PATH.rsplit("/", 1)[1]  # config.json
# the job's membership token: a Secret the operator makes, mounted read-only into every worker (never in the spec)
MEMBERSHIP_VOLUME = "loco-membership"
MEMBERSHIP_DIR = "/var/run/secrets/loco.dev/membership"
MEMBERSHIP_KEY = "token"
MASTER_PORT = 29500
#: Seconds one collective may take before it fails (LOCO_COLLECTIVE_TIMEOUT_S): torch's default, and
#: the bound for live-resize jobs (override with a template.env entry of the same name).
COLLECTIVE_TIMEOUT_S = 600
LIVE_COLLECTIVE_TIMEOUT_S = 120
RUN_AS_USER = 1000
HOSTNAME_LABEL = "kubernetes.io/hostname"  # what status.avoidNodes is matched against
DEFAULT_COMMAND = list(TRAINER_COMMAND)


@dataclass(frozen=True)
class JobRef:
    """Identity of a TrainingJob: what every child needs to name and own itself."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "JobRef":
        meta = body.get("metadata") or {}
        return cls(name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid") or "")

    @property
    def selector(self) -> str:
        """Label selector of the job's worker pods."""
        return f"{LABEL_JOB}={self.name}"

    @property
    def configmap_name(self) -> str:
        return f"{self.name}-trainer"

    @property
    def membership_secret_name(self) -> str:
        return f"{self.name}-membership"

    @property
    def network_policy_name(self) -> str:
        return f"{self.name}-workers"

    def pod_name(self, rank: int) -> str:
        return f"{self.name}-worker-{rank}"

    def pod_dns(self, rank: int) -> str:
        """Stable DNS name of the worker named for ``rank`` (hostname + subdomain through the headless Service)."""
        return self.pod_dns_by_name(self.pod_name(rank))

    def pod_dns_by_name(self, pod_name: str) -> str:
        """Stable DNS name of the worker pod ``pod_name`` (its hostname is its name). After a live
        resize a pod's name no longer implies its rank, so the rendezvous host is named by pod."""
        return f"{pod_name}.{self.name}.{self.namespace}.svc"

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def job_labels(job: JobRef) -> dict[str, str]:
    return {LABEL_JOB: job.name, LABEL_MANAGED_BY: MANAGED_BY}


def _metadata(job: JobRef, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {**job_labels(job), **(labels or {})},
        "ownerReferences": [job.owner_reference()],
    }


def render_service(job: JobRef) -> dict[str, Any]:
    """Headless Service ``<job>``: gives each worker a stable DNS name, ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, job.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.name},
            "ports": [
                {"name": "status", "port": DEFAULT_STATUS_PORT, "targetPort": DEFAULT_STATUS_PORT, "protocol": "TCP"},
                {"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"},
            ],
        },
    }


def render_membership_secret(job: JobRef, token: str) -> dict[str, Any]:
    """Secret ``<job>-membership``: the token a ``POST /membership`` to the job's workers must carry. Only the
    operator and the job's pods read it; it is garbage-collected with the job."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _metadata(job, job.membership_secret_name), "stringData": {MEMBERSHIP_KEY: token}}


def render_network_policy(job: JobRef, peers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """NetworkPolicy ``<job>-workers``: the workers' ports answer the job's own pods and ``peers`` (the
    operator, which polls ``/status`` and posts ``/membership``; a Prometheus, from the chart's values) only."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _metadata(job, job.network_policy_name),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB: job.name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {LABEL_JOB: job.name}}}]},
                        *([{"from": [dict(peer) for peer in peers]}] if peers else [])],
        },
    }


def trainer_config(job: JobRef, spec: TrainingJobSpec) -> TrainerConfig:
    """The trainer's config: the spec's training sections plus the job's identity."""
    return TrainerConfig(
        job_name=job.name,
        namespace=job.namespace,
        model=spec.model,
        data=spec.data,
        training=spec.training,
        algorithm=spec.algorithm,
        checkpoint=spec.checkpoint,
        fault_injection=spec.fault_injection,
        probes=ProbeSettings.of(spec.detector),
    )


def config_json(job: JobRef, spec: TrainingJobSpec) -> str:
    """The ConfigMap's ``config.json`` text (deterministic: sorted keys)."""
    return json.dumps(trainer_config(job, spec).to_wire(), indent=2, sort_keys=True)


def render_configmap(job: JobRef, spec: TrainingJobSpec) -> dict[str, Any]:
    """ConfigMap ``<job>-trainer`` holding ``config.json``, mounted at /etc/loco in every worker."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, job.configmap_name),
        "data": {CONFIG_KEY: config_json(job, spec)},
    }


def _field_ref(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def worker_env(
    job: JobRef, spec: TrainingJobSpec, rank: int, epoch: int, restarts: int, resume_from: str, num_replicas: int | None = None,
    *, join: bool = False, master_addr: str | None = None, master_port: int | None = None, init_from: str = "",
) -> list[dict[str, Any]]:
    """The container environment: the contract variables (EnvVar), then template.env.

    ``num_replicas``: the worker count of this epoch (default ``spec.replicas``; lower while an
    elastic job is shrunk). ``join``: the pod joins a running membership (a live grow,
    ``LOCO_JOIN=1``). ``master_addr``/``master_port``: the epoch's rendezvous (default: the DNS name
    of ``<job>-worker-0`` and :data:`MASTER_PORT`). ``LOCO_LIVE_RESIZE`` is ``1`` for every pod of a
    job whose resizes keep the survivors running (``spec.live_membership``).

    A template variable with the same name as a contract variable replaces it (the user's explicit
    choice wins); every other template variable is appended in order.
    """
    values: dict[EnvVar, str] = {
        EnvVar.CONFIG: DEFAULT_CONFIG_PATH,
        EnvVar.JOB_NAME: job.name,
        EnvVar.JOB_UID: job.uid,
        EnvVar.NAMESPACE: job.namespace,
        EnvVar.REPLICA_INDEX: str(rank),
        EnvVar.NUM_REPLICAS: str(spec.replicas if num_replicas is None else num_replicas),
        EnvVar.NPROC_PER_WORKER: str(spec.nproc_per_worker),
        EnvVar.EPOCH: str(epoch),
        EnvVar.RESTART_COUNT: str(restarts),
        EnvVar.RESUME_FROM: resume_from,
        EnvVar.INIT_FROM: init_from,
        EnvVar.MASTER_ADDR: master_addr or job.pod_dns(0),
        EnvVar.MASTER_PORT: str(MASTER_PORT if master_port is None else master_port),
        EnvVar.STATUS_PORT: str(DEFAULT_STATUS_PORT),
        EnvVar.LIVE_RESIZE: "1" if spec.live_membership else "0",
        EnvVar.JOIN: "1" if join else "0",
        # a live job's survivor stuck in a collective with a vanished peer recovers within this (docs/elastic.md)
        EnvVar.COLLECTIVE_TIMEOUT_S: str(LIVE_COLLECTIVE_TIMEOUT_S if spec.live_membership else COLLECTIVE_TIMEOUT_S),
        EnvVar.MEMBERSHIP_TOKEN_FILE: f"{MEMBERSHIP_DIR}/{MEMBERSHIP_KEY}",
    }
    env: list[dict[str, Any]] = [{"name": k.value, "value": v} for k, v in values.items()]
    env += [
        {"name": EnvVar.POD_NAME.value, **_field_ref("metadata.name")},
        {"name": EnvVar.POD_IP.value, **_field_ref("status.podIP")},
        {"name": EnvVar.NODE_NAME.value, **_field_ref("spec.nodeName")},
    ]
    index = {item["name"]: i for i, item in enumerate(env)}
    for item in spec.template.env:
        if item.get("name") in index:
            env[index[item["name"]]] = dict(item)
        else:
            env.append(dict(item))
    return env


def avoid_nodes_affinity(affinity: dict[str, Any] | None, avoid_nodes: Sequence[str]) -> dict[str, Any] | None:
    """``affinity`` with a required node anti-affinity against ``avoid_nodes`` merged in.

    Kubernetes ORs the ``nodeSelectorTerms`` of a required node affinity and ANDs the expressions
    inside a term, so the ``kubernetes.io/hostname NotIn avoid_nodes`` expression is added to
    *every* term (one new term when there is none). The input is not modified; with no nodes to
    avoid it is returned as is.
    """
    if not avoid_nodes:
        return affinity
    expression = {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(set(avoid_nodes))}
    out = copy.deepcopy(affinity) if affinity else {}
    node_affinity = out.setdefault("nodeAffinity", {})
    required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [
        {**term, "matchExpressions": [*(term.get("matchExpressions") or []), expression]} for term in terms
    ]
    return out


def placement_affinity(affinity: dict[str, Any] | None, placement: Placement | None, job_name: str
                       ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """``spec.placement`` as the scheduler reads it: ``pack`` adds a pod affinity to the job's own workers (required
    or preferred, on its topology key; the first worker matches itself, as Kubernetes allows), ``spread`` a topology
    spread constraint over them. Returns the affinity (``affinity`` with the term added; not modified) and the
    constraints."""
    if placement is None:
        return affinity, []
    selector = {"matchLabels": {LABEL_JOB: job_name}}
    if placement.spread is not None:
        spread = placement.spread
        return affinity, [{"maxSkew": spread.max_skew, "topologyKey": spread.topology_key,
                           "whenUnsatisfiable": "DoNotSchedule" if spread.required else "ScheduleAnyway",
                           "labelSelector": selector}]
    if placement.pack is None:
        return affinity, []
    out = copy.deepcopy(affinity) if affinity else {}
    pod_affinity = out.setdefault("podAffinity", {})
    term = {"labelSelector": selector, "topologyKey": placement.pack.topology_key}
    if placement.pack.required:
        pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)
    else:
        pod_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
            {"weight": 100, "podAffinityTerm": term})
    return out, []


#: The scheduling gate a gang's workers are created with; the operator removes it from all of them at once.
GANG_GATE = "loco.dev/gang"


def render_pod(
    job: JobRef, spec: TrainingJobSpec, rank: int, epoch: int, restarts: int = 0, resume_from: str = "",
    avoid_nodes: Sequence[str] = (), num_replicas: int | None = None, *, name: str | None = None, join: bool = False,
    master_addr: str | None = None, master_port: int | None = None, gated: bool = False, init_from: str = "",
) -> dict[str, Any]:
    """Worker pod of rank ``rank`` in membership epoch ``epoch``, named ``name`` (default
    ``<job>-worker-<rank>``; a pod keeps its name across live resizes, so a new one takes a free name).

    ``num_replicas``: the epoch's worker count (``LOCO_NUM_REPLICAS``; default ``spec.replicas``).
    ``join``, ``master_addr``, ``master_port``: see :func:`worker_env` (a live grow's joiners).

    ``resume_from`` is the last committed checkpoint known to the operator (``""``: none); it
    reaches the trainer as ``LOCO_RESUME_FROM``. ``init_from``: another job's checkpoint to start from while this
    job has none (``status.initializedFrom``, ``LOCO_INIT_FROM``). Contract labels win over template labels.
    ``avoid_nodes`` (``status.avoidNodes``: nodes blamed for faults) become a required node
    anti-affinity merged into the template's affinity (:func:`avoid_nodes_affinity`).
    ``gated``: created with the scheduling gate :data:`GANG_GATE` (gang start; the operator removes it).
    """
    tpl = spec.template
    name = name or job.pod_name(rank)
    labels = {**tpl.labels, **job_labels(job), LABEL_RANK: str(rank), LABEL_EPOCH: str(epoch)}
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": tpl.image,
        "command": list(tpl.command) if tpl.command else list(DEFAULT_COMMAND),
        "env": worker_env(job, spec, rank, epoch, restarts, resume_from, num_replicas,
                          join=join, master_addr=master_addr, master_port=master_port, init_from=init_from),
        "ports": [
            {"name": "status", "containerPort": DEFAULT_STATUS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"},
        ],
        # Ready = the trainer is taking steps (GET /ready, docs/progress-protocol.md): `kubectl get pods` says
        # which workers train, and the Ready change is a pod event, so the operator reconciles at once
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": "status"}, "periodSeconds": 1,
                           "timeoutSeconds": 1, "failureThreshold": 3},
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": MEMBERSHIP_VOLUME, "mountPath": MEMBERSHIP_DIR, "readOnly": True}, *tpl.volume_mounts],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if tpl.image_pull_policy:
        container["imagePullPolicy"] = tpl.image_pull_policy
    if tpl.resources:
        # a quantity may be written as a number (limits: {nvidia.com/gpu: 1}); the client takes strings only
        container["resources"] = {k: {name: str(q) for name, q in v.items()} for k, v in tpl.resources.items()}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": name,
        "subdomain": job.name,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Pod Security "restricted": a real API server refuses the pod in a namespace that enforces it without these
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": CONFIG_VOLUME, "configMap": {"name": job.configmap_name, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
            {"name": MEMBERSHIP_VOLUME, "secret": {"secretName": job.membership_secret_name, "defaultMode": 0o440,
                                                   "items": [{"key": MEMBERSHIP_KEY, "path": MEMBERSHIP_KEY}]}},
            *tpl.volumes,
        ],
    }
    if gated:
        pod_spec["schedulingGates"] = [{"name": GANG_GATE}]
    if tpl.node_selector:
        pod_spec["nodeSelector"] = dict(tpl.node_selector)
    if tpl.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tpl.tolerations]
    affinity, spread = placement_affinity(dict(tpl.affinity) if tpl.affinity else None, spec.placement, job.name)
    affinity = avoid_nodes_affinity(affinity, avoid_nodes)
    if affinity:
        pod_spec["affinity"] = affinity
    if spread:
        pod_spec["topologySpreadConstraints"] = spread
    if tpl.priority_class_name:
        pod_spec["priorityClassName"] = tpl.priority_class_name
    if tpl.scheduler_name:
        pod_spec["schedulerName"] = tpl.scheduler_name
    metadata = _metadata(job, name)
    metadata["labels"] = labels
    if tpl.annotations:
        metadata["annotations"] = dict(tpl.annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


#: Kueue's API (the Workload the operator creates for a queued job) and the labels users queue a job with.
KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
#: The one pod set of a job's Workload.
WORKERS_POD_SET = "workers"


def workload_name(job: JobRef) -> str:
    return f"{job.name}-loco"


def render_workload(job: JobRef, spec: TrainingJobSpec, queue: str, count: int,
                    priority: tuple[str, int] | None = None) -> dict[str, Any]:
    """The Kueue Workload of a queued job, as Kueue's own job integrations make one: a single pod set of ``count``
    workers whose template carries the workers' requests, node selector, tolerations and affinity (what Kueue
    admits against its quotas and flavors), queued in LocalQueue ``queue``; ``priority``: the
    WorkloadPriorityClass named by the job's priority-class label and its value."""
    pod = render_pod(job, spec, 0, 0, num_replicas=count)
    template_spec = {k: v for k, v in pod["spec"].items() if k not in ("hostname", "schedulingGates")}
    body: dict[str, Any] = {
        "apiVersion": KUEUE_API_VERSION,
        "kind": "Workload",
        "metadata": _metadata(job, workload_name(job)),
        "spec": {
            "queueName": queue,
            "podSets": [{"name": WORKERS_POD_SET, "count": count,
                         "template": {"metadata": {"labels": job_labels(job)}, "spec": template_spec}}],
        },
    }
    if priority is not None:
        body["spec"]["priorityClassRef"] = {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass",
                                            "name": priority[0]}
        body["spec"]["priority"] = priority[1]
    return body
