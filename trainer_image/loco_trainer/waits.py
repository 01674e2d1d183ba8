"""Waiting for a communication call: the handle of an async call (:class:`CommHandle`), and the interrupt that
gives every wait up at once when a live worker leaves its process group (:class:`Interrupt`,
:class:`CommInterrupted`). Shared by the collectives (:mod:`loco_trainer.comm`) and the probes
(:mod:`loco_trainer.probes`)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from loco_trainer.flight_recorder import CollectiveRecord


class CommInterrupted(RuntimeError):
    """A wait given up because :meth:`Comm.interrupt` was called (the group is being aborted: a
    smaller membership arrived, or this worker saw a peer fail, and it must regroup)."""

class Interrupt:
    """The flag :meth:`Comm.interrupt` sets. Setting it wakes every wait in progress at once (no
    polling): see :meth:`wait_for`."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._lock = threading.Lock()
        self._wakers: set[threading.Event] = set()

    def set(self) -> None:
        with self._lock:
            self._flag.set()
            wakers = list(self._wakers)
        for wake in wakers:
            wake.set()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def wait_for(self, work: Any, p2p: bool = False) -> None:
        """``work.wait()``, given up with :class:`CommInterrupted` as soon as the flag is set (or at
        once when it is set already). gloo's abort of a process group does not wake this process's
        own waits, and a wait posted on a connection whose peer is already gone can sit until the
        group's timeout (observed: a survivor blocked in the outer all-reduce for the whole 120 s).

        A collective is waited on through its future (completion or interrupt wakes this thread; no
        extra thread). gloo's point-to-point work (``p2p``) has no usable future and does not survive
        a timed ``wait`` (a timeout closes the connection), so it is waited on in a daemon helper
        thread. An interrupted wait leaves the work in flight until the old group's connections close
        or time out; it holds nothing else. Work that completed before the interrupt is not given up."""
        if work.is_completed():  # done already (an async round waited on late): not given up, even when interrupted
            work.wait()
            return
        wake = threading.Event()
        with self._lock:
            if self._flag.is_set():
                raise CommInterrupted(_INTERRUPTED)
            self._wakers.add(wake)
        try:
            if p2p:
                self._wait_in_thread(work, wake)
                return
            future = work.get_future()
            future.add_done_callback(lambda _: wake.set())
            wake.wait()
            if not future.done():
                raise CommInterrupted(_INTERRUPTED)
            work.wait()  # returns at once; raises the work's failure, if any
        finally:
            with self._lock:
                self._wakers.discard(wake)

    def _wait_in_thread(self, work: Any, wake: threading.Event) -> None:
        finished, failure = threading.Event(), []

        def run() -> None:
            try:
                work.wait()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the waiting thread
                failure.append(exc)
            finally:
                finished.set()
                wake.set()

        threading.Thread(target=run, name="loco-comm-wait", daemon=True).start()
        wake.wait()
        if not finished.is_set():
            raise CommInterrupted(_INTERRUPTED)
        if failure:
            raise failure[0]

_INTERRUPTED = "communicator was aborted: the wait was interrupted (this worker is leaving its process group)"

class CommHandle:
    """Handle of an async operation: ``wait()`` blocks until it completes and returns the result
    tensor (averaged for ``op="avg"``). Waiting twice is harmless.

    A handle given ``interrupt`` (every operation of an ``interruptible`` Comm but those on CUDA
    tensors, see :meth:`Comm._async`) waits through :meth:`Interrupt.wait_for`, so it raises
    :class:`CommInterrupted` as soon as the Comm is interrupted."""

    __slots__ = ("_work", "_result", "_post", "_record", "_done", "_interrupt", "_p2p")

    def __init__(
        self,
        work: Any | None,
        result: Any,
        record: CollectiveRecord | None,
        post: Callable[[], None] | None = None,
        interrupt: Interrupt | None = None,
        p2p: bool = False,
    ) -> None:
        self._work = work
        self._p2p = p2p
        self._result = result
        self._post = post
        self._record = record
        self._interrupt = interrupt
        self._done = work is None
        if self._done and record is not None and record.exit_ns is None:
            record.exit_ns = time.monotonic_ns()

    def wait(self) -> Any:
        if not self._done:
            if self._record is not None:
                self._record.waited = True
            if self._interrupt is not None:
                self._interrupt.wait_for(self._work, self._p2p)
            else:
                self._work.wait()
            if self._post is not None:
                self._post()
            if self._record is not None:
                self._record.exit_ns = time.monotonic_ns()
            self._done = True
        return self._result

    def is_completed(self) -> bool:
        """True once the operation finished (``wait()`` then returns at once)."""
        return self._done or bool(self._work.is_completed())

class _HeldWork:
    """The work of a transfer that fault injection holds (``hangLink``): never completes;
    ``wait()`` calls ``hold`` (forever, unless a test bounds it)."""

    def __init__(self, hold: Callable[[], None]) -> None:
        self._hold = hold

    def wait(self) -> bool:
        self._hold()
        return False

    def is_completed(self) -> bool:
        return False
