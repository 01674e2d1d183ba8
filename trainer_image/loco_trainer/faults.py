"""Fault injection (tests and demos): which rank crashes when, the slow-trainer delay, and the
communication faults (hang, straggler, slow link) that :class:`loco_trainer.comm.Comm` honours
through :class:`CommFaults`.

Pure decisions here; the loop (:mod:`loco_trainer.train`) and ``Comm`` act on them.
"""

from __future__ import annotations

from typing import Callable

from loco_contract.config import FaultInjection


class InjectedCrash(SystemExit):
    """Raised at the configured step; its ``code`` is ``faultInjection.exitCode``. The launcher
    turns it into a failed report and that exit code without any cleanup collective."""


def crash_step(fault: FaultInjection | None, rank: int, restart_count: int) -> int | None:
    """The 0-based step at whose start ``rank`` must crash, or None.

    ``ranks`` empty means every rank; with ``onlyFirstAttempt`` the fault fires only while the
    job's restart count is 0, so the restarted job can succeed.
    """
    return _at_step(fault, fault.crash_at_step if fault else None, rank, restart_count)


def nan_loss_step(fault: FaultInjection | None, rank: int, restart_count: int) -> int | None:
    """The 0-based step whose loss ``rank`` must read as NaN (``nanLossAtStep``), or None; as :func:`crash_step`."""
    return _at_step(fault, fault.nan_loss_at_step if fault else None, rank, restart_count)


def _at_step(fault: FaultInjection | None, step: int | None, rank: int, restart_count: int) -> int | None:
    if fault is None or step is None:
        return None
    if fault.ranks and rank not in fault.ranks:
        return None
    if fault.only_first_attempt and restart_count > 0:
        return None
    return step


def step_delay_s(fault: FaultInjection | None) -> float:
    """Seconds to sleep before every step (0 when no fault is configured)."""
    return fault.step_delay_s if fault is not None else 0.0


def slow_step_delay_s(fault: FaultInjection | None, rank: int) -> float:
    """Seconds ``rank`` sleeps before every inner step it computes (``slowStepDelayS``: a slow worker, on the listed
    ranks or every rank when none is listed, on every attempt: the hardware stays slow across restarts)."""
    if fault is None or (fault.ranks and rank not in fault.ranks):
        return 0.0
    return fault.slow_step_delay_s


class CommFaults:
    """Communication-layer faults of one rank, honoured by :class:`loco_trainer.comm.Comm`.

    ``Comm`` calls :meth:`before_enter` before it records a call (so a hung or late rank's record
    shows the fault the way a real one would: no record at all, or a late ``enter``), and
    :meth:`transfer_delay_s` after recording a point-to-point send (so a slow link shows as a long
    transfer, not a late arrival). Build it with :func:`comm_faults`, which returns ``None`` when
    nothing applies to the rank, so a healthy run pays nothing.

    * ``hangBeforeCollective = n``: the rank blocks forever before entering call ``seq == n``
      (a hang-noncomm fault; the pod is killed from outside).
    * ``collectiveDelayS = d``: sleep ``d`` before entering every call (a straggler).
    * ``linkDelay = {peer, seconds}``: every ``send`` to global rank ``peer`` takes ``seconds`` longer
      (a slow link; probes and point-to-point steps carry it, ring collectives do not).
    * ``hangLink = {peer, afterCollective}``: from call ``seq >= afterCollective`` on, every ``send``
      to global rank ``peer`` is recorded but never posted, and waiting for it blocks forever (a
      stalled connection: the receiver's matching ``recv`` stays in flight too, other transfers
      progress). ``Comm`` asks :meth:`holds_send` and waits through :meth:`hold`.
    """

    def __init__(
        self,
        fault: FaultInjection,
        sleep: Callable[[float], None] | None = None,
        hang: Callable[[], None] | None = None,
    ) -> None:
        """``sleep``/``hang`` replace ``time.sleep`` and the endless wait (tests use a bounded hang)."""
        import threading
        import time

        self.fault = fault
        self._sleep = sleep or time.sleep
        self._hang = hang or threading.Event().wait
        self._hung = False

    def before_enter(self, seq: int, kind: str, peer: int | None) -> None:
        """Block forever (hang) or sleep (straggler) before call ``seq`` is entered."""
        if not self._hung and self.fault.hang_before_collective is not None and seq >= self.fault.hang_before_collective:
            import logging

            self._hung = True
            logging.getLogger("loco_trainer").error("fault injection: hanging before collective #%d (%s)", seq, kind)
            self._hang()  # by default forever: only a kill ends it
        if self.fault.collective_delay_s:
            self._sleep(self.fault.collective_delay_s)

    def holds_send(self, seq: int, kind: str, peer_global: int | None) -> bool:
        """Whether call ``seq`` (a ``kind`` to global rank ``peer_global``) is held forever (hangLink)."""
        link = self.fault.hang_link
        return link is not None and kind == "send" and peer_global == link.peer and seq >= link.after_collective

    def hold(self) -> None:
        """Wait for a held transfer: forever by default (only a kill ends it; tests pass a bounded hang)."""
        import logging

        logging.getLogger("loco_trainer").error("fault injection: send to rank %d held forever", self.fault.hang_link.peer)
        self._hang()

    def transfer_delay_s(self, kind: str, peer_global: int | None) -> float:
        """Extra seconds a transfer of ``kind`` to global rank ``peer_global`` takes (0 if healthy)."""
        link = self.fault.link_delay
        if link is not None and kind == "send" and peer_global == link.peer:
            return link.seconds
        return 0.0


def comm_faults(fault: FaultInjection | None, rank: int, restart_count: int) -> CommFaults | None:
    """The communication faults for global ``rank``, or None when none applies (same ``ranks`` and
    ``onlyFirstAttempt`` rules as :func:`crash_step`)."""
    if fault is None:
        return None
    if not (fault.hang_before_collective is not None or fault.collective_delay_s or fault.link_delay is not None
            or fault.hang_link is not None):
        return None
    if fault.ranks and rank not in fault.ranks:
        return None
    if fault.only_first_attempt and restart_count > 0:
        return None
    return CommFaults(fault)
