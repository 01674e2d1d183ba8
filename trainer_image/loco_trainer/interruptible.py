"""Waiting on a blocking call without going deaf to SIGTERM: used by the launcher and the live-membership path.

Python signal handlers run only in the main thread, between bytecodes; a rank blocked in C++ (the TCP
store inside ``init_process_group`` waiting for peers that never come) would ignore SIGTERM until the
kubelet's grace period kills it. :func:`call_interruptibly` runs the call in a thread and waits in short
joins, so :func:`raise_terminated` (the SIGTERM handler) interrupts the wait at once.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Terminated(BaseException):
    """SIGTERM arrived (raised from the signal handler in the main thread)."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


class Abandoned(Exception):
    """:func:`call_interruptibly` stopped waiting because its ``abandon`` predicate said so."""


def call_interruptibly(fn: Callable[..., T], *args: Any, poll_s: float = 0.2,
                        abandon: Callable[[], bool] | None = None) -> T:
    """``fn(*args)`` run in a worker thread while this (main) thread waits in short joins.

    Why: Python signal handlers run only in the main thread, between bytecodes. A rank blocked in
    C++ (the TCP store inside ``init_process_group`` waiting for peers that never come, e.g. while
    the operator deletes all pods for a restart or resize) would ignore SIGTERM until the kubelet's
    grace period kills it. Waiting here instead lets :func:`raise_terminated` raise
    :class:`Terminated` at once; the still-blocked daemon thread dies with ``os._exit``.
    An exception raised by ``fn`` is re-raised here unchanged (same object: type, message, cause).
    ``abandon``: checked at every poll while ``fn`` runs; when it returns True the wait ends with
    :class:`Abandoned` and ``fn`` is left to finish or fail in its daemon thread.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"loco-{getattr(fn, '__name__', 'call')}")
    thread.start()
    while thread.is_alive():
        thread.join(poll_s)
        if abandon is not None and thread.is_alive() and abandon():
            raise Abandoned(getattr(fn, "__name__", "call"))
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome["value"]
