"""The paths a pod names, checked before the process kubelet touches the host, and its mount plan.

A pod names paths in ``volumeMounts[].mountPath``, ``subPath``, ``subPathExpr``, ``workingDir``,
``terminationMessagePath`` and ConfigMap/Secret/downwardAPI ``items[].path``. In a container they stay
inside the container's root or the volume; the process kubelet joins them to host directories, so a
``..`` or a symlink planted in a volume could reach anything its user can. Three layers keep them in:

* :func:`local_path_problems` is kube-apiserver's rule for paths inside a volume (the API server's
  validation uses it, with its messages);
* :func:`pod_path_problems` is the kubelet's own check of every path of a pod spec (it also runs pods
  an API server it does not control admitted, or objects crafted to look admitted);
* :func:`resolve_within` and :func:`open_within` check the final host path, symlinks resolved, against
  the directories it may be in, so a symlink planted in a volume cannot lead out either.

Mounts are symlinks in the emulated container root; :func:`plan_mounts` lays out nested mounts (an
emptyDir at ``/data/checkpoints`` inside a claim at ``/data``) without touching the outer volume.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
ITEM_SOURCES = ("configMap", "secret", "downwardAPI")  # the volume kinds whose items[].path names a file


class PathError(ValueError):
    """A path a pod names would leave the directory it belongs in: ``"path" why``."""

    def __init__(self, path: Any, why: str) -> None:
        super().__init__(f"{json_quote(path)} {why}")
        self.why = why


def json_quote(value: Any) -> str:
    """A value quoted as kube-apiserver prints it in a field error."""
    return json.dumps(str(value))


# ------------------------------------------------------------------------------- pure rules


def local_path_problems(path: Any, *, reserved: bool = False) -> list[str]:
    """kube-apiserver's complaints about a path inside a volume (``validateLocalDescendingPath``; with
    ``reserved``, ``ValidateLocalNonReservedPath`` for item paths: ``..data`` is the atomic writer's)."""
    if not isinstance(path, str):
        return ["must be a string"]
    problems = []
    if path.startswith("/"):
        problems.append("must be a relative path")
    if ".." in path.split("/"):
        problems.append("must not contain '..'")
    elif reserved and path.startswith(".."):
        problems.append("must not start with '..'")
    return problems


def volume_path(path: str, *, reserved: bool = False) -> PurePosixPath:
    """``path`` (a subPath, or with ``reserved`` an item path) as a relative path inside its volume;
    PathError if it is not one."""
    problems = local_path_problems(path, reserved=reserved)
    if problems:
        raise PathError(path, " and ".join(problems))
    relative = PurePosixPath(posixpath.normpath(path or "."))
    if reserved and relative == PurePosixPath("."):
        raise PathError(path, "must name a file in the volume")
    return relative


def container_path(path: Any) -> PurePosixPath:
    """A container path (mountPath, workingDir, terminationMessagePath) relative to the container root;
    relative ones count from ``/``, as the kubelet makes them absolute. PathError on a ``..`` segment."""
    if not isinstance(path, str):
        raise PathError(path, "must be a string")
    if ".." in path.split("/"):
        raise PathError(path, "must not contain '..'")
    return PurePosixPath(posixpath.normpath("/" + path).lstrip("/") or ".")


def _checked(problems: list[str], where: str, value: Any, check: Callable[[Any], object]) -> None:
    """Run ``check(value)``; when it raises PathError add ``where: "value" why`` to ``problems``."""
    try:
        check(value)
    except PathError as exc:
        problems.append(f"{where}: {exc}")


def _volume_name(name: Any) -> None:
    if not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise PathError(name, "is not a valid volume name")


def claim_name(name: Any) -> str:
    """A claim name as a single directory name (claims are named like any object: a DNS subdomain)."""
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise PathError(name, "is not a valid claim name")
    return name


def entries(value: Any) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(index, entry) for the objects of a list field; anything else in it (or instead of it) is skipped,
    as neither the API server nor the kubelet can trust an object's shape."""
    if isinstance(value, list):
        yield from ((i, entry) for i, entry in enumerate(value) if isinstance(entry, Mapping))


def field_of(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def pod_path_problems(spec: Mapping[str, Any]) -> list[str]:
    """Every unsafe path of a pod spec, as ``field: "value" why`` (empty when the kubelet may proceed).

    Stricter than kube-apiserver where a container runtime would confine what the emulation cannot:
    ``..`` in mountPath, workingDir or terminationMessagePath. ``subPathExpr`` is checked once expanded.
    """
    problems: list[str] = []
    for v, vol in entries(spec.get("volumes")):
        for kind in ITEM_SOURCES:
            for i, item in entries(field_of(vol, kind).get("items")):
                _checked(problems, f"spec.volumes[{v}].{kind}.items[{i}].path", item.get("path", ""),
                         lambda p: volume_path(p, reserved=True))
        _checked(problems, f"spec.volumes[{v}].name", vol.get("name"), _volume_name)
    for group in ("initContainers", "containers"):
        for c, container in entries(spec.get(group)):
            where = f"spec.{group}[{c}]"
            for key in ("workingDir", "terminationMessagePath"):
                if container.get(key):
                    _checked(problems, f"{where}.{key}", container[key], container_path)
            for m, mount in entries(container.get("volumeMounts")):
                if mount.get("subPath"):
                    _checked(problems, f"{where}.volumeMounts[{m}].subPath", mount["subPath"], volume_path)
                _checked(problems, f"{where}.volumeMounts[{m}].mountPath", mount.get("mountPath", ""), _mount_point)
    return problems


def _mount_point(path: str) -> None:
    if container_path(path) == PurePosixPath("."):
        raise PathError(path, "must not be the container root")


# ------------------------------------------------------------------------------- mount plan


@dataclass(frozen=True)
class MountStep:
    """One entry of the container root; a plan lists parents before children.

    ``link``: a symlink to ``source``. Otherwise a real directory: empty if ``source`` is None, else
    showing ``source``'s entries (as symlinks) except the names of the steps below it. ``within`` is
    the volume ``source`` must stay in once symlinks are resolved (None: no volume).
    """

    path: PurePosixPath
    source: Path | None
    link: bool
    within: Path | None


def plan_mounts(mounts: Mapping[PurePosixPath, Path]) -> list[MountStep]:
    """The container root for ``mounts`` (container path -> host source), the more specific mount
    winning whatever the order, as containerd mounts parents first.

    A mount with no other mount below it is one symlink to its volume. A mount with others below it
    cannot be a symlink (the nested mount would land inside the volume, and on every pod sharing it):
    it becomes a directory of links to the volume's entries, as are the directories between it and
    the nested mount. Entries the container adds directly in such a directory stay in the pod's root.
    """
    steps: dict[PurePosixPath, MountStep] = {}
    for path in sorted(mounts, key=lambda p: len(p.parts)):
        nested = any(path in other.parents for other in mounts)
        steps[path] = MountStep(path, mounts[path], link=not nested, within=mounts[path])
        for parent in path.parents:
            if parent != PurePosixPath(".") and parent not in steps:
                steps[parent] = _between(parent, mounts)
    return sorted(steps.values(), key=lambda s: (len(s.path.parts), str(s.path)))


def _between(path: PurePosixPath, mounts: Mapping[PurePosixPath, Path]) -> MountStep:
    """A directory on the way to a mount: the nearest volume above it shows through, if any."""
    for above in path.parents:
        if above in mounts:
            return MountStep(path, mounts[above] / path.relative_to(above), link=False, within=mounts[above])
    return MountStep(path, None, link=False, within=None)


# ------------------------------------------------------------------------------- host side


def _under(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_within(path: Path, roots: Iterable[Path]) -> Path:
    """``path`` with every symlink resolved (it need not exist); PathError unless it is under one of
    ``roots`` (symlinks in those resolved too)."""
    real = os.path.realpath(path)
    allowed = [os.path.realpath(r) for r in roots]
    if not any(_under(real, r) for r in allowed):
        raise PathError(path, f"resolves to {real}, outside {', '.join(allowed)}")
    return Path(real)


def open_within(path: Path, roots: Iterable[Path], flags: int, mode: int = 0o644) -> int:
    """``os.open`` a regular file that is, symlinks resolved, under one of ``roots``; PathError if not.

    Checked before opening and, through ``/proc/self/fd``, after: a path swapped in between is caught.
    The last component is never followed and a pipe never blocks. Never pass O_TRUNC: truncate the
    returned descriptor once it is known to be inside (``os.ftruncate``).
    """
    roots = list(roots)
    resolve_within(path, roots)
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else str(path)
        resolve_within(Path(opened), roots)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathError(path, "is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_owned(path: Path) -> None:
    """Remove a directory the kubelet made for one pod (its root or a volume's backing), never
    following a symlink: a link is unlinked, a directory's links inside are removed, not followed
    (``shutil.rmtree`` works on file descriptors)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def show_entries(directory: Path, source: Path, within: Path, skip: set[str]) -> None:
    """Fill ``directory`` with a symlink to each entry of ``source`` not in ``skip``; nothing when
    ``source`` is not a directory inside ``within`` (a symlink in a volume leading out is not shown)."""
    try:
        real = resolve_within(source, [within])
    except PathError:
        return
    if not real.is_dir():
        return
    for name in sorted(os.listdir(real)):
        if name not in skip:
            (directory / name).symlink_to(real / name)
