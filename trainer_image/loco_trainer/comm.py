"""The communication layer: every byte a strategy exchanges goes through :class:`Comm`.

:class:`Comm` wraps one ``torch.distributed`` process group and adds two things the raw API lacks:

* **Accounting.** Every call counts the bytes this rank sends and receives, per kind of operation,
  following the cost model below, so the metrics and the benchmarks can compare algorithms by
  communication volume rather than by guesswork.
* **A flight recorder.** Every call appends a :class:`CollectiveRecord` (sequence number, kind,
  payload bytes, enter/exit times from :func:`time.monotonic_ns`, peer) to a bounded ring buffer.
  A record is appended when the call is *entered*; its ``exit_ns`` is filled when the operation
  completes (at once for a blocking call, at ``wait()``/future completion for an async one), so a
  record whose ``exit_ns`` is ``None`` is an operation still in flight — what a hang detector reads.

**Fault detection** (docs/fault-detection.md). :meth:`Comm.sync_clock` estimates this rank's clock
offset against global rank 0's wall clock, so :meth:`Comm.export_records` can ship entry/exit times
on one common clock; :meth:`Comm.probe` adds a timing point per log interval and times small transfers on the ring's
connections and on a rotating set of other pairs (the connection matrix when the algorithm has
no point-to-point traffic); a
``fault_hook`` (:class:`loco_trainer.faults.CommFaults`) injects hangs, stragglers, slow links and
stalled connections for tests and demos, and costs one ``is None`` test per call when absent.

Cost model (bytes per rank for a payload of ``S`` bytes in a group of ``n`` ranks; the usual
bandwidth-optimal algorithms, see Thakur et al. 2005 / Patarasuk & Yuan 2009):

=============== ===================================== =========================================
kind            sent                                  received
=============== ===================================== =========================================
all_reduce      2(n-1)/n · S (ring)                   2(n-1)/n · S
reduce_scatter  (n-1)/n · S_input                     (n-1)/n · S_input
all_gather      (n-1)/n · S_output (ring)             (n-1)/n · S_output
broadcast       (n-1) · S on the source (flat tree)   S on every other rank
send / recv     S (exact)                             S (exact)
barrier         0                                     0
=============== ===================================== =========================================

With a group of one rank no collective is issued, nothing is recorded and no byte is counted.

Thread-safety: async completions may run on the backend's thread; counters are updated on the
calling thread at enter time, and the completion only writes ``exit_ns`` of its own record.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

#: Reduction names accepted by :meth:`Comm.all_reduce` (``avg`` is a sum divided by the group size,
#: because gloo has no native average).
REDUCE_OPS = ("avg", "sum", "max", "min")

_NATIVE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}

#: How many different "rotating" shifts :meth:`Comm.probe` cycles through besides the ring (shift 1):
#: shifts 2 .. 9, so every rank sends samples to up to 9 peers (shift 1 and 8 rotating ones) and the
#: detector tracks at most 9 outgoing connections per rank, whatever the world size.
PROBE_ROTATING_SHIFTS = 8
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv", "barrier")


@dataclasses.dataclass(slots=True)
class CollectiveRecord:
    """One communication call as seen by this rank.

    ``seq`` counts this Comm's calls from 0 (identical on every rank of a healthy group, since all
    ranks issue collectives in the same order); ``nbytes`` is the payload size (the tensor's bytes,
    the output's for all_gather); ``enter_ns``/``exit_ns`` are :func:`time.monotonic_ns` values,
    ``exit_ns`` is ``None`` while the operation is in flight; ``peer`` is the group rank of the other
    side of a send/recv, or the source of a broadcast.
    """

    seq: int
    kind: str
    nbytes: int
    enter_ns: int
    exit_ns: int | None = None
    peer: int | None = None
    probe: bool = False  # a fault-detection probe (Comm.probe): kept out of export_records
    #: set when a thread starts waiting for it (CommHandle.wait): an in-flight call nobody waits on
    #: yet may well have moved its data already (gloo completes a transfer only inside wait())
    waited: bool = False

    @property
    def duration_ns(self) -> int | None:
        return None if self.exit_ns is None else self.exit_ns - self.enter_ns


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


class _Counter:
    __slots__ = ("calls", "sent", "recv")

    def __init__(self) -> None:
        self.calls = 0
        self.sent = 0
        self.recv = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """A process group with byte accounting and a flight recorder (see the module docstring).

    ``Comm()`` uses the default group when ``torch.distributed`` is initialised and otherwise acts as
    a group of one (every collective is a no-op), so single-process training needs no special case.
    All ranks of the group must issue the same collectives in the same order (as with any
    ``torch.distributed`` group). Ranks passed to ``src``/``dst`` are ranks *within this group*.
    """

    def __init__(
        self, group: Any | None = None, *, history: int = 4096, fault_hook: Any | None = None, stall_after_s: float = 5.0,
        probe_wait_s: float = 0.05, clock_resync_probes: int = 32, ring_p2p: bool = False, interruptible: bool = False,
        probe_interval_s: float = 0.0,
    ) -> None:
        """``stall_after_s``: a send/recv in flight for longer than this is shipped as a stalled
        connection sample (:meth:`export_links`); keep it below the detector's
        ``hangTimeoutFloorSeconds`` so the sample is there when the hang-comm timeout expires.
        ``probe_wait_s``: how long :meth:`probe` waits for its own transfers before letting them
        finish in the background (see there); 0 never waits. ``clock_resync_probes``: every this
        many probes, :meth:`probe` first re-estimates the clock offset (:meth:`sync_clock`), so
        hosts whose clocks drift apart (tens of ppm without NTP: 0.1 s in an hour) keep a common
        clock on long jobs; 0 never re-estimates. ``ring_p2p``: :func:`all_reduce_flat` (the outer
        all-reduce of the DiLoCo family) runs as :meth:`ring_all_reduce`, whose point-to-point steps
        give every ring connection a transfer time and localise a hang to one connection.
        ``interruptible``: every wait (collectives, point-to-point, probes) can be given up with
        :meth:`interrupt` (live jobs; see :meth:`Interrupt.wait_for`: about 0.1 ms per wait on a
        2-core machine, a few waits per outer step and per log interval). ``probe_interval_s``:
        the shortest time between two :meth:`probe` calls that transfer data (the timing point runs
        at every call); 0 transfers at every call."""
        if history < 1:
            raise ValueError(f"history must be >= 1 (got {history})")
        if not stall_after_s > 0:
            raise ValueError(f"stall_after_s must be > 0 (got {stall_after_s})")
        self.stall_after_s = float(stall_after_s)
        if not probe_wait_s >= 0:
            raise ValueError(f"probe_wait_s must be >= 0 (got {probe_wait_s})")
        self.probe_wait_s = float(probe_wait_s)
        if not probe_interval_s >= 0:
            raise ValueError(f"probe_interval_s must be >= 0 (got {probe_interval_s})")
        self.probe_interval_s = float(probe_interval_s)
        self._last_transfer_probe = -math.inf
        self._transfer_probes = 0
        if clock_resync_probes < 0:
            raise ValueError(f"clock_resync_probes must be >= 0 (got {clock_resync_probes})")
        self.clock_resync_probes = int(clock_resync_probes)
        self.ring_p2p = bool(ring_p2p)
        #: how many times :meth:`sync_clock` ran (the first call plus the periodic re-estimates)
        self.clock_syncs = 0
        #: seqs of p2p records already turned into connection samples (completed / stalled)
        self._p2p_sampled: set[int] = set()
        self._p2p_stalled: set[int] = set()
        #: set by :meth:`interrupt`: the waits of an ``interruptible`` Comm raise :class:`CommInterrupted`
        self.interrupted = Interrupt()
        self._interrupt = self.interrupted if interruptible else None
        self._group = group
        if group is None and not dist.is_initialized():
            self._rank, self._world_size = 0, 1
        else:
            self._rank = dist.get_rank(group)
            self._world_size = dist.get_world_size(group)
            if self._rank < 0:
                raise ValueError("this process is not a member of the given process group")
        self._records: collections.deque[CollectiveRecord] = collections.deque(maxlen=history)
        self._counters = {kind: _Counter() for kind in KINDS}
        self._seq = 0
        self._lock = threading.Lock()
        self._fault_hook = fault_hook
        #: seconds to add to ``monotonic_ns / 1e9`` to get global rank 0's wall clock (see sync_clock)
        self.clock_offset_s = time.time() - time.monotonic()
        self.clock_error_s: float | None = None
        self._links: collections.deque[tuple[int, int, int, float, int, float]] = collections.deque(maxlen=history)
        self._link_id = 0
        self._probes = 0

    # ----------------------------------------------------------------------------- membership

    @classmethod
    def from_ranks(cls, ranks: Sequence[int], *, history: int = 4096, backend: str | None = None) -> "Comm":
        """A Comm over a subset of the default group's ranks (``dist.new_group``).

        Must be called by **every** rank of the default group (a torch requirement), including the
        ranks not in ``ranks``; those get a Comm whose ``is_member`` is False and must not use it.
        """
        ranks = sorted(set(int(r) for r in ranks))
        if not ranks:
            raise ValueError("ranks must name at least one rank")
        group = dist.new_group(ranks=ranks, backend=backend)
        if dist.get_rank() not in ranks:
            return _NonMember(ranks)
        return cls(group, history=history)

    @classmethod
    def new_membership(
        cls,
        *,
        rank: int,
        world_size: int,
        init_method: str,
        backend: str = "gloo",
        timeout_s: float = 300.0,
        history: int = 4096,
    ) -> "Comm":
        """Tear down the default group (if any) and join a new one: the elastic path, used when the
        set of workers changes. Returns a Comm over the new default group."""
        import datetime

        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return cls(None, history=history)

    def carry_counters(self, previous: "Comm") -> None:
        """Start this Comm's byte and call counters from ``previous``'s (a live membership change
        replaces the Comm; the counters a worker exports stay cumulative, as Prometheus expects)."""
        for kind, counter in getattr(previous, "_counters", {}).items():
            mine = self._counters.get(kind)
            if mine is not None:
                mine.calls += counter.calls
                mine.sent += counter.sent
                mine.recv += counter.recv

    @property
    def group(self) -> Any | None:
        """The wrapped ``torch.distributed`` group (``None`` = the default group)."""
        return self._group

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def is_member(self) -> bool:
        return True

    # ----------------------------------------------------------------------------- accounting

    def _enter(
        self, kind: str, nbytes: int, sent: float, recv: float, peer: int | None = None, *, count: bool = True
    ) -> CollectiveRecord:
        """Record a call being entered (``count=False``: recorded, but kept out of the byte counters,
        for the fault-detection probes, so algorithms are still compared on their own traffic).
        An interrupted Comm issues nothing more: it raises :class:`CommInterrupted` here."""
        self._refuse_if_interrupted()
        if self._fault_hook is not None:
            self._fault_hook.before_enter(self._seq, kind, peer)
        with self._lock:
            if count:
                counter = self._counters[kind]
                counter.calls += 1
                counter.sent += int(round(sent))
                counter.recv += int(round(recv))
            record = CollectiveRecord(self._seq, kind, nbytes, time.monotonic_ns(), None, peer)
            self._seq += 1
            self._records.append(record)
        return record

    def stats(self) -> dict[str, Any]:
        """Counters: ``{"bytes_sent", "bytes_received", "calls", "by_kind": {kind: {calls, bytes_sent,
        bytes_received}}}`` (totals over this Comm's life; kinds never used are included as zeros)."""
        with self._lock:
            by_kind = {
                kind: {"calls": c.calls, "bytes_sent": c.sent, "bytes_received": c.recv}
                for kind, c in self._counters.items()
            }
        return {
            "rank": self._rank,
            "world_size": self._world_size,
            "calls": sum(k["calls"] for k in by_kind.values()),
            "bytes_sent": sum(k["bytes_sent"] for k in by_kind.values()),
            "bytes_received": sum(k["bytes_received"] for k in by_kind.values()),
            "by_kind": by_kind,
        }

    def records(self) -> list[CollectiveRecord]:
        """A snapshot of the most recent records (at most ``history``), oldest first, in issue order.
        A record still in flight at the time of the call has ``exit_ns`` None in the snapshot."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._records]

    # ------------------------------------------------------------------------------ collectives

    def all_reduce(self, t: torch.Tensor, op: str = "avg", *, async_op: bool = False) -> Any:
        """Reduce ``t`` in place across the group (``avg``, ``sum``, ``max`` or ``min``).

        Returns ``t`` (blocking) or a :class:`CommHandle` whose ``wait()`` returns ``t`` (async).
        """
        native = _op(op)
        if self._world_size == 1:
            return CommHandle(None, t, None) if async_op else t
        n = self._world_size
        size = _nbytes(t)
        record = self._enter("all_reduce", size, 2 * (n - 1) / n * size, 2 * (n - 1) / n * size)
        post = (lambda: t.div_(n)) if op == "avg" else None
        work = dist.all_reduce(t, op=native, group=self._group, async_op=self._async(async_op, t))
        if async_op:
            return CommHandle(work, t, record, post, self._interrupt_for(t))
        self._block(work)
        if post is not None:
            post()
        record.exit_ns = time.monotonic_ns()
        return t

    def all_reduce_future(self, t: torch.Tensor, op: str = "avg") -> torch.futures.Future:
        """Async all-reduce as a ``torch.futures.Future`` resolving to ``t`` (for DDP comm hooks).
        The record's ``exit_ns`` is set when the future completes."""
        native = _op(op)
        if self._world_size == 1:
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(t)
            return fut
        n = self._world_size
        size = _nbytes(t)
        record = self._enter("all_reduce", size, 2 * (n - 1) / n * size, 2 * (n - 1) / n * size)
        work = dist.all_reduce(t, op=native, group=self._group, async_op=True)

        def done(fut: torch.futures.Future) -> torch.Tensor:
            out = fut.value()[0]
            if op == "avg":
                out.div_(n)
            record.exit_ns = time.monotonic_ns()
            return out

        return work.get_future().then(done)

    def agree(self, t: torch.Tensor, op: str = "max") -> torch.Tensor:
        """A small control all-reduce in place (``max``, ``min``, ``sum``, ``avg``): a flag or a figure every
        rank must agree on, such as the newest membership epoch or a mean for the logs. Neither
        recorded nor counted (it is not the algorithm's traffic), but it waits like every call of
        this Comm, so an interrupt gives it up too."""
        if self._world_size > 1:
            self._refuse_if_interrupted()
            self._blocking(dist.all_reduce, t, op=_op(op), group=self._group, tensor=t)
            if op == "avg":
                t.div_(self._world_size)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0, *, async_op: bool = False) -> Any:
        """Overwrite ``t`` on every rank with the group rank ``src``'s ``t``."""
        self._check_rank(src, "src")
        if self._world_size == 1:
            return CommHandle(None, t, None) if async_op else t
        n = self._world_size
        size = _nbytes(t)
        is_src = self._rank == src
        record = self._enter("broadcast", size, (n - 1) * size if is_src else 0, 0 if is_src else size, peer=src)
        work = dist.broadcast(t, src=self._global_rank(src), group=self._group, async_op=self._async(async_op, t))
        return self._finish(work, t, record, async_op, t)

    def all_gather(self, t: torch.Tensor, *, async_op: bool = False) -> Any:
        """Gather ``t`` from every rank: returns a list of ``world_size`` tensors (or a handle whose
        ``wait()`` returns it), entry ``i`` from group rank ``i``."""
        if self._world_size == 1:
            out = [t.clone()]
            return CommHandle(None, out, None) if async_op else out
        n = self._world_size
        out = [torch.empty_like(t) for _ in range(n)]
        total = _nbytes(t) * n
        record = self._enter("all_gather", total, (n - 1) / n * total, (n - 1) / n * total)
        work = dist.all_gather(out, t.contiguous(), group=self._group, async_op=self._async(async_op, t))
        return self._finish(work, out, record, async_op, t)

    def reduce_scatter(self, output: torch.Tensor, inputs: list[torch.Tensor], op: str = "avg", *, async_op: bool = False) -> Any:
        """Reduce ``inputs`` (one tensor per rank) and leave chunk ``rank`` in ``output``."""
        native = _op(op)
        if len(inputs) != self._world_size:
            raise ValueError(f"reduce_scatter needs {self._world_size} input tensors (one per rank), got {len(inputs)}")
        if self._world_size == 1:
            output.copy_(inputs[0])
            return CommHandle(None, output, None) if async_op else output
        n = self._world_size
        total = sum(_nbytes(x) for x in inputs)
        record = self._enter("reduce_scatter", total, (n - 1) / n * total, (n - 1) / n * total)
        work = dist.reduce_scatter(output, inputs, op=native, group=self._group, async_op=self._async(async_op, output))
        post = (lambda: output.div_(n)) if op == "avg" else None
        if async_op:
            return CommHandle(work, output, record, post, self._interrupt_for(output))
        self._block(work)
        if post is not None:
            post()
        record.exit_ns = time.monotonic_ns()
        return output

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Blocking send of ``t`` to group rank ``dst``."""
        self.isend(t, dst).wait()

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Blocking receive into ``t`` from group rank ``src``; returns ``t``."""
        return self.irecv(t, src).wait()

    def isend(self, t: torch.Tensor, dst: int) -> CommHandle:
        self._check_peer(dst, "dst")
        size = _nbytes(t)
        record = self._enter("send", size, size, 0, peer=dst)
        if self._held(record.seq, "send", dst):
            return CommHandle(_HeldWork(self._fault_hook.hold), t, record)
        self._transfer_delay("send", dst)
        work = dist.isend(t, dst=self._global_rank(dst), group=self._group)
        return CommHandle(work, t, record, interrupt=self._interrupt, p2p=True)

    def irecv(self, t: torch.Tensor, src: int) -> CommHandle:
        self._check_peer(src, "src")
        size = _nbytes(t)
        record = self._enter("recv", size, 0, size, peer=src)
        work = dist.irecv(t, src=self._global_rank(src), group=self._group)
        return CommHandle(work, t, record, interrupt=self._interrupt, p2p=True)

    def batch_isend_irecv(self, ops: Iterable[tuple[str, torch.Tensor, int]]) -> list[CommHandle]:
        """Post several point-to-point operations at once: ``ops`` are ``("send"|"recv", tensor,
        peer)`` triples. Returns one handle per op; wait on all of them. Posting sends and receives
        together avoids the deadlock of two ranks both blocking in ``send`` first."""
        ops = list(ops)
        for kind, _, peer in ops:
            if kind not in ("send", "recv"):
                raise ValueError(f"batch_isend_irecv op kind must be 'send' or 'recv', got {kind!r}")
            self._check_peer(peer, "peer")
        # every op is recorded first (they are posted together), then injected faults apply
        records = [self._enter(kind, _nbytes(t), _nbytes(t) if kind == "send" else 0,
                               _nbytes(t) if kind == "recv" else 0, peer=peer) for kind, t, peer in ops]
        p2p, posted = [], []
        for i, ((kind, t, peer), record) in enumerate(zip(ops, records)):
            if self._held(record.seq, kind, peer):
                continue  # a stalled connection: never posted, its handle never completes
            self._transfer_delay(kind, peer)
            fn = dist.isend if kind == "send" else dist.irecv
            p2p.append(dist.P2POp(fn, t, self._global_rank(peer), group=self._group))
            posted.append(i)
        handles: list[CommHandle | None] = [None] * len(ops)
        if p2p:
            works = dist.batch_isend_irecv(p2p)
            # some backends return a single work for the whole batch: every handle waits on it
            works = works if len(works) == len(p2p) else [works[0]] * len(p2p)
            for i, w in zip(posted, works):
                handles[i] = CommHandle(w, ops[i][1], records[i], interrupt=self._interrupt, p2p=True)
        return [h if h is not None else CommHandle(_HeldWork(self._fault_hook.hold), ops[i][1], records[i])
                for i, h in enumerate(handles)]

    @torch.no_grad()
    def ring_all_reduce(self, t: torch.Tensor, op: str = "avg") -> torch.Tensor:
        """All-reduce ``t`` in place as a ring of point-to-point steps (reduce-scatter, then
        all-gather: ``2(n-1)`` steps, each sending one ``1/n`` chunk to ``rank + 1`` while receiving
        one from ``rank - 1``), the algorithm gloo and NCCL run inside ``all_reduce``, done here in
        the open. Same bytes as :meth:`all_reduce` (``2(n-1)/n`` of ``t`` per rank), recorded as
        ``send``/``recv`` calls, so every ring connection gets a transfer time
        (:meth:`scan_p2p`) and a connection that stops moving data shows up as a stalled sample for
        that one connection: C4's communication hang, localised. ``op``: ``"avg"`` or ``"sum"``. A
        tensor with fewer elements than ranks goes through :meth:`all_reduce`. Blocking."""
        if op not in ("avg", "sum"):
            raise ValueError(f"ring_all_reduce op must be 'avg' or 'sum', got {op!r}")
        n = self._world_size
        if n == 1:
            return t
        if t.numel() < n or not t.is_contiguous():
            return self.all_reduce(t, op=op)
        flat = t.view(-1)
        chunks = list(torch.tensor_split(flat, n))
        right, left, r = (self._rank + 1) % n, (self._rank - 1) % n, self._rank
        buf = torch.empty_like(chunks[0])
        for s in range(n - 1):  # reduce-scatter: afterwards chunk (r + 1) % n holds the full sum
            send, recv = chunks[(r - s) % n], chunks[(r - s - 1) % n]
            incoming = buf[: recv.numel()]
            for handle in self.batch_isend_irecv([("send", send, right), ("recv", incoming, left)]):
                handle.wait()
            recv.add_(incoming)
        for s in range(n - 1):  # all-gather: pass the reduced chunks around the ring
            send, recv = chunks[(r + 1 - s) % n], chunks[(r - s) % n]
            for handle in self.batch_isend_irecv([("send", send, right), ("recv", recv, left)]):
                handle.wait()
        if op == "avg":
            flat.div_(n)
        return t

    def interrupt(self) -> None:
        """Give up this Comm's pending and future point-to-point waits (``interruptible`` Comms): they
        raise :class:`CommInterrupted` at once. Called (from any thread) just before the process group
        is aborted, whose own transfers gloo's abort does not wake (see :class:`CommHandle`)."""
        self.interrupted.set()

    def barrier(self) -> None:
        """Block until every rank of the group reached the barrier."""
        if self._world_size == 1:
            return
        record = self._enter("barrier", 0, 0, 0)
        self._blocking(dist.barrier, group=self._group)
        record.exit_ns = time.monotonic_ns()

    # ------------------------------------------------------------------------- fault detection

    def _held(self, seq: int, kind: str, peer: int) -> bool:
        """Whether fault injection holds call ``seq`` (a ``kind`` to group rank ``peer``) forever."""
        return self._fault_hook is not None and self._fault_hook.holds_send(seq, kind, self._global_rank(peer))

    def _transfer_delay(self, kind: str, peer: int) -> None:
        if self._fault_hook is not None:
            delay = self._fault_hook.transfer_delay_s(kind, self._global_rank(peer))
            if delay:
                time.sleep(delay)

    def sync_clock(self, rounds: int = 5) -> float:
        """Estimate this rank's offset to global rank 0's wall clock; collective (every rank calls it).

        Each round, all ranks leave a barrier together; rank 0's wall clock and every rank's
        monotonic clock are read at that moment and gathered; the offset is the median over the
        rounds of ``rank0_wall - my_monotonic``. Its error is the spread with which ranks leave a
        barrier (sub-millisecond on one host, about one network latency across hosts), far below
        the detector's ``minLatenessSeconds``. The calls go through plain ``torch.distributed`` so
        they leave no record. Returns and stores :attr:`clock_offset_s`; :attr:`clock_error_s` is the
        spread of the rounds (max - min of the estimates).
        """
        if self._world_size == 1:
            self.clock_syncs += 1
            self.clock_offset_s = time.time() - time.monotonic()
            self.clock_error_s = 0.0
            return self.clock_offset_s
        estimates = []
        root = self._global_rank(0)
        for _ in range(max(1, rounds)):
            self._blocking(dist.barrier, group=self._group)
            mono = time.monotonic()
            wall = time.time()
            t = torch.tensor([wall if self._rank == 0 else 0.0], dtype=torch.float64)
            self._blocking(dist.broadcast, t, src=root, group=self._group)
            estimates.append(float(t.item()) - mono)
        estimates.sort()
        self.clock_syncs += 1
        self.clock_offset_s = estimates[len(estimates) // 2]
        self.clock_error_s = estimates[-1] - estimates[0]
        return self.clock_offset_s

    def probe(self, nbytes: int = 4096, *, links: bool = True) -> None:
        """A timing point for the detector and, at most every ``probe_interval_s``, one small timed
        transfer per rank on each of two connections; collective (every rank calls it).

        ``links=False`` (an algorithm whose own point-to-point traffic already samples every
        connection, :meth:`Strategy.p2p_covers_links`) keeps only the probe's cadence: the periodic
        clock re-estimate below, no timing point, no transfer.

        **Timing point.** The call opens with an 8-byte all-reduce, recorded as a collective (kind
        ``barrier``, not counted in :meth:`stats`) and shipped by :meth:`export_records`: each
        rank's entry time is its arrival at the log boundary, a timing point between the
        algorithm's own syncs. It also agrees, as the maximum over ranks, on whether the transfers
        are due: a rank wants them when ``probe_interval_s`` passed since the last ones (every
        call when 0), so on a job with short steps the transfers cost a bounded share of the time
        while the timing point stays at every log interval.

        **Transfers** (when due). Rank ``r`` sends to ``r + shift`` and receives from
        ``r - shift`` for two shifts: 1, the ring the outer all-reduce runs on
        (:meth:`ring_all_reduce`), whose connections are therefore sampled at every transfer
        probe, so a slow connection the training uses is convicted within ``consecutive`` probes;
        and a rotating shift ``2 + k % min(n - 2, PROBE_ROTATING_SHIFTS)`` (``k`` counts the
        transfer probes; none when ``n == 2``), which gives every rank samples with several other
        peers, so a slow node or NIC shows in its whole row, and with ``n <= 10`` covers every
        ordered pair every ``n - 2`` probes. The number of connections sampled stays ``<= 2 n``
        per probe and ``<= 9 n`` in all, however large the job. The receives are recorded
        first, then the sends, shift by shift, on every rank, so the sequence numbers stay aligned;
        injected faults apply to all of them. The call does not wait for the transfers: one helper
        thread per transfer waits (so a slow link delays neither this rank nor its peer's
        training, as it would not in a real asynchronous probe), and each receive time, from the
        opening all-reduce's exit to arrival, becomes one connection sample ``(src, dst,
        seconds)`` in global ranks for :meth:`export_links`. The next call first waits for the
        previous one. Probe traffic is recorded but not counted in :meth:`stats`.

        The call then waits up to ``probe_wait_s`` for its own transfers and leaves through a
        barrier, so a healthy probe (about a millisecond) is measured while no rank trains:
        neither a trainer's CPU work nor its hold on the GIL delays the helper threads' timestamps.
        (Measured while training went on, on a shared 2-core host, healthy millisecond links read
        20-40 ms, several probes in a row: false slow-link restarts.) A slower or stalled transfer
        finishes in the background, so a bad connection delays training by at most ``probe_wait_s``.
        Each sender also ships how late it posted the send after the opening all-reduce; the
        receiver subtracts it, so a sender's scheduling delay is not counted as connection time.
        """
        if self._world_size == 1:
            return
        # The opening collective is one every rank enters at the same step: recorded (and shipped)
        # as a barrier, it gives the detector a timing point per log interval between the
        # algorithm's syncs, so a straggler or a stopped rank shows long before the next outer
        # all-reduce (docs/fault-detection.md, "Probes"). Entered before waiting for the previous
        # probe's transfers, so a slow connection never makes its endpoints look late.
        opening = self._enter("barrier", 0, 0, 0, count=False) if links else None
        self.finish_probe()
        if self.clock_resync_probes and self._probes and self._probes % self.clock_resync_probes == 0:
            self.sync_clock(rounds=3)  # collective: every rank probes the same number of times
        self._probes += 1
        if not links:
            return
        now = time.monotonic()
        due = torch.tensor([1.0 if now - self._last_transfer_probe >= self.probe_interval_s else 0.0])
        # the timing point; agrees on `due`
        self._blocking(dist.all_reduce, due, op=dist.ReduceOp.MAX, group=self._group)
        start = opening.exit_ns = time.monotonic_ns()
        if not due.item():
            return
        self._last_transfer_probe = now
        n = self._world_size
        shifts = [1]
        if n > 2:
            shifts.append(2 + self._transfer_probes % min(n - 2, PROBE_ROTATING_SHIFTS))
        self._transfer_probes += 1
        threads: list[threading.Thread] = []
        for shift in shifts:
            threads += self._probe_transfer(shift, nbytes, start)
        self._probe_threads = threads
        for t in threads:
            t.start()
        if self.probe_wait_s:
            deadline = time.monotonic() + self.probe_wait_s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            # nobody resumes training while a peer still measures: a rank back at work would take
            # the CPU from a peer whose receive thread has yet to wake up (on a shared host the
            # healthy samples then read 20-40 ms instead of 1 ms)
            self._blocking(dist.barrier, group=self._group)

    def _probe_transfer(self, shift: int, nbytes: int, start: int) -> list[threading.Thread]:
        """Post one probe transfer (send to ``rank + shift``, receive from ``rank - shift``) and
        return its two not yet started helper threads (see :meth:`probe`)."""
        n = self._world_size
        out = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
        inp = torch.empty_like(out)
        dst, src = (self._rank + shift) % n, (self._rank - shift) % n
        src_global, me_global = self._global_rank(src), self._global_rank(self._rank)
        recv_record = self._enter("recv", _nbytes(inp), 0, 0, peer=src, count=False)
        recv_record.probe = True
        receive = CommHandle(dist.irecv(inp, src=src_global, group=self._group), inp, recv_record)
        send_record = self._enter("send", _nbytes(out), 0, 0, peer=dst, count=False)
        send_record.probe = True

        def do_send() -> None:
            if self._held(send_record.seq, "send", dst):
                send_record.waited = True
                self._fault_hook.hold()  # a stalled connection: the send never completes
                return
            # how late this rank posts the send after leaving the opening all-reduce (a CPU-starved
            # process, a thread waiting for the GIL): shipped in the payload, the receiver subtracts
            # it, so the sample times the connection, not the sender's scheduling. Taken before an
            # injected link delay, which stands for the connection itself being slow.
            out[0] = (time.monotonic_ns() - start) / 1e9
            self._transfer_delay("send", dst)
            CommHandle(dist.isend(out, dst=self._global_rank(dst), group=self._group), out, send_record).wait()

        def do_receive() -> None:
            receive.wait()
            elapsed = (time.monotonic_ns() - start) / 1e9
            sender_late = float(inp[0])
            # a sender later than the whole wait (the receiver left the barrier after it): connection ~0
            seconds = max(elapsed - sender_late, 1e-6) if sender_late >= 0.0 else elapsed
            with self._lock:
                self._links.append((self._link_id, src_global, me_global, seconds, _nbytes(inp), start / 1e9))
                self._link_id += 1

        return [threading.Thread(target=fn, name=f"loco-probe-{fn.__name__}-{shift}", daemon=True)
                for fn in (do_send, do_receive)]

    def finish_probe(self, timeout_s: float | None = None) -> None:
        """Wait for the transfers of the last :meth:`probe` (a no-op when none is outstanding); on an
        interruptible Comm, raises :class:`CommInterrupted` when interrupted meanwhile (a transfer
        to a peer that is gone may otherwise wait out the group's timeout)."""
        threads, self._probe_threads = getattr(self, "_probe_threads", []), []
        for t in threads:
            if self._interrupt is None:
                t.join(timeout_s)
                continue
            end = math.inf if timeout_s is None else time.monotonic() + timeout_s
            while t.is_alive() and not self._interrupt.is_set() and time.monotonic() < end:
                t.join(0.01)  # only while a transfer is still out: normally it finished long ago
            if t.is_alive() and self._interrupt.is_set():
                raise CommInterrupted(_INTERRUPTED)

    def export_records(self, since_seq: int = -1, limit: int = 512) -> list[dict[str, Any]]:
        """Records (probes excluded: they are shipped as :meth:`export_links` samples) with
        ``seq > since_seq`` (at most the ``limit`` oldest of them; with a negative
        ``since_seq``, the ``limit`` newest records), as wire dicts
        ``{seq, kind, nbytes, enterS, exitS, peer}`` with times on the common clock (seconds of rank
        0's wall clock, see :meth:`sync_clock`); ``exitS`` is null while in flight."""
        off = self.clock_offset_s
        with self._lock:
            # probes are left out: their entry times measure a barrier's exit, not a rank's work
            if since_seq < 0:  # a reader with no cursor yet starts from the newest records
                picked = [r for r in self._records if not r.probe][-limit:]
            else:
                picked = [r for r in self._records if r.seq > since_seq and not r.probe][:limit]
            return [
                {"seq": r.seq, "kind": r.kind, "nbytes": r.nbytes, "enterS": r.enter_ns / 1e9 + off,
                 "exitS": None if r.exit_ns is None else r.exit_ns / 1e9 + off, "peer": r.peer}
                for r in picked
            ]

    def export_links(self, since_id: int = -1, limit: int = 512) -> list[dict[str, Any]]:
        """Connection samples with ``id > since_id`` (at most ``limit``), as wire dicts
        ``{id, src, dst, seconds, nbytes, atS}`` (global ranks, common clock): probe samples, one
        sample per completed point-to-point receive, and stalled connections (``seconds`` null),
        see :meth:`scan_p2p`, which this calls first."""
        self.scan_p2p()
        off = self.clock_offset_s
        with self._lock:
            picked = list(self._links)[-limit:] if since_id < 0 else [x for x in self._links if x[0] > since_id][:limit]
        return [{"id": i, "src": s, "dst": d, "seconds": None if sec == float("inf") else sec, "nbytes": nb,
                 "atS": at + off} for i, s, d, sec, nb, at in picked]

    def scan_p2p(self, now_ns: int | None = None) -> int:
        """Turn the point-to-point records into connection samples; returns how many were added.

        * A **completed receive** (``recv``, not a probe) from group rank ``p`` becomes the sample
          ``(global(p) -> me, exit - enter)``: the transfer time of that connection, so send/recv
          algorithms (NoLoCo's gossip) fill the connection matrix with no extra probe. It includes
          the time the receiver waited for the sender to post (ranks post their exchange together,
          so that is their arrival skew; a straggling sender is also named by the straggler rule).
        * A **send or receive in flight** (probes included) for longer than ``stall_after_s``, that a
          thread is waiting for, becomes a stalled sample ``seconds = inf`` (null on the wire) for
          its direction, once: what lets the detector's hang-comm rule blame that connection. A call
          nobody waits on yet is not judged (gloo completes a transfer only inside ``wait()``, so a
          receive queued behind a stalled send would otherwise look stalled too). If it later
          completes, the receive's sample tells the detector the connection moves data again.

        Called from :meth:`export_links` (the progress server's thread); ``now_ns`` defaults to
        :func:`time.monotonic_ns`.
        """
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        stall_ns = int(self.stall_after_s * 1e9)
        me = self._global_rank(self._rank)
        added = 0
        with self._lock:
            oldest = self._records[0].seq if self._records else 0
            for r in self._records:
                if r.peer is None or r.kind not in ("send", "recv") or r.seq in self._p2p_sampled:
                    continue
                peer = self._global_rank(r.peer)
                src, dst = (me, peer) if r.kind == "send" else (peer, me)
                if r.exit_ns is None:
                    if r.waited and now_ns - r.enter_ns > stall_ns and r.seq not in self._p2p_stalled:
                        self._p2p_stalled.add(r.seq)
                        self._links.append((self._link_id, src, dst, float("inf"), r.nbytes, r.enter_ns / 1e9))
                        self._link_id += 1
                        added += 1
                    continue
                if r.kind == "recv" and not r.probe:  # probes add their own sample (Comm.probe)
                    self._links.append((self._link_id, src, dst, (r.exit_ns - r.enter_ns) / 1e9, r.nbytes, r.enter_ns / 1e9))
                    self._link_id += 1
                    added += 1
                self._p2p_sampled.add(r.seq)
            # forget seqs that left the ring buffer (bounded memory)
            self._p2p_sampled = {q for q in self._p2p_sampled if q >= oldest}
            self._p2p_stalled = {q for q in self._p2p_stalled if q >= oldest}
        return added

    # ------------------------------------------------------------------------------- helpers

    def _finish(self, work: Any, result: Any, record: CollectiveRecord, async_op: bool, t: torch.Tensor) -> Any:
        if async_op:
            return CommHandle(work, result, record, interrupt=self._interrupt_for(t))
        self._block(work)
        record.exit_ns = time.monotonic_ns()
        return result

    def _async(self, async_op: bool, t: torch.Tensor | None = None) -> bool:
        """Whether to issue a collective asynchronously: when the caller asked, and always on an
        interruptible Comm for CPU tensors (gloo), whose blocking calls then wait in :meth:`_block`.
        CUDA tensors (NCCL) keep NCCL's own semantics: a blocking call or a wait only orders the
        stream and does not block the CPU, and NCCL's abort of a group ends its pending work."""
        return async_op or (self._interrupt_for(t) is not None)

    def _interrupt_for(self, t: torch.Tensor | None) -> Interrupt | None:
        """This Comm's interrupt for a call on ``t`` (None: a CUDA tensor, see :meth:`_async`)."""
        return self._interrupt if t is None or t.device.type != "cuda" else None

    def _refuse_if_interrupted(self) -> None:
        """An interrupted Comm issues nothing more (see :meth:`interrupt`)."""
        if self._interrupt is not None and self._interrupt.is_set():
            raise CommInterrupted(_INTERRUPTED)

    def _blocking(self, collective: Callable[..., Any], *args: Any, tensor: torch.Tensor | None = None, **kwargs: Any) -> None:
        """Run the ``torch.distributed`` call ``collective(*args, **kwargs)`` to completion, waiting
        as :meth:`_block` does (interruptibly on an interruptible Comm, unless ``tensor`` is on CUDA)."""
        self._block(collective(*args, async_op=self._async(False, tensor), **kwargs))

    def _block(self, work: Any) -> None:
        """Complete a collective the caller wanted blocking (``work`` is None when it was issued so)."""
        if work is not None:
            if self._interrupt is not None:
                self._interrupt.wait_for(work)
            else:
                work.wait()

    def _check_rank(self, r: int, what: str) -> None:
        if not 0 <= r < self._world_size:
            raise ValueError(f"{what}={r} is not a rank of this group (0..{self._world_size - 1})")

    def _check_peer(self, r: int, what: str) -> None:
        self._check_rank(r, what)
        if r == self._rank:
            raise ValueError(f"{what}={r} is this rank itself: point-to-point needs another rank")

    def _global_rank(self, group_rank: int) -> int:
        if self._group is None:
            return group_rank
        return dist.get_global_rank(self._group, group_rank)

    def __repr__(self) -> str:
        return f"Comm(rank={self._rank}, world_size={self._world_size})"


class _NonMember(Comm):
    """What :meth:`Comm.from_ranks` returns on a rank outside the subgroup: any use is an error."""

    def __init__(self, ranks: Sequence[int]) -> None:  # noqa: D107 - deliberately not calling super
        self._ranks = list(ranks)

    @property
    def is_member(self) -> bool:
        return False

    def __getattribute__(self, name: str) -> Any:
        if name in ("is_member", "_ranks", "__class__", "__repr__"):
            return object.__getattribute__(self, name)
        raise RuntimeError(
            f"this rank is not a member of the group {object.__getattribute__(self, '_ranks')}; "
            f"check comm.is_member before using it"
        )

    def __repr__(self) -> str:
        return f"Comm(non-member of ranks {self._ranks})"


def _op(op: str) -> Any:
    try:
        return _NATIVE_OPS[op]
    except KeyError:
        raise ValueError(f"op must be one of {', '.join(REDUCE_OPS)} (got {op!r})") from None


@torch.no_grad()
def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous 1-D tensor holding ``tensors`` back to back (all must share dtype/device)."""
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0)


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the consecutive slices of ``flat`` back into ``tensors`` (inverse of :func:`flatten`)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Split tensor indices into consecutive buckets of at most ``bucket_bytes`` (a tensor larger
    than the cap gets a bucket of its own). Pure function of the sizes, so identical on all ranks."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1 (got {bucket_bytes})")
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
        nb = _nbytes(t)
        if current and size + nb > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += nb
    if current:
        out.append(current)
    return out


def _in_flat_buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int, collective: Callable[[torch.Tensor], None]) -> None:
    """Run ``collective`` in place on few large flat buffers: ``tensors`` are grouped by
    (dtype, device), packed into buckets of at most ``bucket_bytes``, and unpacked afterwards."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        for idx in buckets(group, bucket_bytes):
            members = [group[i] for i in idx]
            flat = flatten(members)
            collective(flat)
            unflatten_into(flat, members)


@torch.no_grad()
def all_reduce_flat(comm: Comm, tensors: Sequence[torch.Tensor], op: str = "avg", bucket_bytes: int = 32 << 20) -> None:
    """All-reduce ``tensors`` in place through few large collectives (see :func:`_in_flat_buckets`)."""
    if comm.world_size == 1 or not tensors:
        return
    if getattr(comm, "ring_p2p", False) and op in ("avg", "sum"):
        _in_flat_buckets(tensors, bucket_bytes, lambda flat: comm.ring_all_reduce(flat, op=op))
        return
    _in_flat_buckets(tensors, bucket_bytes, lambda flat: comm.all_reduce(flat, op=op))


@torch.no_grad()
def broadcast_flat(comm: Comm, tensors: Sequence[torch.Tensor], src: int = 0, bucket_bytes: int = 32 << 20) -> None:
    """Overwrite ``tensors`` on every rank with group rank ``src``'s values, packed into few large
    broadcasts (see :func:`_in_flat_buckets`)."""
    if comm.world_size == 1 or not tensors:
        return
    _in_flat_buckets(tensors, bucket_bytes, lambda flat: comm.broadcast(flat, src=src))
