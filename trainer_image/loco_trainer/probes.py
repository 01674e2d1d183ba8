"""What the detector needs beyond the algorithm's own calls, kept beside the collectives, not inside them:

* :func:`sync_clock`: this rank's offset to global rank 0's wall clock, so every rank's records share one clock;
* :class:`Prober`: a timing point per log interval and small timed transfers on the ring's connections and on a
  rotating set of other pairs (the connection matrix when the algorithm has no point-to-point traffic).

Both issue their traffic through the :class:`~loco_trainer.comm.Comm` (its recording and blocking primitives: this
module is the Comm's companion) and keep what they measure in its :class:`~loco_trainer.flight_recorder.FlightRecorder`.
See docs/fault-detection.md, "Probes".
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from loco_trainer.waits import _INTERRUPTED, CommHandle, CommInterrupted

#: How many different "rotating" shifts :meth:`Prober.probe` cycles through besides the ring (shift 1):
#: shifts 2 .. 9, so every rank sends samples to up to 9 peers (shift 1 and 8 rotating ones) and the
#: detector tracks at most 9 outgoing connections per rank, whatever the world size.
PROBE_ROTATING_SHIFTS = 8


def sync_clock(comm: Any, rounds: int = 5) -> float:
    """Estimate ``comm``'s rank's offset to global rank 0's wall clock; collective (every rank calls it).

    Each round, all ranks leave a barrier together; rank 0's wall clock and every rank's
    monotonic clock are read at that moment and gathered; the offset is the median over the
    rounds of ``rank0_wall - my_monotonic``. Its error is the spread with which ranks leave a
    barrier (sub-millisecond on one host, about one network latency across hosts), far below
    the detector's ``minLatenessSeconds``. The calls go through plain ``torch.distributed`` so
    they leave no record. Returns and stores :attr:`clock_offset_s`; :attr:`clock_error_s` is the
    spread of the rounds (max - min of the estimates). Both are kept by ``comm.recorder``.
    """
    if comm.world_size == 1:
        comm.recorder.set_clock(time.time() - time.monotonic(), 0.0)
        return comm.recorder.clock_offset_s
    estimates = []
    root = comm.global_rank(0)
    for _ in range(max(1, rounds)):
        comm.blocking(dist.barrier, group=comm.group)
        mono = time.monotonic()
        wall = time.time()
        t = torch.tensor([wall if comm.rank == 0 else 0.0], dtype=torch.float64)
        comm.blocking(dist.broadcast, t, src=root, group=comm.group)
        estimates.append(float(t.item()) - mono)
    estimates.sort()
    comm.recorder.set_clock(estimates[len(estimates) // 2], estimates[-1] - estimates[0])
    return comm.recorder.clock_offset_s



class Prober:
    """The probes of one :class:`~loco_trainer.comm.Comm` (its ``probe_*`` and ``clock_resync_probes`` settings):
    how many ran, when the last transfers did, and the helper threads of the transfers still out."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.probes = 0
        self.transfer_probes = 0
        self.last_transfer_probe = -math.inf
        self.threads: list[threading.Thread] = []

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
        if self.comm.world_size == 1:
            return
        # The opening collective is one every rank enters at the same step: recorded (and shipped)
        # as a barrier, it gives the detector a timing point per log interval between the
        # algorithm's syncs, so a straggler or a stopped rank shows long before the next outer
        # all-reduce (docs/fault-detection.md, "Probes"). Entered before waiting for the previous
        # probe's transfers, so a slow connection never makes its endpoints look late.
        opening = self.comm.open_record("barrier", 0, 0, 0, count=False) if links else None
        self.finish()
        if self.comm.clock_resync_probes and self.probes and self.probes % self.comm.clock_resync_probes == 0:
            sync_clock(self.comm, rounds=3)  # collective: every rank probes the same number of times
        self.probes += 1
        if not links:
            return
        now = time.monotonic()
        due = torch.tensor([1.0 if now - self.last_transfer_probe >= self.comm.probe_interval_s else 0.0])
        # the timing point; agrees on `due`
        self.comm.blocking(dist.all_reduce, due, op=dist.ReduceOp.MAX, group=self.comm.group)
        start = opening.exit_ns = time.monotonic_ns()
        if not due.item():
            return
        self.last_transfer_probe = now
        n = self.comm.world_size
        shifts = [1]
        if n > 2:
            shifts.append(2 + self.transfer_probes % min(n - 2, PROBE_ROTATING_SHIFTS))
        self.transfer_probes += 1
        threads: list[threading.Thread] = []
        for shift in shifts:
            threads += self._transfer(shift, nbytes, start)
        self.threads = threads
        for t in threads:
            t.start()
        if self.comm.probe_wait_s:
            deadline = time.monotonic() + self.comm.probe_wait_s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            # nobody resumes training while a peer still measures: a rank back at work would take
            # the CPU from a peer whose receive thread has yet to wake up (on a shared host the
            # healthy samples then read 20-40 ms instead of 1 ms)
            self.comm.blocking(dist.barrier, group=self.comm.group)

    def _transfer(self, shift: int, nbytes: int, start: int) -> list[threading.Thread]:
        """Post one probe transfer (send to ``rank + shift``, receive from ``rank - shift``) and
        return its two not yet started helper threads (see :meth:`probe`)."""
        n = self.comm.world_size
        out = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
        inp = torch.empty_like(out)
        dst, src = (self.comm.rank + shift) % n, (self.comm.rank - shift) % n
        src_global, me_global = self.comm.global_rank(src), self.comm.global_rank(self.comm.rank)
        recv_record = self.comm.open_record("recv", _nbytes(inp), 0, 0, peer=src, count=False)
        recv_record.probe = True
        receive = CommHandle(dist.irecv(inp, src=src_global, group=self.comm.group), inp, recv_record)
        send_record = self.comm.open_record("send", _nbytes(out), 0, 0, peer=dst, count=False)
        send_record.probe = True

        def do_send() -> None:
            if self.comm.holds_send(send_record.seq, "send", dst):
                send_record.waited = True
                self.comm.fault_hook.hold()  # a stalled connection: the send never completes
                return
            # how late this rank posts the send after leaving the opening all-reduce (a CPU-starved
            # process, a thread waiting for the GIL): shipped in the payload, the receiver subtracts
            # it, so the sample times the connection, not the sender's scheduling. Taken before an
            # injected link delay, which stands for the connection itself being slow.
            out[0] = (time.monotonic_ns() - start) / 1e9
            self.comm.delay_transfer("send", dst)
            CommHandle(dist.isend(out, dst=self.comm.global_rank(dst), group=self.comm.group), out, send_record).wait()

        def do_receive() -> None:
            receive.wait()
            elapsed = (time.monotonic_ns() - start) / 1e9
            sender_late = float(inp[0])
            # a sender later than the whole wait (the receiver left the barrier after it): connection ~0
            seconds = max(elapsed - sender_late, 1e-6) if sender_late >= 0.0 else elapsed
            self.comm.recorder.add_sample(src_global, me_global, seconds, _nbytes(inp), start / 1e9)

        return [threading.Thread(target=fn, name=f"loco-probe-{fn.__name__}-{shift}", daemon=True)
                for fn in (do_send, do_receive)]

    def finish(self, timeout_s: float | None = None) -> None:
        """Wait for the transfers of the last :meth:`probe` (a no-op when none is outstanding); on an
        interruptible Comm, raises :class:`CommInterrupted` when interrupted meanwhile (a transfer
        to a peer that is gone may otherwise wait out the group's timeout)."""
        threads, self.threads = getattr(self, "_probe_threads", []), []
        for t in threads:
            if not self.comm.interruptible:
                t.join(timeout_s)
                continue
            end = math.inf if timeout_s is None else time.monotonic() + timeout_s
            while t.is_alive() and not self.comm.interrupted.is_set() and time.monotonic() < end:
                t.join(0.01)  # only while a transfer is still out: normally it finished long ago
            if t.is_alive() and self.comm.interrupted.is_set():
                raise CommInterrupted(_INTERRUPTED)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
