"""Fault injection (tests and demos): which rank crashes when, and the slow-trainer delay.

Pure decisions here; the loop (:mod:`loco_trainer.train`) acts on them.
"""

from __future__ import annotations

from loco_trainer.config import FaultInjection


class InjectedCrash(SystemExit):
    """Raised at the configured step; its ``code`` is ``faultInjection.exitCode``. The launcher
    turns it into a failed report and that exit code without any cleanup collective."""


def crash_step(fault: FaultInjection | None, rank: int, restart_count: int) -> int | None:
    """The 0-based step at whose start ``rank`` must crash, or None.

    ``ranks`` empty means every rank; with ``onlyFirstAttempt`` the fault fires only while the
    job's restart count is 0, so the restarted job can succeed.
    """
    if fault is None or fault.crash_at_step is None:
        return None
    if fault.ranks and rank not in fault.ranks:
        return None
    if fault.only_first_attempt and restart_count > 0:
        return None
    return fault.crash_at_step


def step_delay_s(fault: FaultInjection | None) -> float:
    """Seconds to sleep before every step (0 when no fault is configured)."""
    return fault.step_delay_s if fault is not None else 0.0
