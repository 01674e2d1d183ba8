"""Thin Kopf handlers of the Population: read it and its member TrainingJobs, plan (:mod:`.reconcile`, pure), write
the status, then create and delete member jobs and post the events.

The status is written first: a write that fails acts on nothing (Kopf retries from the same stored status), and
one that succeeded makes every later reconcile plan from the new round. Creating a member job that exists and
deleting one that is gone count as done, so an operator restarted anywhere in between resumes the round without
duplicating a member.

Triggers: create/resume of a Population, a timer every :data:`INTERVAL_S` while it runs, and every event of a
TrainingJob labelled ``loco.dev/population`` (a member finishing moves the round on at once). Deleting a Population
deletes its members through their ``ownerReferences`` (Kubernetes' garbage collector; the embedded API server has
one too).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from ..handlers import OperatorContext, _call, _ctx, _delete, _merge_patch, registry
from ..spec import GROUP, PLURAL, VERSION
from .plan import LABEL_POPULATION
from .reconcile import plan_population
from .spec import PLURAL as POPULATIONS

log = logging.getLogger(__name__)

#: How often a running Population is reconciled even without a member's event.
INTERVAL_S = 3.0


@kopf.on.resume(GROUP, VERSION, POPULATIONS, registry=registry)
@kopf.on.create(GROUP, VERSION, POPULATIONS, registry=registry)
async def on_population(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await reconcile_population(_ctx(memo), namespace, name)


def _running(status: Any, **_: Any) -> bool:
    return (status or {}).get("phase") not in ("Succeeded", "Failed")


@kopf.timer(GROUP, VERSION, POPULATIONS, interval=INTERVAL_S, sharp=False, when=_running, registry=registry)
async def on_population_timer(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await reconcile_population(_ctx(memo), namespace, name)


@kopf.on.event(GROUP, VERSION, PLURAL, labels={LABEL_POPULATION: kopf.PRESENT}, registry=registry)
async def on_member_event(namespace: str, labels: dict[str, str], memo: kopf.Memo, **_: Any) -> None:
    """A member job changed (e.g. it finished): reconcile its Population now rather than at the next tick."""
    try:
        await reconcile_population(_ctx(memo), namespace, labels[LABEL_POPULATION])
    except kopf.TemporaryError as exc:  # event handlers are not retried: the timer will be
        log.warning(f"population reconcile after a member's event failed, retrying on the next tick: {exc}")


@kopf.on.delete(GROUP, VERSION, POPULATIONS, optional=True, registry=registry)
async def on_population_delete(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Its members go with it (owner references); forget it in the metrics."""
    ctx = _ctx(memo)
    ctx.metrics.forget_population(namespace, name)
    ctx.locks.pop(f"population:{namespace}/{name}", None)


async def reconcile_population(ctx: OperatorContext, namespace: str, name: str) -> None:
    """One read-plan-write-act round of the Population ``namespace/name``; raises :class:`kopf.TemporaryError`
    when an API call failed (after doing what it could)."""
    async with ctx.lock(f"population:{namespace}/{name}"):
        custom = ctx.custom
        try:
            body = await _call(ctx, "get_population", custom.get_namespaced_custom_object, GROUP, VERSION, namespace,
                               POPULATIONS, name)
            listed = await _call(ctx, "list_jobs", custom.list_namespaced_custom_object, GROUP, VERSION, namespace,
                                 PLURAL, label_selector=f"{LABEL_POPULATION}={name}")
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            raise kopf.TemporaryError(f"reading Population {namespace}/{name}: {exc.reason}", delay=INTERVAL_S) from exc
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        # only the jobs it owns: a job that merely carries the label is not a member
        uid = body["metadata"].get("uid")
        jobs = [j for j in listed.get("items") or []
                if any(ref.get("uid") == uid for ref in j["metadata"].get("ownerReferences") or [])]
        plan = plan_population(body, jobs)
        old = body.get("status") or {}
        if plan.status != old:
            try:
                await _call(ctx, "patch_population_status", custom.patch_namespaced_custom_object_status, GROUP,
                            VERSION, namespace, POPULATIONS, name, {"status": _merge_patch(old, plan.status)})
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise kopf.TemporaryError(f"patching Population {namespace}/{name} status: {exc.reason}",
                                          delay=INTERVAL_S) from exc
        for type_, reason, message in plan.events:
            kopf.event(body, type=type_, reason=reason, message=message)
            log.log(logging.WARNING if type_ == "Warning" else logging.INFO, f"[{namespace}/{name}] {reason}: {message}")
        errors = []
        for job in plan.create:
            try:
                await _call(ctx, "create_job", custom.create_namespaced_custom_object, GROUP, VERSION, namespace,
                            PLURAL, job)
            except ApiException as exc:
                if exc.status == 409:  # AlreadyExists: created before a restart
                    continue
                errors.append(f"creating member {job['metadata']['name']}: HTTP {exc.status} {exc.reason}")
        for job_name in plan.delete:
            try:
                await _delete(ctx, "delete_job", custom.delete_namespaced_custom_object, GROUP, VERSION, namespace,
                              PLURAL, job_name)
            except ApiException as exc:
                errors.append(f"deleting old member {job_name}: HTTP {exc.status} {exc.reason}")
        ctx.metrics.observe_population(namespace, name, plan.status)
        if errors:
            raise kopf.TemporaryError("; ".join(errors), delay=INTERVAL_S)
