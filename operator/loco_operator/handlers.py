"""Thin Kopf handlers: observe, plan, apply, patch status.

All decisions live in :func:`loco_operator.planner.plan`; this module only does I/O:

1. **observe** the job's children with the official ``kubernetes`` client (label selector
   ``loco.dev/job=<name>``, through ``asyncio.to_thread`` so the event loop never blocks) and poll
   every running worker's ``GET http://<podIP>:8080/status`` concurrently with a short timeout
   (aiohttp);
2. **plan** (pure);
3. **patch** ``status`` (the status subresource), when it changed, *before* acting: the status is the
   plan's intent (new epoch, restart and resize counts, fault records). A write that fails acts on
   nothing and raises :class:`kopf.TemporaryError`, so Kopf's retry plans again from the same stored
   status and counts the same restart once; a write that succeeded makes the retry plan from the new
   epoch, where the old epoch's pods are merely stale. (Acting first let a retry re-plan from the old
   status over pods already deleted or relabelled: a live resize was rolled back into the old epoch,
   and every try counted its restart again in the metrics and events.)
4. **apply** the actions idempotently: AlreadyExists on create and NotFound on delete count as
   success; other API errors are counted, the remaining actions still run, and the handler then
   raises :class:`kopf.TemporaryError` so Kopf retries (a live resize's ``POST /membership`` to a
   worker never fails the round: the next reconcile resends it).

Triggers: create/resume/update of a TrainingJob, a timer every :data:`RECONCILE_INTERVAL_S` per
job, and every event of a pod labelled ``loco.dev/job`` (fast reaction to a worker's exit). A
per-job :class:`asyncio.Lock` serialises reconciles of one job; each reconcile re-reads the job so
it always plans from the latest stored status.

Handlers are registered on :data:`registry` (not Kopf's global default registry); shared state
travels in the operator memo as ``memo.loco`` (:class:`OperatorContext`), never in globals.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import kopf
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from loco_contract.config import DEFAULT_STATUS_PORT
from loco_contract.detection import DetectorConfig
from loco_contract.protocol import CHECKPOINT_PATH, MEMBERSHIP_PATH, STATUS_PATH, ProgressReport

from .capacity import free_slots, shortage
from .metrics import OperatorMetrics
from loco_detector.live import LiveDetectors
from .planner import (
    Action, CordonNode, CreateConfigMap, CreateMembershipSecret, CreateNetworkPolicy, CreatePod,
    CreateService, DeleteJob, DeletePod, EmitEvent, ForceDeletePod, NODE_LOST_GRACE_S, Observed, ObservedPod,
    PatchPodLabels, PatchWorkloadStatus, PostMembership, RequestCheckpoint, UngatePods, UpdateConfigMap, CreateWorkload, DeleteWorkload,
    ObservedSource, ObservedWorkload, parse_report, plan, plan_pod_refused,
    refusal_is_permanent
)
from .render import (
    CONFIG_KEY, LABEL_JOB, MEMBERSHIP_KEY, PRIORITY_LABEL, QUEUE_LABEL, JobRef, render_membership_secret, render_pod,
    workload_name
)
from .spec import GROUP, PLURAL, VERSION, TrainingJobSpec

log = logging.getLogger(__name__)

#: How often every TrainingJob is reconciled even without events (progress polling cadence).
RECONCILE_INTERVAL_S = 2.0
#: Timeout of one ``/status`` poll; a worker that does not answer in time is simply not "ready".
POLL_TIMEOUT_S = 1.0
#: Progress storage prefix: Kopf's bookkeeping annotations live under this domain.
ANNOTATION_PREFIX = "loco.dev"

registry = kopf.OperatorRegistry()


@dataclass
class OperatorContext:
    """Everything the handlers share, created by :func:`loco_operator.cli.run_operator` and passed in
    the operator memo (``memo.loco``)."""

    api_client: k8s.ApiClient
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    status_port: int = DEFAULT_STATUS_PORT
    poll_timeout_s: float = POLL_TIMEOUT_S
    #: How long a pod's node may be not Ready before the pod counts as lost (``--node-lost-grace-seconds``).
    node_lost_grace_s: float = NODE_LOST_GRACE_S
    #: The cluster operator lets jobs cordon the nodes their faults blame (``--cordon-nodes``); the chart
    #: grants ``nodes`` ``patch`` only then.
    cordon_nodes: bool = False
    #: Who besides a job's own pods may reach its workers: a NetworkPolicy per job allows them
    #: (``--network-policy``, set by the chart); None makes none.
    network_policy_peers: list[dict[str, Any]] | None = None
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    http: aiohttp.ClientSession | None = None
    #: Per-job live fault detectors (docs/fault-detection.md); rebuilt from scratch after a restart.
    faults: LiveDetectors = field(default_factory=LiveDetectors)

    def lock(self, key: str) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api_client)

    @property
    def custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api_client)

    @property
    def networking(self) -> k8s.NetworkingV1Api:
        return k8s.NetworkingV1Api(self.api_client)


def _ctx(memo: Any) -> OperatorContext:
    return memo["loco"]


# ------------------------------------------------------------------------------------ activities


@kopf.on.startup(registry=registry)
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Kopf settings: Normal-level events posted, bookkeeping under loco.dev annotations."""
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "loco-operator"  # the FROM column of `kubectl describe`
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.watching.server_timeout = 300
    # Let the per-job timer finish its current reconcile on shutdown instead of being orphaned.
    settings.background.instant_exit_timeout = 1.0
    settings.networking.request_timeout = 60
    ctx = _ctx(memo)
    ctx.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ctx.poll_timeout_s))


@kopf.on.cleanup(registry=registry)
async def close(memo: kopf.Memo, **_: Any) -> None:
    ctx = _ctx(memo)
    if ctx.http is not None:
        await ctx.http.close()
        ctx.http = None


def bearer_token(api_key: dict[str, str] | None) -> str | None:
    """The bearer token of a client configuration: the official client files it under ``BearerToken``
    (kubeconfig tokens, recent releases) or ``authorization`` (older ones), each as ``Bearer <token>``."""
    for key in ("BearerToken", "authorization"):
        value = (api_key or {}).get(key) or ""
        if value:
            return value[len("bearer "):] if value.lower().startswith("bearer ") else value
    return None


@kopf.on.login(registry=registry)
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """Kopf talks to the same cluster, with the same credentials, as the handlers' client."""
    cfg: k8s.Configuration = _ctx(memo).api_client.configuration
    token = bearer_token(cfg.api_key)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        token=token,
        username=cfg.username or None,
        password=cfg.password or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


# ------------------------------------------------------------------------------------- triggers


@kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
async def on_change(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await reconcile(_ctx(memo), namespace, name)


def _needs_timer(spec: Any, status: Any, **_: Any) -> bool:
    """Finished jobs need the timer only to honour ttlSecondsAfterFinished."""
    if (status or {}).get("phase") not in ("Succeeded", "Failed"):
        return True
    return ((spec or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished") is not None


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL_S, sharp=False, when=_needs_timer, registry=registry)
async def on_timer(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await reconcile(_ctx(memo), namespace, name)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
async def on_pod_event(
    namespace: str, labels: dict[str, str], memo: kopf.Memo, **_: Any
) -> None:
    """A worker pod changed: reconcile its job now rather than at the next timer tick."""
    try:
        await reconcile(_ctx(memo), namespace, labels[LABEL_JOB])
    except kopf.TemporaryError as exc:  # event handlers are not retried: the timer will be
        log.warning(f"reconcile after pod event failed, retrying on the next tick: {exc}")


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True, registry=registry)
async def on_delete(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Children go with the job (owner references); only forget it in the metrics."""
    ctx = _ctx(memo)
    ctx.metrics.forget_job(f"{namespace}/{name}")
    ctx.locks.pop(f"{namespace}/{name}", None)
    ctx.faults.forget(f"{namespace}/{name}")


# ------------------------------------------------------------------------------------ reconcile


async def reconcile(ctx: OperatorContext, namespace: str, name: str) -> None:
    """One observe-plan-apply-patch round for the TrainingJob ``namespace/name``.

    Raises :class:`kopf.TemporaryError` when an API call failed (after writing what it could).
    """
    key = f"{namespace}/{name}"
    ctx.metrics.reconciles_in_flight.inc()
    try:
        await _reconcile_locked(ctx, namespace, name, key)
    finally:
        ctx.metrics.reconciles_in_flight.dec()


async def _reconcile_locked(ctx: OperatorContext, namespace: str, name: str, key: str) -> None:
    async with ctx.lock(key):
        started = time.monotonic()
        try:
            job = await _call(ctx, "get_job", ctx.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            raise kopf.TemporaryError(f"reading TrainingJob {key}: {exc.reason}", delay=RECONCILE_INTERVAL_S) from exc
        if (job.get("metadata") or {}).get("deletionTimestamp"):
            return
        observed = await observe(ctx, job)
        now = datetime.now(timezone.utc)
        result = plan(job, observed, now, node_lost_grace_s=ctx.node_lost_grace_s, cordon_nodes=ctx.cordon_nodes,
                      network_policy_peers=ctx.network_policy_peers)
        old_status = job.get("status") or {}
        stored, errors = await write_status(ctx, job, old_status, result.status)
        if stored is None:  # nothing was acted on: the retry plans the same from the same status
            if not errors:
                return  # deleted meanwhile
            ctx.metrics.observe_reconcile(job, old_status, old_status)
            raise kopf.TemporaryError("; ".join(errors), delay=RECONCILE_INTERVAL_S)
        refused: list[tuple[str, str, str]] = []
        errors = await apply(ctx, job, result.actions, refused)
        if refused:  # a worker pod the API (or our client) will never accept: fail now, quoting it, not retry forever
            pod, message, by = refused[0]
            result = plan_pod_refused(job, result.status, pod, message, now, by=by)
            written, errors = await write_status(ctx, job, stored, result.status)
            if written is not None:
                stored = written
                errors = await apply(ctx, job, result.actions)
        ctx.metrics.observe_reconcile(
            job, old_status, stored,
            events=[(a.reason, a.message) for a in result.actions if isinstance(a, EmitEvent)], now_s=now.timestamp(),
        )
        ctx.metrics.reconcile_duration.observe(time.monotonic() - started)
        if errors:
            raise kopf.TemporaryError("; ".join(errors), delay=RECONCILE_INTERVAL_S)


async def write_status(ctx: OperatorContext, job: dict[str, Any], old: dict[str, Any],
                       new: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """Patch the job's status from ``old`` to ``new`` (nothing to do when equal). Returns the status now
    stored and no errors, or None and the error (none when the job was deleted meanwhile)."""
    if new == old:
        return new, []
    ref = JobRef.from_body(job)
    try:
        await _call(ctx, "patch_status", ctx.custom.patch_namespaced_custom_object_status,
                    GROUP, VERSION, ref.namespace, PLURAL, ref.name, {"status": _merge_patch(old, new)})
    except ApiException as exc:
        return None, [] if exc.status == 404 else [f"patching status: {exc.status} {exc.reason}"]
    return new, []


def _merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``old`` into ``new`` at the top level (removed keys become null)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


async def _call(ctx: OperatorContext, operation: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking client call in a thread; the result as a plain camelCase dict. Counts failures
    other than NotFound/AlreadyExists (which callers treat as success or absence)."""
    try:
        result = await asyncio.to_thread(fn, *args, **kwargs)
    except ApiException as exc:
        if exc.status not in (404, 409):
            ctx.metrics.api_errors.labels(operation=operation).inc()
        raise
    return ctx.api_client.sanitize_for_serialization(result)


async def _read(ctx: OperatorContext, ref: JobRef, operation: str, fn: Any, *args: Any) -> dict[str, Any] | None:
    """One object the reconcile observes, None when it does not exist; any other API error ends this reconcile
    (Kopf retries it after :data:`RECONCILE_INTERVAL_S`)."""
    try:
        return await _call(ctx, operation, fn, *args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise kopf.TemporaryError(f"{operation} for {ref.namespace}/{ref.name}: {exc.reason}",
                                  delay=RECONCILE_INTERVAL_S) from exc


async def observe(ctx: OperatorContext, job: dict[str, Any]) -> Observed:
    """The job's pods (ours only), Service, ConfigMap and the running workers' progress reports."""
    ref = JobRef.from_body(job)

    async def _get(operation: str, fn: Any, *args: Any) -> dict[str, Any] | None:
        return await _read(ctx, ref, operation, fn, *args)

    async def _none() -> None:
        return None

    pod_list, service, configmap, secret, policy = await asyncio.gather(
        _get("list_pods", lambda: ctx.core.list_namespaced_pod(ref.namespace, label_selector=ref.selector)),
        _get("get_service", ctx.core.read_namespaced_service, ref.name, ref.namespace),
        _get("get_configmap", ctx.core.read_namespaced_config_map, ref.configmap_name, ref.namespace),
        _get("get_secret", ctx.core.read_namespaced_secret, ref.membership_secret_name, ref.namespace),
        _get("get_networkpolicy", ctx.networking.read_namespaced_network_policy, ref.network_policy_name, ref.namespace)
        if ctx.network_policy_peers is not None else _none(),
    )
    pods: list[ObservedPod] = []
    foreign: set[str] = set()
    for manifest in (pod_list or {}).get("items", []):
        meta = manifest.get("metadata") or {}
        if ref.uid and not any(o.get("uid") == ref.uid for o in meta.get("ownerReferences") or []):
            foreign.add(meta.get("name", ""))  # labelled like ours, owned by someone else (a previous job of that name?)
            continue
        observed_pod = ObservedPod.from_manifest(manifest)
        if observed_pod is not None:
            pods.append(observed_pod)
    pods = await observe_lost_nodes(ctx, pods)
    epoch = int((job.get("status") or {}).get("membershipEpoch") or 0)
    key = f"{ref.namespace}/{ref.name}"
    reports = await poll_reports(ctx, pods, cursors=lambda pod: ctx.faults.cursor(key, epoch, pod.name))
    findings = feed_detector(ctx, job, epoch, pods, reports)
    slots = await observe_capacity(ctx, job)
    gang_shortage = await observe_gang_room(ctx, job, pods)
    workload, priorities = await observe_workload(ctx, job)
    init_source = await observe_init_source(ctx, job)
    return Observed(
        pods=tuple(pods),
        service_exists=service is not None,
        configmap_data=None if configmap is None else (configmap.get("data") or {}).get(CONFIG_KEY, ""),
        membership_token=secret_token(secret),
        network_policy_exists=policy is not None,
        reports=reports,
        foreign_pods=frozenset(foreign),
        findings=tuple(findings),
        free_slots=slots,
        gang_shortage=gang_shortage,
        workload=workload,
        workload_priorities=priorities,
        init_source=init_source,
    )


def secret_token(secret: dict[str, Any] | None) -> str | None:
    """The membership token a job's Secret holds (None without the Secret; "" when it holds none)."""
    if secret is None:
        return None
    encoded = (secret.get("data") or {}).get(MEMBERSHIP_KEY) or ""
    try:
        return base64.b64decode(encoded).decode()
    except (ValueError, UnicodeDecodeError):
        return ""


async def observe_lost_nodes(ctx: OperatorContext, pods: list[ObservedPod]) -> list[ObservedPod]:
    """Each pod that is not Ready, or is being deleted, learns since when its node has not been Ready
    (``node_lost_since``). Only those pods' nodes are read: a healthy job costs no node reads."""
    suspects = {p.node_name for p in pods if p.node_name and (p.deleting or not p.ready) and p.phase not in ("Succeeded", "Failed")}
    lost_since: dict[str, str] = {}
    for node_name in sorted(suspects):
        try:
            node = await _call(ctx, "read_node", ctx.core.read_node, node_name)
        except ApiException as exc:
            log.debug(f"cannot read node {node_name}: {exc.reason}")
            continue
        since = node_not_ready_since(node)
        if since:
            lost_since[node_name] = since
    return [dataclasses.replace(p, node_lost_since=lost_since[p.node_name]) if p.node_name in lost_since
            and (p.deleting or not p.ready) else p for p in pods]


def node_not_ready_since(node: dict[str, Any]) -> str | None:
    """When a Node's Ready condition stopped being True (None while it is Ready)."""
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return None if cond.get("status") == "True" else (cond.get("lastTransitionTime") or cond.get("lastHeartbeatTime"))
    return None


async def _room(ctx: OperatorContext, job: dict[str, Any], why: str, judge: Callable[..., Any]) -> Any:
    """``judge(worker_pod, nodes, pods, avoid_nodes)`` over the cluster as it is now (a :mod:`loco_operator.capacity`
    function); None when the spec does not parse or the cluster cannot be read (``why`` names the caller in the log)."""
    status = job.get("status") or {}
    try:
        parsed = TrainingJobSpec.model_validate(job.get("spec") or {})
    except ValueError:
        return None
    ref = JobRef.from_body(job)
    avoid = status.get("avoidNodes") or ()
    template = render_pod(ref, parsed, 0, 0, avoid_nodes=avoid)
    try:
        nodes, pods = await asyncio.gather(
            _call(ctx, "list_nodes", ctx.core.list_node),
            _call(ctx, "list_all_pods", ctx.core.list_pod_for_all_namespaces),
        )
    except ApiException as exc:
        log.warning(f"[{ref.namespace}/{ref.name}] cannot read cluster capacity for {why}: {exc.reason}")
        return None
    return judge(template, nodes.get("items") or [], pods.get("items") or [], avoid)


async def observe_capacity(ctx: OperatorContext, job: dict[str, Any]) -> int | None:
    """How many more worker pods the cluster could place (:func:`loco_operator.capacity.free_slots`),
    only for a Running elastic job below ``spec.replicas`` (the one case the planner asks); None
    otherwise or when the nodes cannot be read (the job then simply does not grow yet)."""
    spec, status = job.get("spec") or {}, job.get("status") or {}
    desired = int((status.get("workers") or {}).get("desired") or 0)
    if not spec.get("elastic") or status.get("phase") != "Running" or not 0 < desired < int(spec.get("replicas") or 0):
        return None
    return await _room(ctx, job, "elastic growth", free_slots)


async def observe_gang_room(ctx: OperatorContext, job: dict[str, Any], pods: Sequence[ObservedPod]) -> str | None:
    """Why the job's gated workers would not all fit now (:func:`loco_operator.capacity.shortage`); None when they
    would, when none is gated, or when the cluster cannot be read (the gang is then released: the scheduler decides)."""
    gated = [pod for pod in pods if pod.gated and pod.live]
    if not gated:
        return None
    return await _room(ctx, job, "gang start",
                       lambda pod, nodes, all_pods, avoid: shortage(pod, nodes, all_pods, len(gated), avoid))


#: (group, version, plural) of Kueue's Workloads, ResourceFlavors and WorkloadPriorityClasses.
KUEUE_WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")
KUEUE_FLAVORS = ("kueue.x-k8s.io", "v1beta2", "resourceflavors")
KUEUE_PRIORITIES = ("kueue.x-k8s.io", "v1beta2", "workloadpriorityclasses")


async def observe_init_source(ctx: OperatorContext, job: dict[str, Any]) -> ObservedSource | None:
    """The TrainingJob ``spec.checkpoint.initFrom`` names (same namespace), read only while the job has not started
    from it yet (no status.initializedFrom, no checkpoint of its own)."""
    source = (((job.get("spec") or {}).get("checkpoint") or {}).get("initFrom") or {}).get("jobName")
    status = job.get("status") or {}
    if not isinstance(source, str) or not source or status.get("initializedFrom") or status.get("lastCheckpoint"):
        return None
    ref = JobRef.from_body(job)
    found = await _read(ctx, ref, "get_trainingjob", ctx.custom.get_namespaced_custom_object, GROUP, VERSION,
                        ref.namespace, PLURAL, source)
    return ObservedSource.from_manifest(source, found)


async def observe_workload(ctx: OperatorContext, job: dict[str, Any]) -> tuple[ObservedWorkload | None, dict[str, int]]:
    """A queued job's Workload (with the node labels and tolerations of its admitted flavors) and the value of the
    WorkloadPriorityClass its label names; nothing for a job without a queue label (no Kueue needed then)."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    if not labels.get(QUEUE_LABEL):
        return None, {}
    ref = JobRef.from_body(job)

    async def _get(operation: str, fn: Any, *args: Any) -> dict[str, Any] | None:
        return await _read(ctx, ref, operation, fn, *args)

    custom = ctx.custom
    priorities: dict[str, int] = {}
    if name := labels.get(PRIORITY_LABEL):
        found = await _get("get_workloadpriorityclass", custom.get_cluster_custom_object, *KUEUE_PRIORITIES, name)
        if found is not None and isinstance(found.get("value"), int):
            priorities[name] = found["value"]
    manifest = await _get("get_workload", custom.get_namespaced_custom_object, *KUEUE_WORKLOADS[:2], ref.namespace,
                         KUEUE_WORKLOADS[2], workload_name(ref))
    if manifest is None:
        return None, priorities
    assigned = {flavor for ps in ((manifest.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []
                for flavor in (ps.get("flavors") or {}).values()}
    flavors = {}
    for flavor in sorted(assigned):
        if (found := await _get("get_resourceflavor", custom.get_cluster_custom_object, *KUEUE_FLAVORS, flavor)):
            flavors[flavor] = found
    return ObservedWorkload.from_manifest(manifest, flavors), priorities


def feed_detector(ctx: OperatorContext, job: dict[str, Any], epoch: int, pods: Sequence[ObservedPod],
                  reports: dict[str, ProgressReport]) -> list[Any]:
    """Fold this round's records into the job's live detector (only while the job is Running, with
    a valid ``spec.faultDetection``); returns its new findings for the planner."""
    status = job.get("status") or {}
    if status.get("phase") != "Running":
        return []
    try:
        config = DetectorConfig.model_validate((job.get("spec") or {}).get("faultDetection") or {})
    except ValueError:
        return []  # the planner reports an invalid spec
    ref = JobRef.from_body(job)
    placement = {pod.rank: (pod.name, pod.node_name) for pod in pods
                 if pod.epoch == epoch and pod.live}
    findings = ctx.faults.feed(f"{ref.namespace}/{ref.name}", config, epoch, placement, reports, time.time())
    for finding in findings:
        log.warning(f"[{ref.namespace}/{ref.name}] fault detector: {finding.verdict.message}")
    return findings


async def poll_reports(
    ctx: OperatorContext, pods: Sequence[ObservedPod], cursors: Any = None
) -> dict[str, ProgressReport]:
    """``GET /status`` of every running worker, concurrently; silent workers are left out.

    ``cursors(pod) -> (sinceSeq, sinceLink)`` adds the fault-detection cursors to the query, so the
    answer carries the collective records and probe samples after them."""
    targets = [pod for pod in pods if pod.phase == "Running" and not pod.deleting and pod.pod_ip]
    if not targets or ctx.http is None:
        return {}

    async def one(pod: ObservedPod) -> tuple[str, ProgressReport | None]:
        host = f"[{pod.pod_ip}]" if ":" in (pod.pod_ip or "") else pod.pod_ip
        url = f"http://{host}:{ctx.status_port}{STATUS_PATH}"
        if cursors is not None:
            since_seq, since_link = cursors(pod)
            url += f"?sinceSeq={since_seq}&sinceLink={since_link}"
        try:
            async with ctx.http.get(url) as response:  # type: ignore[union-attr]
                if response.status != 200:
                    return pod.name, None
                return pod.name, parse_report(await response.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return pod.name, None

    results = await asyncio.gather(*(one(pod) for pod in targets))
    return {name: report for name, report in results if report is not None}


def client_message(exc: ValidationError) -> str:
    """What the Kubernetes client (v37 validates every body with pydantic before sending it) said when it
    refused one: each field of the body it names and why."""
    def field(loc: tuple[Any, ...]) -> str:
        loc = loc[1:] if loc and isinstance(loc[0], int) else loc  # the argument's position (the body)
        return ".".join(str(part) for part in loc)

    return "; ".join(f"{field(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False))


#: Who refused a worker pod, as the Failed condition says it.
BY_API, BY_CLIENT = "The API", "The operator's Kubernetes client"


def api_message(exc: ApiException) -> str:
    """The API's own words for a refusal (the Status message), else the HTTP reason."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


async def apply(ctx: OperatorContext, job: dict[str, Any], actions: Sequence[Action],
                refused: list[tuple[str, str, str]] | None = None) -> list[str]:
    """Perform the actions in order; returns the errors (empty when all succeeded). A worker pod the API
    refuses for good (:func:`refusal_is_permanent`), or the client refuses before sending it (it validates
    bodies; the same body is refused every time), is added to ``refused`` as (pod, message, who refused it),
    and the remaining actions are skipped."""
    ref = JobRef.from_body(job)
    core, custom = ctx.core, ctx.custom
    errors: list[str] = []
    for action in actions:
        try:
            if isinstance(action, EmitEvent):
                kopf.event(job, type=action.type, reason=action.reason, message=action.message)
                # Logged on the module logger, not Kopf's object logger, which would post it again.
                log.log(logging.WARNING if action.type == "Warning" else logging.INFO,
                        f"[{ref.namespace}/{ref.name}] {action.reason}: {action.message}")
            elif isinstance(action, CreateService):
                await _create(ctx, "create_service", core.create_namespaced_service, ref.namespace, action.body)
            elif isinstance(action, CreateConfigMap):
                await _create(ctx, "create_configmap", core.create_namespaced_config_map, ref.namespace, action.body)
            elif isinstance(action, CreateMembershipSecret):
                await _create(ctx, "create_secret", core.create_namespaced_secret, ref.namespace,
                              render_membership_secret(ref, secrets.token_urlsafe(32)))
            elif isinstance(action, CreateNetworkPolicy):
                await _create(ctx, "create_networkpolicy", ctx.networking.create_namespaced_network_policy,
                              ref.namespace, action.body)
            elif isinstance(action, UpdateConfigMap):
                await _call(ctx, "patch_configmap", core.patch_namespaced_config_map, ref.configmap_name, ref.namespace,
                            {"data": action.body["data"]})
            elif isinstance(action, CreatePod):
                await _create(ctx, "create_pod", core.create_namespaced_pod, ref.namespace, action.body)
            elif isinstance(action, DeletePod):
                log.info(f"[{ref.namespace}/{ref.name}] deleting pod {action.name}: {action.reason}")
                await _delete(ctx, "delete_pod", core.delete_namespaced_pod, action.name, ref.namespace)
            elif isinstance(action, ForceDeletePod):
                log.warning(f"[{ref.namespace}/{ref.name}] {action.reason}")
                await _delete(ctx, "force_delete_pod", core.delete_namespaced_pod, action.name, ref.namespace,
                              grace_period_seconds=0)
            elif isinstance(action, PatchPodLabels):
                await patch_pod_labels(ctx, ref, action)
            elif isinstance(action, UngatePods):
                await ungate_pods(ctx, ref, action)
            elif isinstance(action, CreateWorkload):
                try:
                    await _call(ctx, "create_workload", custom.create_namespaced_custom_object, *KUEUE_WORKLOADS[:2],
                                ref.namespace, KUEUE_WORKLOADS[2], action.body)
                except ApiException as exc:
                    if exc.status != 409:  # AlreadyExists: it is there
                        raise
            elif isinstance(action, DeleteWorkload):
                await _delete(ctx, "delete_workload", custom.delete_namespaced_custom_object, *KUEUE_WORKLOADS[:2],
                              ref.namespace, KUEUE_WORKLOADS[2], action.name)
            elif isinstance(action, PatchWorkloadStatus):
                await _call(ctx, "patch_workload_status", custom.patch_namespaced_custom_object_status,
                            *KUEUE_WORKLOADS[:2], ref.namespace, KUEUE_WORKLOADS[2], action.name,
                            {"status": action.status})
            elif isinstance(action, PostMembership):
                await post_membership(ctx, ref, action)
            elif isinstance(action, RequestCheckpoint):
                await request_checkpoint(ctx, ref, action)
            elif isinstance(action, CordonNode):
                await cordon_node(ctx, action)
            elif isinstance(action, DeleteJob):
                log.info(f"[{ref.namespace}/{ref.name}] deleting the TrainingJob: {action.reason}")
                await _delete(ctx, "delete_job", custom.delete_namespaced_custom_object, GROUP, VERSION, ref.namespace, PLURAL, ref.name)
        except ApiException as exc:
            if refused is not None and isinstance(action, CreatePod) and refusal_is_permanent(exc.status, api_message(exc)):
                refused.append((action.name, api_message(exc), BY_API))
                break
            errors.append(f"{type(action).__name__}: HTTP {exc.status} {exc.reason}")
        except ValidationError as exc:  # validate_job should have caught it: this is the safety net
            log.error(f"[{ref.namespace}/{ref.name}] the client refused {type(action).__name__}: {client_message(exc)}")
            if refused is not None and isinstance(action, CreatePod):
                refused.append((action.name, client_message(exc), BY_CLIENT))
                break
            errors.append(f"{type(action).__name__}: refused by the client: {client_message(exc)}")
    return errors


async def _create(ctx: OperatorContext, operation: str, fn: Any, namespace: str, body: dict[str, Any]) -> None:
    try:
        await _call(ctx, operation, fn, namespace, body)
    except ApiException as exc:
        if exc.status != 409:  # AlreadyExists: it is there, which is what we wanted
            raise


async def _delete(ctx: OperatorContext, operation: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        await _call(ctx, operation, fn, *args, propagation_policy="Background", **kwargs)
    except ApiException as exc:
        if exc.status != 404:  # NotFound: already gone
            raise


async def ungate_pods(ctx: OperatorContext, ref: JobRef, action: UngatePods) -> None:
    """Remove the gang's scheduling gate from each pod (a JSON merge patch: the API lets gates only be removed).
    A vanished pod is logged: the next reconcile sees the gang incomplete."""
    for name in action.names:
        try:
            await _call(ctx, "patch_pod", ctx.core.patch_namespaced_pod, name, ref.namespace,
                        {"spec": {"schedulingGates": None}})
        except ApiException as exc:
            if exc.status != 404:
                raise
            log.info(f"[{ref.namespace}/{ref.name}] pod {name} is gone; its gate was not removed")


async def patch_pod_labels(ctx: OperatorContext, ref: JobRef, action: PatchPodLabels) -> None:
    """Merge ``action.labels`` into the pod's labels (a live resize's survivor takes its new rank and
    epoch). A vanished pod is logged, not an error: the next reconcile sees it gone."""
    try:
        await _call(ctx, "patch_pod", ctx.core.patch_namespaced_pod, action.name, ref.namespace,
                    {"metadata": {"labels": dict(action.labels)}})
    except ApiException as exc:
        if exc.status != 404:
            raise
        log.info(f"[{ref.namespace}/{ref.name}] pod {action.name} is gone; its labels were not patched")


async def post_membership(ctx: OperatorContext, ref: JobRef, action: PostMembership) -> None:
    """``POST /membership`` to the worker (JSON). Never raises: a failure or a non-2xx answer is
    logged, and the next reconcile sends the update again (the worker still reports the old epoch)."""
    epoch = action.body.get("epoch")
    if await _post_to_worker(ctx, ref, action.name, action.pod_ip, MEMBERSHIP_PATH, action.body, action.token,
                             f"membership update for epoch {epoch}"):
        log.info(f"[{ref.namespace}/{ref.name}] sent {action.name} its membership in epoch {epoch}: "
                 f"rank {action.body.get('rank')} of {action.body.get('worldSize')}")


async def request_checkpoint(ctx: OperatorContext, ref: JobRef, action: RequestCheckpoint) -> None:
    """``POST /checkpoint`` to the worker (JSON). Never raises: the next reconcile asks again until the
    checkpoint commits or the wait runs out (the worker takes one request id once)."""
    if await _post_to_worker(ctx, ref, action.name, action.pod_ip, CHECKPOINT_PATH, action.body, action.token,
                             f"checkpoint request {action.body.get('id')}"):
        log.info(f"[{ref.namespace}/{ref.name}] asked {action.name} for a checkpoint ({action.body.get('reason')})")


async def _post_to_worker(ctx: OperatorContext, ref: JobRef, name: str, pod_ip: str, path: str,
                          body: dict[str, Any], token: str, what: str) -> bool:
    """POST ``body`` as JSON to a worker's progress endpoint with the job's membership token. True on a 2xx answer;
    anything else is logged (never raised)."""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    url = f"http://{host}:{ctx.status_port}{path}"
    if ctx.http is None:
        log.warning(f"[{ref.namespace}/{ref.name}] no HTTP session: {what} for {name} not sent")
        return False
    try:
        async with ctx.http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
            if 200 <= response.status < 300:
                return True
            text = (await response.text())[:500]
            log.warning(f"[{ref.namespace}/{ref.name}] {name} refused the {what}: HTTP {response.status} {text}")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        log.warning(f"[{ref.namespace}/{ref.name}] {what} to {name} ({url}) failed, retrying on the next reconcile: "
                    f"{exc!r}")
    return False


#: Taint key (and annotation) a cordoned node gets: ``loco.dev/fault=<verdict kind>:NoSchedule``.
FAULT_TAINT = "loco.dev/fault"


async def cordon_node(ctx: OperatorContext, action: CordonNode) -> None:
    """Cordon ``action.node``: ``spec.unschedulable``, a ``loco.dev/fault`` NoSchedule taint (added to
    the existing ones) and an annotation with the reason. Planned only under ``--cordon-nodes``; Forbidden
    (RBAC without ``nodes`` ``patch``: the chart grants it only with faultIsolation.cordonNodes) or a vanished
    node is logged, not retried: the avoid-list still applies."""
    try:
        node = await _call(ctx, "read_node", ctx.core.read_node, action.node)
        taints = [t for t in ((node.get("spec") or {}).get("taints") or []) if t.get("key") != FAULT_TAINT]
        taints.append({"key": FAULT_TAINT, "value": action.kind, "effect": "NoSchedule"})
        body = {"metadata": {"annotations": {FAULT_TAINT: action.reason[:1000]}},
                "spec": {"unschedulable": True, "taints": taints}}
        await _call(ctx, "patch_node", ctx.core.patch_node, action.node, body)
        log.warning(f"cordoned node {action.node}: {action.reason}")
    except ApiException as exc:
        if exc.status in (403, 404):
            log.warning(f"could not cordon node {action.node} (HTTP {exc.status} {exc.reason}); "
                        "it stays on the job's avoid-list")
            return
        raise
