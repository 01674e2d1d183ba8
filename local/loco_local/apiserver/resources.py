"""The registry of kinds the server serves, and the discovery documents built from it.

A :class:`ResourceType` is everything the generic handlers need to know about a kind: where it
lives in the URL space, whether it is namespaced, which subresources it has, its printer columns
and (for custom resources) its schema. Built-in kinds are listed in :data:`BUILTIN_TYPES`; a
``CustomResourceDefinition`` adds one type per served version through :meth:`Registry.register_crd`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class ScaleSpec:
    """Where a custom resource keeps its replica counts (``spec.subresources.scale`` of a CRD)."""

    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str | None = None


@dataclass(frozen=True)
class PrinterColumn:
    """One ``additionalPrinterColumns`` entry (``json_path`` like ``.status.phase``)."""

    name: str
    type: str
    json_path: str
    description: str = ""
    format: str = ""
    priority: int = 0


@dataclass(frozen=True)
class ResourceType:
    """A kind served at ``/api/v1`` (group ``""``) or ``/apis/<group>/<version>``.

    ``storage_key`` identifies the stored collection: every served version of one CRD shares it.
    ``subresources`` names the extra endpoints (``status``, ``scale``, ``log``, ``binding``).
    ``selectable_fields`` are the field-selector labels beyond ``metadata.name``/``metadata.namespace``,
    mapped to a dotted path into the object.
    """

    group: str
    version: str
    kind: str
    plural: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    scale: ScaleSpec | None = None
    printer_columns: tuple[PrinterColumn, ...] | None = None
    schema: dict[str, Any] | None = None
    selectable_fields: tuple[tuple[str, str], ...] = ()
    crd_name: str | None = None
    storage_version: str | None = None
    stored_as: tuple[str, str] | None = None  # another kind's collection (events.k8s.io events -> core events)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def storage_key(self) -> tuple[str, str]:
        return self.stored_as or (self.group, self.plural)

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def is_custom(self) -> bool:
        return self.crd_name is not None

    def discovery_entries(self) -> list[dict[str, Any]]:
        """``APIResource`` entries for ``/api/v1`` or ``/apis/<g>/<v>`` (the kind plus its subresources)."""
        entry: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": VERBS,
            "storageVersionHash": "",
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        entries = [entry]
        for sub in sorted(self.subresources):
            sub_entry: dict[str, Any] = {
                "name": f"{self.plural}/{sub}",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }
            if sub == "scale":
                sub_entry.update(group="autoscaling", version="v1", kind="Scale")
            elif sub == "log":
                sub_entry.update(kind="Pod", verbs=["get"])
            elif sub == "binding":
                sub_entry.update(kind="Binding", verbs=["create"])
            elif sub == "eviction":
                sub_entry.update(group="policy", version="v1", kind="Eviction", verbs=["create"])
            entries.append(sub_entry)
        return entries


def _core(kind: str, plural: str, namespaced: bool = True, **kw: Any) -> ResourceType:
    return ResourceType(group="", version="v1", kind=kind, plural=plural, singular=kind.lower(), namespaced=namespaced, **kw)


_EVENT_FIELDS = (
    ("involvedObject.kind", "involvedObject.kind"),
    ("involvedObject.name", "involvedObject.name"),
    ("involvedObject.namespace", "involvedObject.namespace"),
    ("involvedObject.uid", "involvedObject.uid"),
    ("involvedObject.apiVersion", "involvedObject.apiVersion"),
    ("involvedObject.resourceVersion", "involvedObject.resourceVersion"),
    ("involvedObject.fieldPath", "involvedObject.fieldPath"),
    ("reason", "reason"),
    ("source", "source.component"),
    ("type", "type"),
)

BUILTIN_TYPES: tuple[ResourceType, ...] = (
    _core("Namespace", "namespaces", namespaced=False, short_names=("ns",), subresources=frozenset({"status"}),
          selectable_fields=(("status.phase", "status.phase"),)),
    _core("Pod", "pods", short_names=("po",), categories=("all",),
          subresources=frozenset({"status", "log", "binding", "eviction"}),
          selectable_fields=(("spec.nodeName", "spec.nodeName"), ("status.phase", "status.phase"),
                             ("spec.restartPolicy", "spec.restartPolicy"), ("spec.schedulerName", "spec.schedulerName"),
                             ("spec.serviceAccountName", "spec.serviceAccountName"), ("status.podIP", "status.podIP"),
                             ("spec.hostNetwork", "spec.hostNetwork"), ("status.nominatedNodeName", "status.nominatedNodeName"))),
    _core("Service", "services", short_names=("svc",), categories=("all",), subresources=frozenset({"status"})),
    _core("ConfigMap", "configmaps", short_names=("cm",)),
    _core("Secret", "secrets", selectable_fields=(("type", "type"),)),
    _core("Event", "events", short_names=("ev",), selectable_fields=_EVENT_FIELDS),
    _core("Node", "nodes", namespaced=False, short_names=("no",), subresources=frozenset({"status"}),
          selectable_fields=(("spec.unschedulable", "spec.unschedulable"),)),
    _core("ServiceAccount", "serviceaccounts", short_names=("sa",)),
    _core("PersistentVolumeClaim", "persistentvolumeclaims", short_names=("pvc",), subresources=frozenset({"status"})),
    _core("Endpoints", "endpoints", short_names=("ep",)),
    ResourceType(group="coordination.k8s.io", version="v1", kind="Lease", plural="leases", singular="lease", namespaced=True),
    # stored and served, not enforced: every pod here shares the host's network (docs/local-cluster.md)
    ResourceType(group="networking.k8s.io", version="v1", kind="NetworkPolicy", plural="networkpolicies",
                 singular="networkpolicy", namespaced=True, short_names=("netpol",)),
    ResourceType(group="events.k8s.io", version="v1", kind="Event", plural="events", singular="event", namespaced=True,
                 short_names=("ev",), stored_as=("", "events"),  # one storage, two representations
                 selectable_fields=(("regarding.kind", "involvedObject.kind"), ("regarding.name", "involvedObject.name"),
                                    ("regarding.namespace", "involvedObject.namespace"),
                                    ("regarding.uid", "involvedObject.uid"), ("reason", "reason"), ("type", "type"))),
    ResourceType(group="apiextensions.k8s.io", version="v1", kind="CustomResourceDefinition",
                 plural="customresourcedefinitions", singular="customresourcedefinition", namespaced=False,
                 short_names=("crd", "crds"), categories=("api-extensions",), subresources=frozenset({"status"})),
)


class Registry:
    """Kinds by ``(group, version, plural)``; mutable only through CRD registration.

    One registry belongs to one server instance (no module-level state).
    """

    def __init__(self) -> None:
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in BUILTIN_TYPES:
            self._types[(rt.group, rt.version, rt.plural)] = rt

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def by_storage_key(self, key: tuple[str, str]) -> list[ResourceType]:
        return [rt for rt in self._types.values() if rt.storage_key == key]

    def storage_type(self, key: tuple[str, str]) -> ResourceType | None:
        """The type whose version objects of ``key`` are stored in."""
        types = self.by_storage_key(key)
        for rt in types:
            if rt.stored_as is None and rt.storage_version in (None, rt.version):
                return rt
        return types[0] if types else None

    def all(self) -> list[ResourceType]:
        return list(self._types.values())

    def find_kind(self, api_version: str, kind: str) -> ResourceType | None:
        group, _, version = api_version.rpartition("/")
        for rt in self._types.values():
            if rt.group == group and rt.version == version and rt.kind == kind:
                return rt
        return None

    def register(self, types: list[ResourceType], crd_name: str) -> None:
        """Replace every type served for ``crd_name`` with ``types``."""
        self.unregister(crd_name)
        for rt in types:
            self._types[(rt.group, rt.version, rt.plural)] = rt

    def unregister(self, crd_name: str) -> None:
        for key in [k for k, rt in self._types.items() if rt.crd_name == crd_name]:
            del self._types[key]

    # ---- discovery -------------------------------------------------------------------------
    def groups(self) -> dict[str, list[str]]:
        """Group name -> served versions (preferred first), excluding the core group."""
        result: dict[str, list[str]] = {}
        for rt in self._types.values():
            if rt.group:
                versions = result.setdefault(rt.group, [])
                if rt.version not in versions:
                    versions.append(rt.version)
        for group, versions in result.items():
            versions.sort(key=_version_priority)
        return result

    def api_group(self, group: str) -> dict[str, Any] | None:
        versions = self.groups().get(group)
        if not versions:
            return None
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries, "preferredVersion": entries[0]}

    def api_group_list(self) -> dict[str, Any]:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self.api_group(g) for g in sorted(self.groups(), key=_group_priority)]}

    def resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        types = [rt for rt in self._types.values() if rt.group == group and rt.version == version]
        if not types:
            return None
        resources = [entry for rt in sorted(types, key=lambda t: t.plural) for entry in rt.discovery_entries()]
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA > beta > alpha, higher numbers first."""
    import re

    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0)
    major, stage, minor = match.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -int(major), -int(minor or 0))


def _group_priority(group: str) -> tuple[int, str]:
    builtin = group.endswith(".k8s.io")
    return (0 if builtin else 1, group)


def crd_types(crd: dict[str, Any]) -> list[ResourceType]:
    """The served :class:`ResourceType` of each version of a ``CustomResourceDefinition``."""
    spec = crd["spec"]
    names = spec["names"]
    storage = next((v["name"] for v in spec["versions"] if v.get("storage")), spec["versions"][0]["name"])
    types = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or {}
        scale = subresources.get("scale")
        columns = version.get("additionalPrinterColumns")
        types.append(ResourceType(
            group=spec["group"],
            version=version["name"],
            kind=names["kind"],
            plural=names["plural"],
            singular=names.get("singular") or names["kind"].lower(),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()),
            subresources=frozenset(k for k in ("status", "scale") if k in subresources),
            scale=ScaleSpec(scale["specReplicasPath"], scale["statusReplicasPath"], scale.get("labelSelectorPath"))
            if scale else None,
            printer_columns=tuple(
                PrinterColumn(name=c["name"], type=c.get("type", "string"), json_path=c["jsonPath"],
                              description=c.get("description", ""), format=c.get("format", ""),
                              priority=c.get("priority", 0))
                for c in columns) if columns is not None else None,
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            selectable_fields=tuple((f["jsonPath"].lstrip("."), f["jsonPath"].lstrip("."))
                                    for f in version.get("selectableFields") or ()),
            crd_name=crd["metadata"]["name"],
            storage_version=storage,
        ))
    return types


__all__ = ["ResourceType", "ScaleSpec", "PrinterColumn", "Registry", "BUILTIN_TYPES", "crd_types"]
