"""Faults the operating system makes, done to processes of this machine: what the fault-detection scenarios
and benchmarks use instead of the trainer's own fault injection (docs/fault-detection.md, "Faults nobody
scripted"). A stop (``SIGSTOP``) is a hang; stop/continue cycling is a straggler; a CPU-share cap (a cgroup
CPU quota) is a slow machine; ``kill -9`` is a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: where the cgroup hierarchies are mounted (v2: one unified tree; v1: one tree per controller)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def signal_all(procs: Sequence[Any], signum: int) -> None:
    """Send ``signum`` to every process (``psutil.Process``) still there."""
    import psutil

    for proc in procs:
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def stop_launcher(launcher: subprocess.Popen, timeout_s: float = 60) -> None:
    """End a process that is still running, and its children, after a fault: stopped children are resumed first (a
    stopped process never handles SIGTERM), then the process gets SIGTERM, and SIGKILL after ``timeout_s``."""
    import psutil

    if launcher.poll() is not None:
        return
    signal_all(psutil.Process(launcher.pid).children(recursive=True), signal.SIGCONT)
    launcher.send_signal(signal.SIGTERM)
    try:
        launcher.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        launcher.kill()


class StopCycler:
    """Freezes ``procs`` for ``stop_s`` out of every ``stop_s + run_s`` on a thread, until :meth:`stop`
    (which lets them run again). A process that has gone away is skipped: the cycle outlives a restart."""

    def __init__(self, procs: Sequence[Any], stop_s: float, run_s: float) -> None:
        self.procs, self.stop_s, self.run_s = list(procs), stop_s, run_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._cycle, daemon=True, name="loco-stop-cycler")

    def _cycle(self) -> None:
        while not self._done.is_set():
            signal_all(self.procs, signal.SIGSTOP)
            self._done.wait(self.stop_s)
            signal_all(self.procs, signal.SIGCONT)
            self._done.wait(self.run_s)

    def start(self) -> "StopCycler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=self.stop_s + self.run_s + 5)
        signal_all(self.procs, signal.SIGCONT)

    def __enter__(self) -> "StopCycler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cpu_cgroup_parent() -> tuple[Path, str] | None:
    """(the directory a capped group is made in, "v1" | "v2"), where this process may make one."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # v2: the cpu controller must be delegated to children
        controllers = (CGROUP_ROOT / "cgroup.subtree_control").read_text().split() if (
            CGROUP_ROOT / "cgroup.subtree_control").exists() else []
        return (CGROUP_ROOT, "v2") if "cpu" in controllers and os.access(CGROUP_ROOT, os.W_OK) else None
    v1 = CGROUP_ROOT / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists() and os.access(v1, os.W_OK):
        return v1, "v1"
    return None


def cpu_cap_unavailable() -> str | None:
    """Why a CPU-share cap cannot be set here (no writable cgroup with the cpu controller), or None."""
    if _cpu_cgroup_parent() is None:
        return (f"no writable cgroup with the cpu controller under {CGROUP_ROOT} (needs root and cgroup v1's cpu "
                "hierarchy, or v2 with cpu in cgroup.subtree_control)")
    return None


@contextmanager
def cpu_cap(pids: Sequence[int], fraction: float) -> Iterator[Path]:
    """Cap the processes ``pids`` (and the threads they start) at ``fraction`` of one core, with a cgroup CPU
    quota (CFS bandwidth: ``fraction`` x 100 ms of CPU per 100 ms period). Yields the group's directory. On
    exit the processes go back to the parent group and the group is removed. Raises RuntimeError (with
    :func:`cpu_cap_unavailable`'s reason) where no cap can be set."""
    found = _cpu_cgroup_parent()
    if found is None:
        raise RuntimeError(cpu_cap_unavailable())
    parent, version = found
    group = parent / f"loco-cap-{uuid.uuid4().hex[:8]}"
    period_us = 100_000
    quota_us = max(1000, int(period_us * fraction))
    group.mkdir()
    try:
        if version == "v2":
            (group / "cpu.max").write_text(f"{quota_us} {period_us}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period_us))
            (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        for pid in pids:
            _move(group, pid)
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            _move(parent, int(pid))
        group.rmdir()


def _move(group: Path, pid: int) -> None:
    """Move a process, every thread of it (``cgroup.procs`` in v1 and v2), into ``group``."""
    try:
        (group / "cgroup.procs").write_text(str(pid))
    except OSError:
        pass  # gone meanwhile
