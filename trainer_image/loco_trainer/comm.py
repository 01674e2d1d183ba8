"""The communication layer: every byte a strategy exchanges goes through :class:`Comm`.

:class:`Comm` wraps one ``torch.distributed`` process group and adds two things the raw API lacks:

* **Accounting.** Every call counts the bytes this rank sends and receives, per kind of operation,
  following the cost model below, so the metrics and the benchmarks can compare algorithms by
  communication volume rather than by guesswork.
* **A flight recorder.** Every call is recorded, entered and completed, in the Comm's
  :class:`~loco_trainer.flight_recorder.FlightRecorder` (:attr:`Comm.recorder`), which ships the records
  and connection samples in the progress protocol's shape.

**Fault detection** (docs/fault-detection.md). The clock sync and the probes live beside the collectives, in
:mod:`loco_trainer.probes` (:meth:`Comm.sync_clock` and :meth:`Comm.probe` call them); a
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

import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from loco_contract.protocol import CollectiveSummary, LinkSummary
from loco_trainer.flight_recorder import KINDS, CollectiveRecord, FlightRecorder
from loco_trainer.probes import PROBE_ROTATING_SHIFTS, Prober, sync_clock
from loco_trainer.waits import _INTERRUPTED, CommHandle, CommInterrupted, Interrupt, _HeldWork

__all__ = ["Comm", "CommHandle", "CommInterrupted", "CollectiveRecord", "Interrupt", "KINDS", "PROBE_ROTATING_SHIFTS",
           "REDUCE_OPS", "all_reduce_flat", "broadcast_flat", "buckets", "flatten", "unflatten_into"]

#: Reduction names accepted by :meth:`Comm.all_reduce` (``avg`` is a sum divided by the group size,
#: because gloo has no native average).
REDUCE_OPS = ("avg", "sum", "max", "min")

_NATIVE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}

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
        if not probe_wait_s >= 0:
            raise ValueError(f"probe_wait_s must be >= 0 (got {probe_wait_s})")
        self.probe_wait_s = float(probe_wait_s)
        if not probe_interval_s >= 0:
            raise ValueError(f"probe_interval_s must be >= 0 (got {probe_interval_s})")
        self.probe_interval_s = float(probe_interval_s)
        if clock_resync_probes < 0:
            raise ValueError(f"clock_resync_probes must be >= 0 (got {clock_resync_probes})")
        self.clock_resync_probes = int(clock_resync_probes)
        self.ring_p2p = bool(ring_p2p)
        #: every call this Comm makes, and the connection samples (loco_trainer.flight_recorder)
        self.recorder = FlightRecorder(history, stall_after_s)
        self.stall_after_s = self.recorder.stall_after_s
        self._prober = Prober(self)
        #: set by :meth:`interrupt`: the waits of an ``interruptible`` Comm raise :class:`CommInterrupted`
        self.interrupted = Interrupt()
        self.interruptible = bool(interruptible)
        self._interrupt = self.interrupted if interruptible else None
        self._group = group
        if group is None and not dist.is_initialized():
            self._rank, self._world_size = 0, 1
        else:
            self._rank = dist.get_rank(group)
            self._world_size = dist.get_world_size(group)
            if self._rank < 0:
                raise ValueError("this process is not a member of the given process group")
        self._counters = {kind: _Counter() for kind in KINDS}
        self._lock = threading.Lock()  # the byte counters
        self.fault_hook = fault_hook

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

    def open_record(
        self, kind: str, nbytes: int, sent: float, recv: float, peer: int | None = None, *, count: bool = True
    ) -> CollectiveRecord:
        """Record a call being entered (``count=False``: recorded, but kept out of the byte counters,
        for the fault-detection probes, so algorithms are still compared on their own traffic).
        An interrupted Comm issues nothing more: it raises :class:`CommInterrupted` here."""
        self._refuse_if_interrupted()
        if self.fault_hook is not None:
            self.fault_hook.before_enter(self.recorder.next_seq, kind, peer)
        if count:
            with self._lock:
                counter = self._counters[kind]
                counter.calls += 1
                counter.sent += int(round(sent))
                counter.recv += int(round(recv))
        return self.recorder.enter(kind, nbytes, peer)

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
        return self.recorder.records()

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
        record = self.open_record("all_reduce", size, 2 * (n - 1) / n * size, 2 * (n - 1) / n * size)
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
        record = self.open_record("all_reduce", size, 2 * (n - 1) / n * size, 2 * (n - 1) / n * size)
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
            self.blocking(dist.all_reduce, t, op=_op(op), group=self._group, tensor=t)
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
        record = self.open_record("broadcast", size, (n - 1) * size if is_src else 0, 0 if is_src else size, peer=src)
        work = dist.broadcast(t, src=self.global_rank(src), group=self._group, async_op=self._async(async_op, t))
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
        record = self.open_record("all_gather", total, (n - 1) / n * total, (n - 1) / n * total)
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
        record = self.open_record("reduce_scatter", total, (n - 1) / n * total, (n - 1) / n * total)
        work = dist.reduce_scatter(output, inputs, op=native, group=self._group, async_op=self._async(async_op, output))
        post = (lambda: output.div_(n)) if op == "avg" else None
        if async_op:
            return CommHandle(work, output, record, post, self._interrupt_for(output))
        self._block(work)
        if post is not None:
            post()
        record.exit_ns = time.monotonic_ns()
        return output

    def exchange_chunks(self, chunks: Sequence[torch.Tensor], *, async_op: bool = False) -> Any:
        """Send ``chunks[i]`` to group rank ``i`` (one 1-D chunk per rank, all of one size and dtype) and receive one
        chunk from every rank: returns a list of ``world_size`` tensors (or a handle whose ``wait()`` returns it),
        entry ``j`` from group rank ``j``. The first half of a reduce-scatter whose reduction the caller does (the
        chunks are encoded payloads, e.g. 4-bit ones, that a native reduce-scatter could not sum), so it is
        recorded and counted as a ``reduce_scatter``: (n−1) chunks sent, (n−1) received."""
        n = self._world_size
        if len(chunks) != n:
            raise ValueError(f"exchange_chunks needs {n} chunks (one per rank), got {len(chunks)}")
        if n == 1:
            out = [chunks[0].clone()]
            return CommHandle(None, out, None) if async_op else out
        if len({(c.numel(), c.dtype) for c in chunks}) != 1:
            raise ValueError("exchange_chunks needs chunks of one size and dtype")
        inputs = torch.cat([c.reshape(-1) for c in chunks])
        output = torch.empty_like(inputs)
        size = _nbytes(chunks[0])
        record = self.open_record("reduce_scatter", size * n, (n - 1) * size, (n - 1) * size)
        work = dist.all_to_all_single(output, inputs, group=self._group, async_op=self._async(async_op, inputs))
        return self._finish(work, list(output.view(n, -1).unbind(0)), record, async_op, inputs)

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Blocking send of ``t`` to group rank ``dst``."""
        self.isend(t, dst).wait()

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Blocking receive into ``t`` from group rank ``src``; returns ``t``."""
        return self.irecv(t, src).wait()

    def isend(self, t: torch.Tensor, dst: int) -> CommHandle:
        self._check_peer(dst, "dst")
        size = _nbytes(t)
        record = self.open_record("send", size, size, 0, peer=dst)
        if self.holds_send(record.seq, "send", dst):
            return CommHandle(_HeldWork(self.fault_hook.hold), t, record)
        self.delay_transfer("send", dst)
        work = dist.isend(t, dst=self.global_rank(dst), group=self._group)
        return CommHandle(work, t, record, interrupt=self._interrupt, p2p=True)

    def irecv(self, t: torch.Tensor, src: int) -> CommHandle:
        self._check_peer(src, "src")
        size = _nbytes(t)
        record = self.open_record("recv", size, 0, size, peer=src)
        work = dist.irecv(t, src=self.global_rank(src), group=self._group)
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
        records = [self.open_record(kind, _nbytes(t), _nbytes(t) if kind == "send" else 0,
                               _nbytes(t) if kind == "recv" else 0, peer=peer) for kind, t, peer in ops]
        p2p, posted = [], []
        for i, ((kind, t, peer), record) in enumerate(zip(ops, records)):
            if self.holds_send(record.seq, kind, peer):
                continue  # a stalled connection: never posted, its handle never completes
            self.delay_transfer(kind, peer)
            fn = dist.isend if kind == "send" else dist.irecv
            p2p.append(dist.P2POp(fn, t, self.global_rank(peer), group=self._group))
            posted.append(i)
        handles: list[CommHandle | None] = [None] * len(ops)
        if p2p:
            works = dist.batch_isend_irecv(p2p)
            # some backends return a single work for the whole batch: every handle waits on it
            works = works if len(works) == len(p2p) else [works[0]] * len(p2p)
            for i, w in zip(posted, works):
                handles[i] = CommHandle(w, ops[i][1], records[i], interrupt=self._interrupt, p2p=True)
        return [h if h is not None else CommHandle(_HeldWork(self.fault_hook.hold), ops[i][1], records[i])
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
        record = self.open_record("barrier", 0, 0, 0)
        self.blocking(dist.barrier, group=self._group)
        record.exit_ns = time.monotonic_ns()

    # ------------------------------------------------------------------------- fault detection

    def holds_send(self, seq: int, kind: str, peer: int) -> bool:
        """Whether fault injection holds call ``seq`` (a ``kind`` to group rank ``peer``) forever."""
        return self.fault_hook is not None and self.fault_hook.holds_send(seq, kind, self.global_rank(peer))

    def delay_transfer(self, kind: str, peer: int) -> None:
        """Sleep as long as fault injection slows a ``kind`` to group rank ``peer`` (a slow link)."""
        if self.fault_hook is not None:
            delay = self.fault_hook.transfer_delay_s(kind, self.global_rank(peer))
            if delay:
                time.sleep(delay)

    def sync_clock(self, rounds: int = 5) -> float:
        """Estimate this rank's offset to global rank 0's wall clock (collective; :func:`loco_trainer.probes.sync_clock`)."""
        return sync_clock(self, rounds)

    def probe(self, nbytes: int = 4096, *, links: bool = True) -> None:
        """A timing point for the detector and, at most every ``probe_interval_s``, small timed transfers
        (collective; :meth:`loco_trainer.probes.Prober.probe`)."""
        self._prober.probe(nbytes, links=links)

    def finish_probe(self, timeout_s: float | None = None) -> None:
        """Wait for the transfers of the last :meth:`probe` (:meth:`loco_trainer.probes.Prober.finish`)."""
        self._prober.finish(timeout_s)

    @property
    def clock_offset_s(self) -> float:
        """Seconds to add to ``monotonic_ns / 1e9`` to get global rank 0's wall clock (see :meth:`sync_clock`)."""
        return self.recorder.clock_offset_s

    @property
    def clock_error_s(self) -> float | None:
        return self.recorder.clock_error_s

    @property
    def clock_syncs(self) -> int:
        """How many times :meth:`sync_clock` ran (the first call plus the periodic re-estimates)."""
        return self.recorder.clock_syncs

    def export_records(self, since_seq: int = -1, limit: int = 512) -> list[CollectiveSummary]:
        """The records in the progress protocol's shape (:meth:`FlightRecorder.export_records`)."""
        return self.recorder.export_records(since_seq, limit)

    def export_links(self, since_id: int = -1, limit: int = 512) -> list[LinkSummary]:
        """Connection samples in the progress protocol's shape, after :meth:`scan_p2p`
        (:meth:`FlightRecorder.export_links`)."""
        self.scan_p2p()
        return self.recorder.export_links(since_id, limit)

    def scan_p2p(self, now_ns: int | None = None) -> int:
        """Turn the point-to-point records into connection samples (:meth:`FlightRecorder.scan_p2p`)."""
        return self.recorder.scan_p2p(self.global_rank(self._rank), self.global_rank, now_ns)

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

    def blocking(self, collective: Callable[..., Any], *args: Any, tensor: torch.Tensor | None = None, **kwargs: Any) -> None:
        """Run the ``torch.distributed`` call ``collective(*args, **kwargs)`` to completion, waiting
        as :meth:`_block` does; the probes use it too (interruptibly on an interruptible Comm, unless ``tensor`` is on CUDA)."""
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

    def global_rank(self, group_rank: int) -> int:
        """The default group's rank of this group's ``group_rank`` (what torch.distributed's p2p calls take)."""
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
