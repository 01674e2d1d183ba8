"""A live-capable worker's membership (docs/elastic.md, Live resizing): the epoch it runs in, what turns a
collective's error into "a peer is lost", leaving a group that lost a peer, waiting for and agreeing on the
operator's next membership, and joining it. The training loop meets a lost peer at one point
(``Trainer._regroup_if_needed``); everything the membership protocol needs lives here."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist

from loco_contract.config import RuntimeEnv
from loco_trainer.algorithms.base import Strategy
from loco_trainer.data import DataPosition
from loco_trainer.progress import ProgressState
from loco_trainer.rendezvous import RankInfo

log = logging.getLogger("loco_trainer")

#: How long a survivor waits for the operator's new membership after losing a peer, and bounds the
#: rendezvous of a new epoch (docs/elastic.md, Live resizing); then it fails and the job restarts.
REGROUP_TIMEOUT_S = 120.0

#: A smaller membership arrived and the loop has not switched this long: abort the old group (see
#: LiveMembership.on_update).
ABORT_OLD_GROUP_AFTER_S = 1.0

#: After losing a peer, how long the save in flight may take to end before it is abandoned.
SAVE_SETTLE_S = 5.0

#: How long a worker waits for a membership update a peer already holds (the operator posts to all at once).
MEMBERSHIP_WAIT_S = 30.0

#: Texts of gloo/NCCL/store errors that mean a peer process is gone.
PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                     "ECONNRESET", "EPIPE", "Socket Timeout", "timed out", "Timed out", "communicator was aborted")


def abort_group() -> None:
    """Abort the default process group and every subgroup: their connections close, so peers blocked
    in a collective with this process fail promptly instead of at the group's timeout."""
    if not dist.is_initialized():
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception:  # noqa: BLE001 - an older torch or backend without abort: a plain destroy
        dist.destroy_process_group()


class LiveMembership:
    """Args:
        env: this pod's runtime env (the epoch it started in, timeouts, rendezvous settings).
        info: this process's rank (replaced by :meth:`join_newest`).
        progress: the pod's progress state: where membership updates arrive (None: no endpoint).
        device: where the model lives (picks the backend of a new group).
        comm: the trainer's current Comm (it is rebuilt at each membership change).
        report: updates the pod's progress report.
    :attr:`live` says whether the live path applies (set by the trainer once the algorithm is known);
    :attr:`strategy` is the algorithm, which takes each new group (:meth:`agree`).
    """

    def __init__(self, env: RuntimeEnv, info: RankInfo, progress: ProgressState | None, device: torch.device, *,
                 comm: Callable[[], Any], report: Callable[..., None]) -> None:
        self.env, self.info, self.progress, self.device = env, info, progress, device
        self.comm, self._report = comm, report
        self.live = False
        self.strategy: Any = None
        self.epoch = env.epoch  # the membership epoch this worker runs in
        self._lock = threading.Lock()  # the loop's regroup vs the HTTP thread's abort of a stale group
        self._regrouping = False
        self._aborted_epoch: int | None = None

    def begin_regroup(self) -> None:
        with self._lock:
            self._regrouping = True

    def entered(self, epoch: int) -> None:
        """The new group is agreed: this worker runs in ``epoch`` now."""
        with self._lock:
            self.epoch, self._regrouping = epoch, False

    def on_update(self, update: Any) -> None:
        """(HTTP thread) A smaller membership means workers are gone. A survivor notices at its next
        collective, but one blocked in a collective with a survivor that has not noticed yet (one not
        connected to the lost peer) could wait out the group's timeout. So unless the loop has switched
        within :data:`ABORT_OLD_GROUP_AFTER_S`, the old group is aborted: its next or current collective
        fails and the loop regroups. A larger membership (a grow) waits for the next boundary."""
        if update.world_size >= self.info.world_size:
            return

        def abort_if_still_there() -> None:
            with self._lock:  # decide under the lock, abort outside it (an abort may take a while)
                stale = self.epoch < update.epoch and not self._regrouping
                if stale:
                    self._aborted_epoch = self.epoch
            if stale:
                log.warning("membership epoch %d has %d workers, this one still runs %d in epoch %d: aborting the "
                            "old group", update.epoch, update.world_size, self.info.world_size, self.epoch)
                if self.comm() is not None:  # gloo's abort does not wake this process's own point-to-point waits
                    self.comm().interrupt()
                abort_group()

        timer = threading.Timer(ABORT_OLD_GROUP_AFTER_S, abort_if_still_there)
        timer.daemon = True
        timer.start()

    def peer_lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by a collective) means a peer is gone and the live path applies."""
        if not self.live:
            return False
        if self._aborted_epoch == self.epoch:  # we aborted the group ourselves (a smaller membership arrived)
            return True
        text = str(exc)
        return isinstance(exc, RuntimeError) and (
            type(exc).__name__.startswith("Dist") or any(marker in text for marker in PEER_LOSS_MARKERS))

    def agreed_update(self) -> Any:
        """At an outer-step boundary: the membership update every rank switches to now, or None.

        One 8-byte all-reduce (MAX of the newest epoch each rank was told about). A rank that has not
        received the update yet waits for it (the operator posts it to every pod at once)."""
        mine = self.progress.pending_membership() if self.progress is not None else None
        newest = mine.epoch if mine is not None else self.epoch
        if dist.is_initialized() and dist.get_world_size() > 1:
            newest = int(self.comm().agree(torch.tensor([newest], dtype=torch.int64), "max").item())
        if newest <= self.epoch:
            return None
        update = self.progress.wait_membership(newest, MEMBERSHIP_WAIT_S) if self.progress is not None else None
        if update is None:
            raise RuntimeError(f"a peer was told about membership epoch {newest}, this worker was not within "
                               f"{MEMBERSHIP_WAIT_S:.0f}s; the job restarts from its checkpoint")
        return update

    def leave_after_loss(self, exc: BaseException, completed: int) -> BaseException:
        """A peer loss seen outside the strategy's own exchange, or in one the strategy dropped (see
        ``deferred`` in ``loco_trainer.train._Run``): leave the old group at once (interrupt this worker's waits on it,
        abort it, so peers waiting on this worker fail promptly) and train on to the strategy's next
        exchange, which then fails here at once, or, for a strategy that drops lost exchanges, to its
        next boundary: every survivor stops at the same step. Returns ``exc``."""
        log.warning("rank %d: a peer was lost at step %d (%s); training on to the next exchange or round "
                    "boundary of the algorithm, where the survivors regroup", self.info.rank, completed,
                    str(exc).splitlines()[0][:200])
        self._report(message=f"a peer was lost at step {completed}: training on to where the survivors regroup")
        with self._lock:
            self._aborted_epoch = self.epoch
        if self.comm() is not None:
            self.comm().interrupt()
        abort_group()
        return exc

    def await_update(self, lost: BaseException, completed: int, settle_save: Callable[[float], None]) -> Any:
        """A peer was lost: wait for the operator's new membership (it shrinks the job to the survivors)."""
        with self._lock:
            self._regrouping = True
        log.warning("rank %d: a peer was lost at step %d (%s); waiting up to %.0fs for the new membership",
                    self.info.rank, completed, str(lost).splitlines()[0][:200], self.regroup_timeout_s())
        self._report(message=f"a peer was lost at step {completed}: waiting for the new membership")
        # Leave the old group at once: closing its connections fails the collectives that survivors not
        # connected to the lost peer may still be blocked in (they would wait out the group's timeout),
        # so every survivor comes here within moments. The save in flight then fails (or has completed).
        abort_group()
        settle_save(SAVE_SETTLE_S)
        timeout = self.regroup_timeout_s()
        update = self.progress.wait_membership(self.epoch + 1, timeout) if self.progress is not None else None
        if update is None:
            raise RuntimeError(f"a peer was lost at step {completed} and no membership update arrived within "
                               f"{timeout:.0f}s: {lost}") from lost
        return update

    def regroup_timeout_s(self) -> float:
        """How long to wait for the membership update and at the new rendezvous: long enough for a
        survivor stuck in a collective of the old group to reach its timeout and come too."""
        return max(REGROUP_TIMEOUT_S, self.env.collective_timeout_s + 60.0)

    def join_newest(self, update: Any) -> Any:
        """Join ``update``'s group (``rendezvous.join_epoch`` in a helper thread, so SIGTERM is honoured).
        If a newer update arrives while the rendezvous waits (e.g. a joiner of this epoch died and the
        operator shrank again), that rendezvous can never complete: it is left to time out in its daemon
        thread and the newer one is joined instead. Sets :attr:`info` to the new rank; returns the update joined."""
        from loco_trainer.interruptible import Abandoned, call_interruptibly
        from loco_trainer.rendezvous import join_epoch, pick_backend

        while True:
            def newer(epoch: int = update.epoch) -> Any:
                pending = self.progress.pending_membership() if self.progress is not None else None
                return pending if pending is not None and pending.epoch > epoch else None

            try:
                self.info = call_interruptibly(join_epoch, self.env, update.rank, update.world_size, update.master_addr,
                                           update.master_port, pick_backend(self.device), self.regroup_timeout_s(),
                                           self.env.collective_timeout_s, abandon=lambda: newer() is not None)
                return update
            except Abandoned:
                arrived = newer()
                log.warning("membership epoch %d arrived while joining epoch %d: joining %d instead", arrived.epoch,
                            update.epoch, arrived.epoch)
                update = arrived

    def agree(self, completed: int, position: DataPosition, reference_world: int, *, joining: bool,
                          interrupted: bool, planned: bool) -> tuple[int, DataPosition, int]:
        """Every member of a new group, right after joining it: one all_gather of
        ``[joining, step, data position, reference world, interrupted]``. The survivors must agree
        (the same step and position: they left the old group at the same point; and whether the loss
        interrupted the strategy's exchange, unless ``Strategy.interruption_is_local``: then each
        survivor recovers its own); rank 0 must be a survivor; joiners adopt its values. Then the
        strategy takes the new group: with joiners (or at a planned boundary) ``on_membership_change``
        (rank 0 sends the global state), else ``continue_after_peer_loss``; survivors on which the
        strategy's last exchange completed and survivors on which it failed (the lost worker died in its
        final hops) reconcile through ``Strategy.adopt_completed_exchange``. Raises ``RuntimeError``
        (the job then restarts from its checkpoint) when the survivors disagree otherwise or a joiner
        arrives mid-round."""
        comm, strategy = self.comm(), self.strategy
        mine = torch.tensor([int(joining), completed, position.sequences, reference_world, int(interrupted)],
                            dtype=torch.int64)
        rows = [row.tolist() for row in comm.all_gather(mine)] if comm.world_size > 1 else [mine.tolist()]
        local = strategy.interruption_is_local
        survivors = {tuple(row[1:4]) for row in rows if not row[0]}
        flags = {row[4] for row in rows if not row[0]}
        split = not local and len(flags) > 1  # the exchange completed on some survivors only
        reconcilable = type(strategy).adopt_completed_exchange is not Strategy.adopt_completed_exchange
        if rows[0][0]:
            raise RuntimeError("membership change: rank 0 of the new group is a joining worker; the operator must "
                               "order the survivors first")
        if len(survivors) != 1 or (split and not reconcilable):
            points = {tuple(row[1:4] if local or reconcilable else row[1:]) for row in rows if not row[0]}
            raise RuntimeError(f"membership change: the survivors left the old group at different points "
                               f"(step, position, reference world{'' if local or reconcilable else ', interrupted'}) "
                               f"{sorted(points)}")
        step, sequences, reference, was_interrupted = rows[0][1:]
        if local or split:
            was_interrupted = max(row[4] for row in rows)  # any survivor's: a joiner cannot come in then
        joiners = sum(row[0] for row in rows)
        if joiners and (was_interrupted or not (planned or joining)):
            raise RuntimeError("membership change: workers cannot join mid-round (after a lost peer)")
        if joiners or planned:
            strategy.on_membership_change(comm, 0)
        elif split:
            src = next(r for r, row in enumerate(rows) if not row[4])
            if self.info.rank == 0:
                log.warning("the exchange at step %d completed on ranks %s of the survivors only: the others adopt "
                            "its outcome from rank %d", step, [r for r, row in enumerate(rows) if not row[4]], src)
            strategy.adopt_completed_exchange(comm, src, completed=not interrupted)
        else:
            strategy.continue_after_peer_loss(comm, bool(interrupted if local else was_interrupted))
        return int(step), DataPosition(int(sequences)), int(reference)
