"""The flight recorder: what every communication call of this rank looked like in time.

:class:`~loco_trainer.comm.Comm` appends one :class:`CollectiveRecord` per call to a bounded ring buffer when the
call is *entered*; its ``exit_ns`` is filled when the operation completes (at once for a blocking call, at
``wait()``/future completion for an async one), so a record whose ``exit_ns`` is ``None`` is an operation still in
flight: what a hang detector reads. Beside the records it keeps connection samples (:class:`ConnectionSample`: the
probes' transfers, completed point-to-point receives, stalled connections) and this rank's offset to the common
clock (set by :func:`loco_trainer.probes.sync_clock`).

Both leave the worker in one shape, the progress protocol's (:class:`loco_contract.protocol.CollectiveSummary`,
:class:`loco_contract.protocol.LinkSummary`), with times on the common clock; the detector reads that same shape.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Callable

from loco_contract.protocol import CollectiveSummary, LinkSummary

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv", "barrier")


@dataclasses.dataclass(slots=True)
class CollectiveRecord:
    """One communication call as seen by this rank.

    ``seq`` counts the Comm's calls from 0 (identical on every rank of a healthy group, since all
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


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionSample:
    """How long one connection took to move ``nbytes`` from global rank ``src`` to ``dst`` (``seconds``;
    ``math.inf``: stalled), sample ``id`` of this rank, taken at ``at_s`` (monotonic seconds)."""

    id: int
    src: int
    dst: int
    seconds: float
    nbytes: int
    at_s: float


class FlightRecorder:
    """The ring buffers of records and connection samples (``history`` of each), the common clock, and the
    judgement of point-to-point records into samples (:meth:`scan_p2p`). Thread-safe: calls are recorded on the
    training thread, completions may land on the backend's, exports run on the progress server's."""

    def __init__(self, history: int = 4096, stall_after_s: float = 5.0) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1 (got {history})")
        if not stall_after_s > 0:
            raise ValueError(f"stall_after_s must be > 0 (got {stall_after_s})")
        self.stall_after_s = float(stall_after_s)
        self._lock = threading.Lock()
        self._records: collections.deque[CollectiveRecord] = collections.deque(maxlen=history)
        self._seq = 0
        self._samples: collections.deque[ConnectionSample] = collections.deque(maxlen=history)
        self._sample_id = 0
        #: seqs of p2p records already turned into connection samples (completed / stalled)
        self._p2p_sampled: set[int] = set()
        self._p2p_stalled: set[int] = set()
        #: seconds to add to ``monotonic_ns / 1e9`` to get global rank 0's wall clock (see probes.sync_clock)
        self.clock_offset_s = time.time() - time.monotonic()
        #: the spread of the last clock estimate (None: never estimated)
        self.clock_error_s: float | None = None
        #: how many times the clock was estimated
        self.clock_syncs = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    def enter(self, kind: str, nbytes: int, peer: int | None = None) -> CollectiveRecord:
        """Record a call being entered now; returns its record (the caller sets ``exit_ns`` on completion)."""
        with self._lock:
            record = CollectiveRecord(self._seq, kind, nbytes, time.monotonic_ns(), None, peer)
            self._seq += 1
            self._records.append(record)
        return record

    def records(self) -> list[CollectiveRecord]:
        """A snapshot of the most recent records, oldest first, in issue order (in-flight ones with
        ``exit_ns`` None)."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._records]

    def add_sample(self, src: int, dst: int, seconds: float, nbytes: int, at_s: float) -> None:
        with self._lock:
            self._add_sample(src, dst, seconds, nbytes, at_s)

    def _add_sample(self, src: int, dst: int, seconds: float, nbytes: int, at_s: float) -> None:
        self._samples.append(ConnectionSample(self._sample_id, src, dst, seconds, nbytes, at_s))
        self._sample_id += 1

    def set_clock(self, offset_s: float, error_s: float) -> None:
        self.clock_offset_s, self.clock_error_s = offset_s, error_s
        self.clock_syncs += 1

    # -------------------------------------------------------------------------- the wire shape

    def export_records(self, since_seq: int = -1, limit: int = 512) -> list[CollectiveSummary]:
        """Records (probes excluded: they are shipped as connection samples) with ``seq > since_seq`` (at most
        the ``limit`` oldest of them; with a negative ``since_seq``, the ``limit`` newest records), with times on
        the common clock (seconds of rank 0's wall clock); ``exit_s`` is None while in flight."""
        off = self.clock_offset_s
        with self._lock:
            # probes are left out: their entry times measure a barrier's exit, not a rank's work
            if since_seq < 0:  # a reader with no cursor yet starts from the newest records
                picked = [r for r in self._records if not r.probe][-limit:]
            else:
                picked = [r for r in self._records if r.seq > since_seq and not r.probe][:limit]
            return [CollectiveSummary(seq=r.seq, kind=r.kind, nbytes=r.nbytes, enter_s=r.enter_ns / 1e9 + off,
                                      exit_s=None if r.exit_ns is None else r.exit_ns / 1e9 + off, peer=r.peer)
                    for r in picked]

    def export_links(self, since_id: int = -1, limit: int = 512) -> list[LinkSummary]:
        """Connection samples with ``id > since_id`` (at most ``limit``; with a negative ``since_id``, the newest),
        global ranks and the common clock; a stalled connection's ``seconds`` is None."""
        off = self.clock_offset_s
        with self._lock:
            picked = list(self._samples)[-limit:] if since_id < 0 else [x for x in self._samples if x.id > since_id][:limit]
        return [LinkSummary(id=x.id, src=x.src, dst=x.dst, seconds=None if x.seconds == math.inf else x.seconds,
                            nbytes=x.nbytes, at_s=x.at_s + off) for x in picked]

    # -------------------------------------------------------------------------- point-to-point

    def scan_p2p(self, me: int, global_rank: Callable[[int], int], now_ns: int | None = None) -> int:
        """Turn the point-to-point records into connection samples; returns how many were added. ``me`` is this
        rank's global rank, ``global_rank`` maps a group rank to its global one.

        * A **completed receive** (``recv``, not a probe) from group rank ``p`` becomes the sample
          ``(global(p) -> me, exit - enter)``: the transfer time of that connection, so send/recv
          algorithms (NoLoCo's gossip) fill the connection matrix with no extra probe. It includes
          the time the receiver waited for the sender to post (ranks post their exchange together,
          so that is their arrival skew; a straggling sender is also named by the straggler rule).
        * A **send or receive in flight** (probes included) for longer than ``stall_after_s``, that a
          thread is waiting for, becomes a stalled sample ``seconds = inf`` for its direction, once: what
          lets the detector's hang-comm rule blame that connection. A call nobody waits on yet is not judged
          (gloo completes a transfer only inside ``wait()``, so a receive queued behind a stalled send would
          otherwise look stalled too). If it later completes, the receive's sample tells the detector the
          connection moves data again.
        """
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        stall_ns = int(self.stall_after_s * 1e9)
        added = 0
        with self._lock:
            oldest = self._records[0].seq if self._records else 0
            for r in self._records:
                if r.peer is None or r.kind not in ("send", "recv") or r.seq in self._p2p_sampled:
                    continue
                peer = global_rank(r.peer)
                src, dst = (me, peer) if r.kind == "send" else (peer, me)
                if r.exit_ns is None:
                    if r.waited and now_ns - r.enter_ns > stall_ns and r.seq not in self._p2p_stalled:
                        self._p2p_stalled.add(r.seq)
                        self._add_sample(src, dst, math.inf, r.nbytes, r.enter_ns / 1e9)
                        added += 1
                    continue
                if r.kind == "recv" and not r.probe:  # probes add their own sample (probes.Prober)
                    self._add_sample(src, dst, (r.exit_ns - r.enter_ns) / 1e9, r.nbytes, r.enter_ns / 1e9)
                    added += 1
                self._p2p_sampled.add(r.seq)
            # forget seqs that left the ring buffer (bounded memory)
            self._p2p_sampled = {q for q in self._p2p_sampled if q >= oldest}
            self._p2p_stalled = {q for q in self._p2p_stalled if q >= oldest}
        return added
