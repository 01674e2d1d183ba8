"""Process helpers of the local kubelet: process-group kill and pid files that survive a crash.

Every container runs as the leader of its own session (``start_new_session=True``), so its process
group holds the container's whole process tree, as a container's cgroup would: killing the group
kills the container. Each running container also leaves ``<pod dir>/<container>.pid`` holding
``"<pid> <create_time>"``, so ``loco local down`` can kill what a hard-killed cluster left behind
without ever hitting a recycled pid (the create time must match).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import psutil


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a preexec_fn must not import or allocate much
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the thread that started it dies, however it dies, so a
    killed node agent or ``loco local up`` leaves none of its pods or components running."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def signal_group(pid: int, sig: int, *, descendants: bool = True) -> bool:
    """Send ``sig`` to the process group led by ``pid`` and, with ``descendants`` (only while the
    leader is alive and not reaped, else ``pid`` may be recycled), to the leader's descendants that
    left the group. True if anything was signalled."""
    sent = False
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True) if descendants else []:
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(child.pid) != pid:
                    child.send_signal(sig)
                    sent = True
    try:
        os.killpg(pid, sig)
        sent = True
    except (ProcessLookupError, PermissionError):
        pass
    return sent


def group_alive(pid: int) -> bool:
    """Whether any process of the group ``pid`` still exists (zombies count as gone)."""
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.info["pid"]) == pid:
                return True
    return False


def write_pid_file(path: Path, pid: int) -> None:
    """Record ``pid`` with its create time (atomically)."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid} {created}\n")
    tmp.replace(path)


def read_pid_file(path: Path) -> psutil.Process | None:
    """The live process recorded in ``path`` (None when gone, recycled or unreadable)."""
    try:
        pid_s, created_s = path.read_text().split()
        proc = psutil.Process(int(pid_s))
        if abs(proc.create_time() - float(created_s)) > 0.01:
            return None
        return proc
    except (OSError, ValueError, psutil.Error):
        return None


def recorded_group(path: Path) -> int | None:
    """The process group a pid file records, if any of it still runs, else None.

    The leader may be gone (killed by its parent-death signal) while processes it started live on in
    its group: they are still this container's. Linux never hands out a pid that is still some process
    group's id, so a group whose leader is gone cannot have been recycled; a live leader with another
    start time is a recycled pid, not ours.
    """
    try:
        pid_s, created_s = path.read_text().split()
        pid, created = int(pid_s), float(created_s)
    except (OSError, ValueError):
        return None
    try:
        if abs(psutil.Process(pid).create_time() - created) > 0.01:
            return None
        return pid
    except psutil.NoSuchProcess:
        return pid if group_alive(pid) else None
    except psutil.Error:
        return None


def kill_pid_files(paths: Iterable[Path], *, grace_s: float = 5.0) -> int:
    """SIGTERM every recorded process group still running (its leader alive or not), SIGKILL after
    ``grace_s``; remove the files. Returns the number of groups that were alive."""
    live = []
    for path in paths:
        pid = recorded_group(path)
        if pid is not None:
            live.append(pid)
            signal_group(pid, signal.SIGTERM)
        with contextlib.suppress(OSError):
            path.unlink()
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline and any(group_alive(p) for p in live):
        time.sleep(0.1)
    for pid in live:
        signal_group(pid, signal.SIGKILL)
    return len(live)
