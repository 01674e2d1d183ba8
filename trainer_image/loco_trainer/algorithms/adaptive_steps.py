"""Heterogeneity-aware local steps (the FedCompass idea, ``algorithm.adaptiveSteps``).

A round still spans H = ``sync_every`` positions of the loop on every worker, and the outer step still runs at
the round's last position, so every collective of the job (outer step, probe, checkpoint, eval) stays where it
was. What changes is which positions a worker *computes*: worker i computes ``local_steps[i] = Hᵢ <= H`` of
them and passes over the others at once. A worker measured k times slower than the fastest gets Hᵢ ≈ H / k, so
it spends about the fastest worker's round time computing and arrives at the outer step when the others do.

The positions it computes are spread evenly over the round (Bresenham: position j is computed when
``⌊(j+1)·Hᵢ/H⌋ > ⌊j·Hᵢ/H⌋``), not bunched at its start: the loop's collectives inside a round (the probe and
the checkpoint agreement every ``logEvery`` steps) then find the slow worker about as far along in time as the
others, instead of keeping them waiting until it has computed its whole share.

The outer gradient weights each worker by the steps it took: Δ = Σᵢ Tᵢ·Δᵢ / Σⱼ Tⱼ, with Tᵢ the steps worker i
computed in the round. With every Hᵢ = H the weights are exactly 1 and the outer step is DiLoCo's.

The plan looks at each worker's median step time over the last ``HISTORY_ROUNDS`` rounds, so that one round made
slow by something passing does not move a worker's share; a worker slower for good moves within two rounds.

Pure decisions here (which position is computed, the weights, the next plan from measured step times); the
strategy (``diloco.py``) measures and exchanges the step times with the outer step's all-reduce.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence


def computes(position: int, local_steps: int, sync_every: int) -> bool:
    """Whether a worker with ``local_steps`` per round computes round position ``position`` (0-based)."""
    return (position + 1) * local_steps // sync_every > position * local_steps // sync_every


def steps_taken(positions: int, local_steps: int, sync_every: int) -> int:
    """Steps computed among a round's first ``positions`` positions (``local_steps`` after a whole round)."""
    return positions * local_steps // sync_every


def outer_weights(taken: Sequence[int]) -> list[float]:
    """Each worker's factor on its outer gradient before the averaging all-reduce, so that the average is the
    step-weighted mean Σᵢ Tᵢ·Δᵢ / Σⱼ Tⱼ: ``n·Tᵢ / Σⱼ Tⱼ`` (all exactly 1.0 when every worker took as many)."""
    total = sum(taken)
    if total <= 0:
        return [1.0] * len(taken)
    if all(t == taken[0] for t in taken):
        return [1.0] * len(taken)
    return [len(taken) * t / total for t in taken]


def plan_local_steps(step_seconds: Sequence[float], current: Sequence[int], *, sync_every: int, min_steps: int,
                     tolerance: float) -> list[int]:
    """The next round's steps per worker from each worker's measured seconds per computed step.

    The fastest worker takes H steps; worker i takes ⌊H·t_fastest/tᵢ⌋ (so it is done no later than the fastest),
    within ``[min_steps, H]``. A worker within ``tolerance`` of the fastest takes H. A worker's count changes only
    when the new one differs from ``current`` by more than ``tolerance``·H, so noise in the timings does not move
    it every round (returning to H always applies). A worker with no measurement (0, e.g. it computed fewer than
    two steps) leaves the whole plan as it is: every rank decides from the same numbers.
    """
    if len(step_seconds) != len(current):
        raise ValueError(f"{len(step_seconds)} step times for {len(current)} workers")
    if not step_seconds or any(not t > 0 for t in step_seconds):
        return list(current)
    fastest = min(step_seconds)
    plan = []
    for seconds, now in zip(step_seconds, current):
        if seconds <= fastest * (1 + tolerance):
            target = sync_every
        else:
            target = max(min_steps, min(sync_every, int(sync_every * fastest / seconds)))
        moved = target == sync_every or abs(target - now) > tolerance * sync_every
        plan.append(target if moved else now)
    return plan


#: Rounds of step times a plan looks back on: each worker's time is its median over the last ones, so one round
#: made slow by something passing (a neighbour's burst, an eval, a checkpoint) does not move its share.
HISTORY_ROUNDS = 3


def steady_step_seconds(history: Sequence[Sequence[float]]) -> list[float]:
    """Each worker's step time over the last rounds (``history``: one list per round, oldest first): the median
    of its measured values (0: not measured in any of them). One round off either way cannot move it."""
    if not history:
        return []
    steady = []
    for worker in range(len(history[-1])):
        seen = [row[worker] for row in history if len(row) > worker and row[worker] > 0]
        steady.append(statistics.median(seen) if seen else 0.0)
    return steady


@dataclass
class StepClock:
    """This worker's seconds per computed step over the current round: the time from the end of one
    ``after_inner_step`` to the end of the next one for a computed position (the injected delay, the forward,
    backward and inner step, and any quick pass over the positions it skipped before it), never spanning an
    outer step. The median over the round keeps out an eval or a probe that fell inside one of them."""

    samples: list[float] = field(default_factory=list)
    last: float | None = None

    def note(self, now: float, computed: bool) -> None:
        if computed and self.last is not None:
            self.samples.append(now - self.last)
        self.last = now

    def restart(self, now: float | None) -> None:
        """A new round (after the outer step, or a membership change: ``now=None`` until the next call)."""
        self.samples, self.last = [], now

    def median(self) -> float:
        """Seconds per computed step this round; 0.0 when fewer than one interval was measured."""
        return statistics.median(self.samples) if self.samples else 0.0
