"""API semantics on top of the store: create/get/list/update/patch/delete, subresources and GC.

This is where the rules of the Kubernetes API live, independent of HTTP:

- every object gets ``uid``, ``creationTimestamp``, ``generation`` and a fresh ``resourceVersion``
  on every write (no-op writes are not stored, as etcd skips them);
- ``generation`` is bumped on changes outside ``metadata`` (and outside ``status`` for kinds with a
  status subresource, whose main endpoint ignores ``status`` and whose ``/status`` endpoint ignores
  everything else);
- PUT/PATCH with a stale ``metadata.resourceVersion`` is a 409 Conflict;
- DELETE honours finalizers (``deletionTimestamp`` set, object kept until they are gone), graceful
  deletion of pods bound to a node, and propagation policies; :meth:`Operations.collect_garbage`
  deletes dependents whose owners are gone and finishes foreground and namespace deletions;
- custom resources are defaulted and validated against their CRD (:mod:`.validation`); posting a
  CRD registers its kinds.

Methods are synchronous (no awaits), so each operation is atomic in the asyncio server.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import math
import random
import re
import uuid
from typing import Any, Callable

from . import apply as applying, conversion, errors, patch as patching, validation
from .errors import APIError
from .resources import Registry, ResourceType, crd_types
from .selectors import matches_fields, matches_labels, parse_field_selector, parse_label_selector
from .store import Store

Obj = dict[str, Any]

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's generateName alphabet
FOREGROUND = "foregroundDeletion"
ORPHAN = "orphan"
DEFAULT_GRACE_S = 30
MODIFIED_MESSAGE = "the object has been modified; please apply your changes to the latest version and try again"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def timestamp(moment: dt.datetime) -> str:
    """RFC 3339 with second precision, as Kubernetes serialises ``metav1.Time``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def get_path(obj: Any, dotted: str) -> Any:
    """Value at ``.spec.replicas``-style path, None when missing."""
    for part in [p for p in dotted.split(".") if p]:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def set_path(obj: Obj, dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value


def _content(obj: Obj, include_status: bool) -> Obj:
    """What ``generation`` tracks: everything but metadata (and status when it is a subresource)."""
    return {k: v for k, v in obj.items() if k != "metadata" and (include_status or k != "status")}


class Operations:
    """The API verbs over one :class:`Store` and :class:`Registry`.

    ``clock`` returns the current UTC time (injectable for tests).
    """

    def __init__(self, store: Store, registry: Registry, clock: Callable[[], dt.datetime] = utc_now):
        self.store = store
        self.registry = registry
        self.clock = clock

    # ---- helpers ----------------------------------------------------------------------------
    def present(self, rt: ResourceType, obj: Obj) -> Obj:
        """The stored object as served through ``rt`` (its version's apiVersion)."""
        if rt.stored_as is not None:
            return conversion.core_event_to_events_v1(obj)
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        return obj

    def _ns(self, rt: ResourceType, namespace: str | None) -> str:
        return (namespace or "") if rt.namespaced else ""

    def _existing(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self.store.get(rt.storage_key, self._ns(rt, namespace), name)
        if obj is None:
            raise errors.not_found(rt.plural, rt.group, name)
        return obj

    def _invalid(self, rt: ResourceType, name: str, causes: list[tuple[str, str]]) -> APIError:
        return errors.invalid(rt.kind, rt.group, name, causes)

    def _check_name(self, rt: ResourceType, name: str) -> None:
        if rt.plural == "namespaces":
            pattern, limit, what = _DNS_LABEL, 63, "a lowercase RFC 1123 label"
        else:
            pattern, limit, what = _DNS_SUBDOMAIN, 253, "a lowercase RFC 1123 subdomain"
        if rt.plural == "events" and name:
            return  # event names are "<object>.<hex>", free-form enough
        if not pattern.fullmatch(name) or len(name) > limit:
            raise self._invalid(rt, name, [("metadata.name", (
                f'metadata.name: Invalid value: "{name}": {what} must consist of lower case alphanumeric characters, '
                f"'-'{' or ' + repr('.') if pattern is _DNS_SUBDOMAIN else ''}, and must start and end with an "
                f"alphanumeric character (at most {limit} characters)"))])

    def _check_namespace_exists(self, rt: ResourceType, namespace: str) -> None:
        if not rt.namespaced:
            return
        ns = self.store.get(("", "namespaces"), "", namespace)
        if ns is None:
            raise errors.not_found("namespaces", "", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise APIError(403, "Forbidden",
                           f'{rt.plural} "{rt.plural}" is forbidden: unable to create new content in namespace '
                           f"{namespace} because it is being terminated",
                           {"name": namespace, "kind": "namespaces"})

    def _selected(self, rt: ResourceType, label_selector: str | None, field_selector: str | None
                  ) -> Callable[[Obj], bool]:
        labels = parse_label_selector(label_selector)
        paths = {"metadata.name": "metadata.name", "metadata.namespace": "metadata.namespace", **dict(rt.selectable_fields)}
        fields = parse_field_selector(field_selector, set(paths))
        return lambda obj: matches_labels(labels, obj) and matches_fields(fields, paths, obj)

    def selector(self, rt: ResourceType, label_selector: str | None, field_selector: str | None) -> Callable[[Obj], bool]:
        """A predicate for watch filtering (raises 400 on a bad selector)."""
        return self._selected(rt, label_selector, field_selector)

    # ---- reads ------------------------------------------------------------------------------
    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        return self.present(rt, self._existing(rt, namespace, name))

    def list(self, rt: ResourceType, namespace: str | None, label_selector: str | None = None,
             field_selector: str | None = None) -> Obj:
        """A ``<Kind>List``; ``namespace`` None lists across all namespaces."""
        keep = self._selected(rt, label_selector, field_selector)
        items = [self.present(rt, o) for o in self.store.list(rt.storage_key, namespace if rt.namespaced else None)
                 if keep(o)]
        return {"kind": rt.list_kind, "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)}, "items": items}

    # ---- create -----------------------------------------------------------------------------
    def create(self, rt: ResourceType, namespace: str | None, body: Any, *, dry_run: bool = False,
               field_validation: str | None = None, warnings: list[str] | None = None,
               manager: str = applying.DEFAULT_MANAGER, managed: list[Obj] | None = None) -> Obj:
        """POST. Unknown custom-resource fields pruned (not Strict) are appended to ``warnings``. ``manager``
        owns every field set (``managed``: the managedFields a server-side apply computed instead)."""
        obj = self._decode(rt, body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
            self._check_namespace_exists(rt, meta["namespace"])
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise self._invalid(rt, "", [("metadata.name",
                                              "metadata.name: Required value: name or generateName is required")])
            meta["name"] = self._generate_name(rt, meta.get("namespace", ""), meta["generateName"])
        self._check_name(rt, meta["name"])
        for server_field in ("uid", "resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds",
                             "managedFields", "selfLink"):
            meta.pop(server_field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = timestamp(self.clock())
        meta["generation"] = 1
        if rt.is_custom and rt.has_status:
            obj.pop("status", None)
        self._prepare_create(rt, obj, field_validation, warnings)
        meta["managedFields"] = managed if managed is not None else applying.record_update(
            None, obj, manager, rt.api_version, meta["creationTimestamp"])
        if not meta["managedFields"]:
            meta.pop("managedFields")
        if self.store.get(rt.storage_key, meta.get("namespace", ""), meta["name"]) is not None:
            raise errors.already_exists(rt.plural, rt.group, meta["name"])
        if dry_run:
            return obj
        stored = self.store.put(rt.storage_key, obj)
        if rt.plural == "customresourcedefinitions":
            self.register_crd(stored)
        return self.present(rt, stored)

    def _decode(self, rt: ResourceType, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise errors.bad_request(f"the body of the request must be a JSON object for {rt.kind}")
        where = _non_finite(body)
        if where is not None:  # Python's parser reads NaN and Infinity; JSON, and every Go client, does not
            raise errors.bad_request(f"the request body is not valid JSON: {where[0]}: {where[1]} is not a JSON number")
        obj = copy.deepcopy(body)
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind and kind != rt.kind or api_version and api_version != rt.api_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API version "
                f"({rt.api_version}) or the kind ({kind}) is not {rt.kind}")
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        if obj.get("metadata") is not None and not isinstance(obj["metadata"], dict):
            raise errors.bad_request("metadata must be an object")
        undecodable = _metadata_decode_problem(obj.get("metadata") or {})
        if undecodable:
            raise errors.bad_request(f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: {undecodable}')
        if rt.stored_as is not None:
            return conversion.events_v1_to_core_event(obj)
        return obj

    def _generate_name(self, rt: ResourceType, namespace: str, prefix: str) -> str:
        for _ in range(100):
            name = prefix[:58] + "".join(random.choice(_NAME_CHARS) for _ in range(5))
            if self.store.get(rt.storage_key, namespace, name) is None:
                return name
        raise APIError(500, "AlreadyExists", f"could not generate a unique name from {prefix!r}")

    def _prepare_create(self, rt: ResourceType, obj: Obj, field_validation: str | None,
                        warnings: list[str] | None) -> None:
        """Kind-specific defaults and validation on create (mutates ``obj``)."""
        if rt.is_custom:
            _warn(warnings, validation.prepare_custom_object(rt, obj, None, field_validation))
        elif rt.group == "" and rt.plural == "pods":
            undecodable = _pod_decode_problem(obj)
            if undecodable:
                raise errors.bad_request(f"Pod in version \"v1\" cannot be handled as a Pod: {undecodable}")
            causes = _pod_problems(obj) + validation.pod_path_causes(obj)
            if causes:
                raise self._invalid(rt, obj["metadata"]["name"], causes)
            _default_pod(obj)
        elif rt.group == "" and rt.plural == "services":
            self._default_service(obj)
        elif rt.group == "" and rt.plural == "namespaces":
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
        elif rt.group == "" and rt.plural == "secrets":
            _refuse_undecodable_string_maps(rt, obj)
            _fold_string_data(obj)
        elif rt.group == "" and rt.plural == "configmaps":
            _refuse_undecodable_string_maps(rt, obj)
        elif rt.plural == "customresourcedefinitions":
            self._prepare_crd(obj, None)

    def _default_service(self, obj: Obj) -> None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        if not spec.get("clusterIP"):
            taken = {s.get("spec", {}).get("clusterIP") for s in self.store.list(("", "services"))}
            index = next(i for i in range(1, 65000) if f"10.96.{i // 250}.{i % 250 + 1}" not in taken)
            spec["clusterIP"] = f"10.96.{index // 250}.{index % 250 + 1}"
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        obj.setdefault("status", {"loadBalancer": {}})

    # ---- CRDs -------------------------------------------------------------------------------
    def _prepare_crd(self, crd: Obj, old: Obj | None) -> None:
        causes = validation.validate_crd(crd)
        if causes:
            raise errors.invalid("CustomResourceDefinition", "apiextensions.k8s.io", crd["metadata"]["name"], causes)
        spec = crd["spec"]
        spec.setdefault("scope", "Namespaced")
        names = spec["names"]
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", f"{names['kind']}List")
        stored = sorted({v["name"] for v in spec["versions"] if v.get("storage")}
                        | set((old or {}).get("status", {}).get("storedVersions") or []))
        now = timestamp(self.clock())
        conditions = (old or {}).get("status", {}).get("conditions") or [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ]
        crd["status"] = {"acceptedNames": copy.deepcopy(names), "storedVersions": stored, "conditions": conditions}

    def register_crd(self, crd: Obj) -> None:
        """Serve the kinds of a stored CRD."""
        self.registry.register(crd_types(crd), crd["metadata"]["name"])

    def _unregister_crd(self, crd: Obj) -> None:
        types = self.registry.by_storage_key((crd["spec"]["group"], crd["spec"]["names"]["plural"]))
        self.registry.unregister(crd["metadata"]["name"])
        if types:
            self.store.drop_collection(types[0].storage_key)

    # ---- update / patch ---------------------------------------------------------------------
    def update(self, rt: ResourceType, namespace: str | None, name: str, body: Any, *,
               subresource: str | None = None, dry_run: bool = False, field_validation: str | None = None,
               warnings: list[str] | None = None, manager: str = applying.DEFAULT_MANAGER) -> Obj:
        """PUT (``subresource`` None or ``"status"``)."""
        old = self._existing(rt, namespace, name)
        new = self._decode(rt, body)
        return self._write_update(rt, old, new, subresource, dry_run, field_validation, warnings, manager)

    def patch(self, rt: ResourceType, namespace: str | None, name: str, content_type: str, body: Any, *,
              subresource: str | None = None, dry_run: bool = False, field_validation: str | None = None,
              warnings: list[str] | None = None, manager: str = applying.DEFAULT_MANAGER) -> Obj:
        """PATCH with one of the :mod:`.patch` content types, then the same rules as :meth:`update`."""
        patching.check_content_type(content_type)
        old = self._existing(rt, namespace, name)
        base = self.present(rt, copy.deepcopy(old))
        patched = patching.apply_patch(base, content_type, body, custom=rt.is_custom)
        if not isinstance(patched, dict):
            raise errors.bad_request("the patch result is not an object")
        new = self._decode(rt, patched)
        if rt.group == "" and rt.plural in STRING_MAPS and (problem := _undecodable_string_map(rt, new)):
            # a patch whose result cannot be decoded: kube-apiserver answers 422 naming the field "patch"
            raise APIError(422, "Invalid", f' "" is invalid: patch: Invalid value: {json.dumps(json.dumps(new))}: '
                           f"{problem}", {"causes": [{"reason": "FieldValueInvalid", "field": "patch",
                                                      "message": f"Invalid value: ...: {problem}"}]})
        return self._write_update(rt, old, new, subresource, dry_run, field_validation, warnings, manager)

    def apply(self, rt: ResourceType, namespace: str | None, name: str, body: Any, *, manager: str | None,
              force: bool = False, subresource: str | None = None, dry_run: bool = False,
              field_validation: str | None = None, warnings: list[str] | None = None) -> tuple[Obj, bool]:
        """Server-side apply (PATCH ``application/apply-patch+yaml``, :mod:`.apply`); creates the object when it
        does not exist. Returns the object and whether it was created."""
        if not manager:
            raise errors.invalid("PatchOptions", "meta.k8s.io", "", [
                ("fieldManager", "fieldManager: Required value: is required for apply patch")])
        if not isinstance(body, dict):
            raise errors.bad_request("the apply configuration must be an object")
        if body.get("apiVersion") != rt.api_version or body.get("kind") != rt.kind:
            raise errors.bad_request(f"the apply configuration must name apiVersion {rt.api_version!r} and kind "
                                     f"{rt.kind!r} (got {body.get('apiVersion')!r}, {body.get('kind')!r})")
        meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        if meta.get("name") not in (None, name):
            raise errors.bad_request(f'the name of the object ({meta["name"]}) does not match the name on the URL ({name})')
        stamp = timestamp(self.clock())
        existing = self.store.get(rt.storage_key, self._ns(rt, namespace), name)
        if existing is None:
            if subresource:
                raise errors.not_found(rt.plural, rt.group, name)
            obj = applying.apply(None, self._decode(rt, body), manager, force, rt.api_version, stamp)
            obj["metadata"]["name"] = name
            managed = obj["metadata"].pop("managedFields")
            return self.create(rt, namespace, obj, dry_run=dry_run, field_validation=field_validation,
                               warnings=warnings, managed=managed), True
        base = self.present(rt, copy.deepcopy(existing))
        new = self._decode(rt, applying.apply(base, self._decode(rt, body), manager, force, rt.api_version, stamp,
                                              subresource))
        if rt.group == "" and rt.plural in STRING_MAPS:
            _refuse_undecodable_string_maps(rt, new)
        managed = new["metadata"].pop("managedFields")
        return self._write_update(rt, existing, new, subresource, dry_run, field_validation, warnings,
                                  manager, managed), False

    def _write_update(self, rt: ResourceType, old: Obj, new: Obj, subresource: str | None, dry_run: bool,
                      field_validation: str | None, warnings: list[str] | None = None,
                      manager: str = applying.DEFAULT_MANAGER, managed: list[Obj] | None = None) -> Obj:
        old_meta, meta = old["metadata"], new.setdefault("metadata", {})
        name = old_meta["name"]
        if meta.get("name") and meta["name"] != name:
            raise errors.bad_request(f'the name of the object ({meta["name"]}) does not match the name on the URL ({name})')
        if meta.get("resourceVersion") and meta["resourceVersion"] != old_meta["resourceVersion"]:
            raise errors.conflict(rt.plural, rt.group, name, MODIFIED_MESSAGE)
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
            meta = new["metadata"]
        else:
            for kept in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                         "generation", "namespace"):
                if kept in old_meta:
                    meta[kept] = old_meta[kept]
                else:
                    meta.pop(kept, None)
            meta["name"] = name
            meta.pop("managedFields", None)
            if rt.has_status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    raise self._invalid(rt, name, [("metadata.finalizers", (
                        f"metadata.finalizers: Forbidden: no new finalizers can be added if the object is being "
                        f"deleted, found new finalizers {sorted(added)}"))])
            if rt.group == "" and rt.plural in STRING_MAPS:
                _refuse_undecodable_string_maps(rt, new)
            if rt.group == "" and rt.plural == "secrets":
                _fold_string_data(new)
            if rt.group == "" and rt.plural == "pods" and (causes := pod_update_causes(old, new)):
                raise self._invalid(rt, name, causes)
            if rt.plural == "customresourcedefinitions":
                self._prepare_crd(new, old)
        if rt.is_custom:
            _warn(warnings, validation.prepare_custom_object(rt, new, old, field_validation))
        # who set what (kube-apiserver records it on every write): an apply computed it already
        meta["managedFields"] = managed if managed is not None else applying.record_update(
            old, new, manager, rt.api_version, timestamp(self.clock()), subresource)
        if not meta["managedFields"]:
            meta.pop("managedFields")
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if _content(new, not rt.has_status) != _content(old, not rt.has_status):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if new == old:
            return self.present(rt, new)  # no-op: nothing written, resourceVersion unchanged
        if dry_run:
            return self.present(rt, new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not self._awaits_kubelet(rt, new):
            final = self.store.remove(rt.storage_key, meta.get("namespace", ""), name) or new
            self._after_remove(rt, final)
            return self.present(rt, final)
        stored = self.store.put(rt.storage_key, new)
        if rt.plural == "customresourcedefinitions":
            self.register_crd(stored)
        return self.present(rt, stored)

    # ---- delete -----------------------------------------------------------------------------
    def delete(self, rt: ResourceType, namespace: str | None, name: str, options: Obj | None = None) -> Obj:
        """DELETE one object; returns the object (with ``deletionTimestamp`` while it lingers)."""
        options = options or {}
        obj = self._existing(rt, namespace, name)
        meta = obj["metadata"]
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != meta["uid"]:
            raise errors.conflict(rt.plural, rt.group, name,
                                  f"Precondition failed: UID in precondition: {preconditions['uid']}, UID in object meta: {meta['uid']}")
        if preconditions.get("resourceVersion") and preconditions["resourceVersion"] != meta["resourceVersion"]:
            raise errors.conflict(rt.plural, rt.group, name, MODIFIED_MESSAGE)
        if options.get("dryRun"):
            return self.present(rt, obj)
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is True:
            policy = "Orphan"
        if policy not in (None, "Background", "Foreground", "Orphan"):
            raise errors.bad_request(f'propagationPolicy: Unsupported value: "{policy}"')
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])

        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and FOREGROUND not in finalizers and self._has_dependents(meta["uid"]):
            finalizers.append(FOREGROUND)
        grace = self._grace_period(rt, obj, options)
        now = self.clock()
        if grace > 0:
            already = meta.get("deletionGracePeriodSeconds")
            if meta.get("deletionTimestamp") and already is not None and already <= grace:
                return self.present(rt, obj)
            meta["deletionTimestamp"] = timestamp(now + dt.timedelta(seconds=grace))
            meta["deletionGracePeriodSeconds"] = grace
            meta["finalizers"] = finalizers
            if not finalizers:
                meta.pop("finalizers")
            meta["generation"] = int(meta.get("generation", 1)) + 1
            return self.present(rt, self.store.put(rt.storage_key, obj))
        if rt.plural == "namespaces" and rt.group == "":
            return self.present(rt, self._terminate_namespace(obj))
        if finalizers:
            if meta.get("deletionTimestamp") and finalizers == list(meta.get("finalizers") or []) \
                    and meta.get("deletionGracePeriodSeconds") == 0:
                return self.present(rt, obj)
            meta.setdefault("deletionTimestamp", timestamp(now))
            meta["deletionGracePeriodSeconds"] = 0
            meta["finalizers"] = finalizers
            meta["generation"] = int(meta.get("generation", 1)) + 1
            return self.present(rt, self.store.put(rt.storage_key, obj))
        final = self.store.remove(rt.storage_key, meta.get("namespace", ""), name)
        self._after_remove(rt, final)
        return self.present(rt, final)

    def _grace_period(self, rt: ResourceType, obj: Obj, options: Obj) -> int:
        """Seconds of graceful deletion: only pods bound to a node and still running get any."""
        if rt.group != "" or rt.plural != "pods":
            return 0
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return 0
        requested = options.get("gracePeriodSeconds")
        if requested is None:
            requested = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
        return max(int(requested), 0)

    def _awaits_kubelet(self, rt: ResourceType, obj: Obj) -> bool:
        """A terminating pod with a grace period left is removed by the kubelet, not by finalizer removal."""
        return (rt.group == "" and rt.plural == "pods" and bool(obj["metadata"].get("deletionGracePeriodSeconds"))
                and bool((obj.get("spec") or {}).get("nodeName")))

    def _after_remove(self, rt: ResourceType, final: Obj | None) -> None:
        if final is not None and rt.plural == "customresourcedefinitions":
            self._unregister_crd(final)

    def delete_collection(self, rt: ResourceType, namespace: str | None, label_selector: str | None,
                          field_selector: str | None, options: Obj | None = None) -> Obj:
        listed = self.list(rt, namespace, label_selector, field_selector)
        deleted = []
        for item in listed["items"]:
            try:
                deleted.append(self.delete(rt, item["metadata"].get("namespace"), item["metadata"]["name"], options))
            except APIError as exc:
                if exc.code != 404:
                    raise
        listed["items"] = deleted
        return listed

    def _has_dependents(self, uid: str) -> bool:
        return any(uid in self._owner_uids(o) for _, o in self.store.scan())

    @staticmethod
    def _owner_uids(obj: Obj) -> set[str]:
        return {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []}

    def _orphan_dependents(self, uid: str) -> None:
        for key, stored in self.store.scan():
            refs = stored["metadata"].get("ownerReferences") or []
            kept = [r for r in refs if r.get("uid") != uid]
            if len(kept) != len(refs):
                obj = copy.deepcopy(stored)
                obj["metadata"]["ownerReferences"] = kept
                if not kept:
                    del obj["metadata"]["ownerReferences"]
                self.store.put(key, obj)

    def _terminate_namespace(self, ns: Obj) -> Obj:
        meta = ns["metadata"]
        if not meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = timestamp(self.clock())
            meta["deletionGracePeriodSeconds"] = 0
            ns["status"] = {"phase": "Terminating"}
            ns = self.store.put(("", "namespaces"), ns)
        self.collect_garbage()
        return self.store.get(("", "namespaces"), "", meta["name"]) or ns

    # ---- garbage collection -----------------------------------------------------------------
    def collect_garbage(self) -> int:
        """One pass of the garbage collector; returns how many writes it made (0 = settled).

        - an object whose every owner (``ownerReferences`` by uid) is gone is deleted (background);
        - an owner deleted in the foreground loses its ``foregroundDeletion`` finalizer (and is
          removed) once nothing refers to it, after its dependents were deleted;
        - a terminating namespace has its content deleted, then is removed.
        """
        writes = 0
        objects = self.store.scan()  # read-only view; every write below goes through the store
        by_uid = {o["metadata"]["uid"]: o for _, o in objects}
        referenced: set[str] = set()
        for key, obj in objects:
            owners = self._owner_uids(obj)
            if not owners:
                continue
            referenced |= owners
            live = [by_uid[u] for u in owners if u in by_uid]
            foreground = any(FOREGROUND in (o["metadata"].get("finalizers") or []) for o in live)
            if (not live or foreground) and not obj["metadata"].get("deletionTimestamp"):
                writes += self._gc_delete(key, obj)
        for key, obj in objects:
            meta = obj["metadata"]
            if FOREGROUND in (meta.get("finalizers") or []) and meta["uid"] not in referenced:
                rt = self.registry.storage_type(key)
                current = self.store.get(key, meta.get("namespace", ""), meta["name"])
                if rt is not None and current is not None:
                    current["metadata"]["finalizers"] = [f for f in current["metadata"]["finalizers"] if f != FOREGROUND]
                    self._write_update(rt, self.store.get(key, meta.get("namespace", ""), meta["name"]),
                                       current, None, False, "Ignore")
                    writes += 1
        for ns in self.store.list(("", "namespaces")):
            if not ns["metadata"].get("deletionTimestamp"):
                continue
            name = ns["metadata"]["name"]
            content = [(key, o) for key, o in objects if key != ("", "namespaces")
                       and o["metadata"].get("namespace") == name]
            for key, obj in content:
                if not obj["metadata"].get("deletionTimestamp"):
                    writes += self._gc_delete(key, obj)
            if not content and not ns["metadata"].get("finalizers"):
                self.store.remove(("", "namespaces"), "", name)
                writes += 1
        return writes

    def _gc_delete(self, key: tuple[str, str], obj: Obj) -> int:
        rt = self.registry.storage_type(key)
        if rt is None:
            return 0
        try:
            self.delete(rt, obj["metadata"].get("namespace"), obj["metadata"]["name"], {"propagationPolicy": "Background"})
        except APIError:
            return 0
        return 1

    # ---- subresources -----------------------------------------------------------------------
    def get_scale(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        if rt.scale is None:
            raise errors.not_found(f"{rt.plural}/scale", rt.group, name)
        obj = self._existing(rt, namespace, name)
        meta = obj["metadata"]
        status: Obj = {"replicas": get_path(obj, rt.scale.status_replicas_path) or 0}
        if rt.scale.label_selector_path:
            selector = get_path(obj, rt.scale.label_selector_path)
            if selector:
                status["selector"] = selector
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                             if k in meta},
                "spec": {"replicas": get_path(obj, rt.scale.spec_replicas_path) or 0}, "status": status}

    def update_scale(self, rt: ResourceType, namespace: str | None, name: str, scale: Any) -> Obj:
        if rt.scale is None:
            raise errors.not_found(f"{rt.plural}/scale", rt.group, name)
        if not isinstance(scale, dict):
            raise errors.bad_request("the body must be an autoscaling/v1 Scale object")
        obj = self._existing(rt, namespace, name)
        version = (scale.get("metadata") or {}).get("resourceVersion")
        if version and version != obj["metadata"]["resourceVersion"]:
            raise errors.conflict(rt.plural, rt.group, name, MODIFIED_MESSAGE)
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise errors.invalid("Scale", "autoscaling", name, [(
                "spec.replicas", f"spec.replicas: Invalid value: {replicas!r}: must be greater than or equal to 0")])
        set_path(obj, rt.scale.spec_replicas_path, replicas)
        self.update(rt, namespace, name, self.present(rt, obj))
        return self.get_scale(rt, namespace, name)

    def patch_scale(self, rt: ResourceType, namespace: str | None, name: str, content_type: str, body: Any) -> Obj:
        patching.check_content_type(content_type)
        current = self.get_scale(rt, namespace, name)
        patched = patching.apply_patch(current, content_type, body, custom=False)
        return self.update_scale(rt, namespace, name, patched)

    def bind(self, namespace: str, name: str, binding: Any) -> Obj:
        """``pods/binding``: assign a pending pod to ``binding.target.name``."""
        rt = self.registry.get("", "v1", "pods")
        assert rt is not None
        pod = self._existing(rt, namespace, name)
        target = ((binding or {}).get("target") or {}).get("name") if isinstance(binding, dict) else None
        if not target:
            raise errors.invalid("Binding", "", name, [("target.name", "target.name: Required value")])
        if pod.get("spec", {}).get("nodeName"):
            raise errors.conflict("pods/binding", "", name,
                                  f"pod {name} is already assigned to node \"{pod['spec']['nodeName']}\"")
        if pod["metadata"].get("deletionTimestamp"):
            raise errors.conflict("pods/binding", "", name, f"pod {name} is being deleted, cannot be assigned to a host")
        if pod.get("spec", {}).get("schedulingGates"):
            raise errors.conflict("pods/binding", "", name, f"pod {name} has non-empty .spec.schedulingGates")
        pod["spec"]["nodeName"] = target
        conditions = [c for c in pod.setdefault("status", {}).get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                           "lastTransitionTime": timestamp(self.clock())})
        pod["status"]["conditions"] = conditions
        self.store.put(rt.storage_key, pod)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}


    def evict(self, namespace: str, name: str, eviction: Any) -> Obj:
        """``pods/eviction`` (what ``kubectl drain`` posts): the pod gets a ``DisruptionTarget`` condition saying why
        and is deleted gracefully, with the Eviction's ``deleteOptions``. No PodDisruptionBudget exists here, so
        nothing blocks an eviction (kube-apiserver answers 429 while a budget would be broken)."""
        rt = self.registry.get("", "v1", "pods")
        assert rt is not None
        if not isinstance(eviction, dict) or eviction.get("kind") not in (None, "Eviction"):
            raise errors.bad_request("the body of pods/eviction must be a policy/v1 Eviction")
        if (eviction.get("metadata") or {}).get("name") not in (None, name):
            raise errors.bad_request("name in URL does not match name in Eviction object")
        pod = self._existing(rt, namespace, name)
        if not pod["metadata"].get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            conditions = [c for c in pod.setdefault("status", {}).get("conditions") or [] if c.get("type") != "DisruptionTarget"]
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                               "message": "Eviction API: evicting", "lastProbeTime": None,
                               "lastTransitionTime": timestamp(self.clock())})
            pod["status"]["conditions"] = conditions
            self.store.put(rt.storage_key, pod)
        options = eviction.get("deleteOptions") if isinstance(eviction.get("deleteOptions"), dict) else {}
        self.delete(rt, namespace, name, options)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}


_META_STRINGS = ("name", "generateName", "namespace", "resourceVersion", "uid", "creationTimestamp", "deletionTimestamp")


def _metadata_decode_problem(meta: Obj) -> str | None:
    """A metadata field of a type kube-apiserver's decoder would not read into ObjectMeta (it answers 400): the
    rest of this server (names, selectors, garbage collection) relies on these types."""
    def wrong(field: str, value: Any, want: str) -> str:
        return (f"json: cannot unmarshal {type(value).__name__} into Go struct field ObjectMeta.metadata.{field} "
                f"of type {want}")

    for field in _META_STRINGS:
        if meta.get(field) is not None and not isinstance(meta[field], str):
            return wrong(field, meta[field], "string")
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and (not isinstance(value, dict)
                                  or not all(v is None or isinstance(v, str) for v in value.values())):
            return wrong(field, value, "map[string]string")
    if meta.get("finalizers") is not None and (not isinstance(meta["finalizers"], list)
                                               or not all(isinstance(f, str) for f in meta["finalizers"])):
        return wrong("finalizers", meta["finalizers"], "[]string")
    refs = meta.get("ownerReferences")
    if refs is not None and (not isinstance(refs, list) or not all(
            isinstance(r, dict) and all(isinstance(r.get(k, ""), str) for k in ("uid", "name", "kind", "apiVersion"))
            for r in refs)):
        return wrong("ownerReferences", refs, "[]v1.OwnerReference")
    return None


def _non_finite(body: Obj) -> tuple[str, float] | None:
    """The path and value of a NaN or infinite number in ``body`` (walked without recursion), or None."""
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in body.items()]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, value
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def _warn(warnings: list[str] | None, unknown: list[str]) -> None:
    if warnings is not None:
        warnings.extend(f'unknown field "{path}"' for path in unknown)


def _pod_problems(pod: Obj) -> list[tuple[str, str]]:
    """The structural checks kube-apiserver makes that a kubelet relies on: containers, unique names."""
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "spec: Required value")]
    causes: list[tuple[str, str]] = []
    seen: set[str] = set()
    for field in ("initContainers", "containers"):
        containers = spec.get(field) or []
        if field == "containers" and not containers:
            causes.append(("spec.containers", "spec.containers: Required value"))
        for index, container in enumerate(containers):
            path = f"spec.{field}[{index}]"
            name = container.get("name") if isinstance(container, dict) else None
            if not name:
                causes.append((f"{path}.name", f"{path}.name: Required value"))
            elif not _DNS_LABEL.fullmatch(name) or len(name) > 63:
                causes.append((f"{path}.name", f'{path}.name: Invalid value: "{name}": a lowercase RFC 1123 label '
                                               f"must consist of lower case alphanumeric characters or '-'"))
            elif name in seen:
                causes.append((f"{path}.name", f'{path}.name: Duplicate value: "{name}"'))
            else:
                seen.add(name)
            if isinstance(container, dict):
                causes += _container_problems(container, path)
    return causes


_QUANTITY = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([eE][+-]?[0-9]+)|[numkMGTPE]|[KMGTPE]i)?")


def _containers(pod: Obj) -> list[tuple[str, Obj]]:
    spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
    return [(f"spec.{field}[{i}]", c) for field in ("initContainers", "containers")
            for i, c in enumerate(spec.get(field) or []) if isinstance(c, dict)]


def _pod_decode_problem(pod: Obj) -> str | None:
    """What kube-apiserver's decoder would not read into a Pod (it answers 400 before validating): an env
    variable that is not an object or whose value is not a string, a resource quantity that is not one."""
    for path, container in _containers(pod):
        env = container.get("env")
        for index, var in enumerate(env if isinstance(env, list) else []):
            if not isinstance(var, dict):
                return f"{path}.env[{index}]: json: cannot unmarshal {type(var).__name__} into Go struct EnvVar"
            if "value" in var and var["value"] is not None and not isinstance(var["value"], str):
                return (f"{path}.env[{index}].value: json: cannot unmarshal {type(var['value']).__name__} into Go "
                        f"struct field EnvVar.value of type string")
        resources = container.get("resources")
        for kind in ("limits", "requests"):
            amounts = resources.get(kind) if isinstance(resources, dict) else None
            for key, amount in (amounts.items() if isinstance(amounts, dict) else ()):
                if isinstance(amount, bool) or not isinstance(amount, (str, int, float)) or \
                        not _QUANTITY.fullmatch(str(amount)):
                    return (f"{path}.resources.{kind}[{key}]: quantities must match the regular expression "
                            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
    return None


def _container_problems(container: Obj, path: str) -> list[tuple[str, str]]:
    """Env names present; resource quantities not negative (as kube-apiserver's validation)."""
    causes: list[tuple[str, str]] = []
    env = container.get("env")
    for index, var in enumerate(env if isinstance(env, list) else []):
        if isinstance(var, dict) and not var.get("name"):
            causes.append((f"{path}.env[{index}].name", f"{path}.env[{index}].name: Required value"))
    resources = container.get("resources")
    for kind in ("limits", "requests"):
        amounts = resources.get(kind) if isinstance(resources, dict) else None
        for key, amount in (amounts.items() if isinstance(amounts, dict) else ()):
            if str(amount).startswith("-"):
                field = f"{path}.resources.{kind}[{key}]"
                causes.append((field, f'{field}: Invalid value: "{amount}": must be greater than or equal to 0'))
    return causes


def _default_pod(pod: Obj) -> None:
    """The defaults the real apiserver fills in that clients (kubectl describe, the kubelet) read."""
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        if not isinstance(container, dict):
            continue
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        image = container.get("image", "")
        tag = image.rsplit("/", 1)[-1]
        latest = ":" not in tag or tag.endswith(":latest")
        container.setdefault("imagePullPolicy", "Always" if latest and "@" not in image else "IfNotPresent")
        container.setdefault("resources", {})
        for port in container.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
    pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}
    if spec.get("schedulingGates"):  # as kube-apiserver's pod strategy: the scheduler will not look at it yet
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
                                        "message": "Scheduling is blocked due to non-empty scheduling gates",
                                        "lastProbeTime": None, "lastTransitionTime": None}]


def _qos_class(spec: Obj) -> str:
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all(
        r.get("limits", {}).get(k) and r.get("requests", r.get("limits", {})).get(k) == r["limits"][k]
        for r in resources for k in ("cpu", "memory"))
    return "Guaranteed" if guaranteed else "Burstable"


#: the string-to-string maps of the core kinds that hold data (Go: map[string]string or map[string][]byte)
STRING_MAPS = {"configmaps": ("data", "binaryData"), "secrets": ("data", "stringData")}


def _undecodable_string_map(rt: ResourceType, obj: Obj) -> str | None:
    """What kube-apiserver's decoder says of a ConfigMap's or Secret's data holding anything but strings."""
    for field in STRING_MAPS[rt.plural]:
        values = obj.get(field)
        if values is None:
            continue
        if not isinstance(values, dict):
            return f"json: cannot unmarshal {_json_kind(values)} into Go struct field {rt.kind}.{field} of type map"
        wrong = next((v for v in values.values() if not isinstance(v, str)), None)
        if wrong is not None:
            return f"json: cannot unmarshal {_json_kind(wrong)} into Go struct field {rt.kind}.{field} of type string"
    return None


def _refuse_undecodable_string_maps(rt: ResourceType, obj: Obj) -> None:
    """400 as kube-apiserver answers a create or update it cannot decode (before validation: a list or a
    number in a ConfigMap's data never reaches storage)."""
    problem = _undecodable_string_map(rt, obj)
    if problem:
        raise errors.bad_request(f'{rt.kind} in version "v1" cannot be handled as a {rt.kind}: {problem}')


def _json_kind(value: Any) -> str:
    """The JSON kind Go's decoder names in its 'cannot unmarshal' message."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _fold_string_data(secret: Obj) -> None:
    """``stringData`` is write-only: merged into ``data`` (base64), as the real apiserver does."""
    string_data = secret.pop("stringData", None) or {}
    if string_data:
        data = secret.setdefault("data", {}) or {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        secret["data"] = data
    secret.setdefault("type", "Opaque")


#: What kube-apiserver lets an update change in a pod's spec (beyond these, it answers 422).
_POD_MUTABLE = "`spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`," \
    "`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` " \
    "(allow it to be set to 1 if it was previously negative)"


def pod_update_causes(old: Obj, new: Obj) -> list[tuple[str, str]]:
    """kube-apiserver's ``ValidatePodUpdate``, the parts a pod's clients meet: scheduling gates may only be removed
    (what a gang start or a queue does to release a pod), and the rest of the spec is fixed but for images, the
    active deadline and added tolerations. The causes name the field, as the real server does."""
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    old_gates = [g.get("name") for g in old_spec.get("schedulingGates") or [] if isinstance(g, dict)]
    new_gates = [g.get("name") for g in new_spec.get("schedulingGates") or [] if isinstance(g, dict)]
    added = [(i, g) for i, g in enumerate(new_gates) if g not in old_gates]
    if added:
        return [(f"spec.schedulingGates[{i}].name", f"spec.schedulingGates[{i}].name: Forbidden: only deletion is "
                 f"allowed, but found new scheduling gate '{g}'") for i, g in added]
    if new_gates and new_spec.get("nodeName"):
        return [("spec.nodeName", "spec.nodeName: Forbidden: cannot be set until all schedulingGates have been cleared")]

    def fixed(spec: Obj) -> Obj:
        rest = copy.deepcopy({k: v for k, v in spec.items()
                              if k not in ("schedulingGates", "activeDeadlineSeconds", "tolerations",
                                           "terminationGracePeriodSeconds")})
        for group in ("containers", "initContainers"):
            for container in rest.get(group) or []:
                if isinstance(container, dict):
                    container.pop("image", None)
        return rest

    old_tolerations = old_spec.get("tolerations") or []
    kept = all(t in (new_spec.get("tolerations") or []) for t in old_tolerations)
    if fixed(old_spec) != fixed(new_spec) or not kept:
        changed = [k for k in sorted(set(old_spec) | set(new_spec))
                   if (k == "tolerations" and not kept) or fixed({k: old_spec.get(k)}) != fixed({k: new_spec.get(k)})]
        return [("spec", f"spec: Forbidden: pod updates may not change fields other than {_POD_MUTABLE} "
                 f"(changed: {', '.join(f'spec.{k}' for k in changed)})")]
    return []

