"""Live and offline verdicts agree: the records the operator polled, fed live through
:class:`LiveDetectors` at random report boundaries, and the same records written as a trace and
replayed by ``loco diagnose`` (:func:`diagnose`), give the same verdicts at the same collective.

Random jobs: 3-6 ranks, one all-reduce per ~1 s step, and at most one of: a rank that freezes
(SIGSTOP) at any moment, before or after its last answered poll, inside a collective or between
two, for good or for a while (SIGCONT); a straggler; the end of training, where ranks exit one by
one and may or may not get to report ``finished``. Polls come 0.3-2 s apart and a pod misses one
now and then. A pause lasts either well under the 10 s hang timeout or well over it: one that
ends within a poll interval of the timeout may be caught by one of the two and not the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from loco_detector import CollectiveRecord, DetectorConfig, RankHeartbeat, Topology, diagnose
from loco_detector.live import LiveDetectors
from loco_detector.trace import Trace
from loco_detector.types import RecordBatch

CFG = DetectorConfig(warmup_collectives=3, hang_timeout_floor_seconds=10.0, warmup_hang_timeout_seconds=10.0,
                     silence_timeout_seconds=40.0)


@dataclass
class Pod:
    rank: int
    enter: list[float] = field(default_factory=list)  # by seq: when it entered (only the calls it entered)
    exit: list[float] = field(default_factory=list)  # by seq: when it left (inf: never)
    frozen_at: float = math.inf  # stops answering (and computing) from here
    resumed_at: float = math.inf  # ... until here
    finished_at: float = math.inf  # training ended: answers "finished" until it exits
    gone_at: float = math.inf  # the process exited: no answer any more

    def report(self, t: float, since_seq: int) -> dict | None:
        if self.frozen_at <= t < self.resumed_at or t >= self.gone_at:
            return None
        recs = [{"seq": s, "kind": "all_reduce", "nbytes": 4096, "enterS": e, "exitS": x if x <= t else None}
                for s, (e, x) in enumerate(zip(self.enter, self.exit)) if s > since_seq and e <= t]
        return {"state": "finished" if t >= self.finished_at else "running", "collectives": recs[:512]}


def _job(rng: np.random.Generator) -> tuple[list[Pod], float]:
    """Simulate one job; returns its pods and the time the trace ends."""
    world = int(rng.integers(3, 7))
    steps = int(rng.integers(8, 25))
    fault = rng.choice(["none", "freeze", "straggler", "finish"])
    pods = [Pod(r) for r in range(world)]
    slow = np.ones(world)
    victim = int(rng.integers(world))
    if fault == "straggler":
        slow[victim] = rng.uniform(1.3, 2.0)
    ready = np.zeros(world)
    t_freeze = t_resume = math.inf
    if fault == "freeze":
        t_freeze = float(rng.uniform(2.0, steps * 1.1))
        if rng.random() < 0.5:
            t_resume = t_freeze + float(rng.uniform(3.0, 7.0) if rng.random() < 0.3 else rng.uniform(17.0, 80.0))
        pods[victim].frozen_at, pods[victim].resumed_at = t_freeze, t_resume
    for _ in range(steps):
        enter = ready + rng.uniform(0.9, 1.1, world) * slow
        if t_freeze <= enter[victim] < t_resume:
            enter[victim] += t_resume - t_freeze  # it computes nothing while stopped
        entered = enter < math.inf
        done_at = float(enter.max()) + rng.uniform(0.01, 0.05)
        if enter[victim] < t_freeze < done_at:
            done_at += t_resume - t_freeze  # stopped inside: nobody leaves until it wakes
        completes = bool(entered.all()) and math.isfinite(done_at)
        for r in np.flatnonzero(entered):
            pods[r].enter.append(float(enter[r]))
            pods[r].exit.append(done_at + 0.001 * r if completes else math.inf)
        if not completes:
            break
        ready = np.array([done_at + 0.001 * r for r in range(world)])
    last = max(max(p.enter[-1], p.exit[-1] if math.isfinite(p.exit[-1]) else 0.0) for p in pods if p.enter)
    if fault == "finish" and all(math.isfinite(p.exit[-1]) for p in pods):
        for p in pods:  # each exits after its last call; some answer "finished" for a while first
            p.finished_at = p.exit[-1] + 0.001
            p.gone_at = p.finished_at + (float(rng.uniform(0.0, 4.0)) if rng.random() < 0.6 else 0.0)
    return pods, last + float(rng.uniform(5.0, 70.0))


def _live_and_trace(pods: list[Pod], end_s: float, rng: np.random.Generator) -> tuple[list, Trace]:
    """Poll the pods as the operator does; returns the live verdicts and what it saw, as a trace."""
    live = LiveDetectors()
    placement = {p.rank: (f"w-{p.rank}", f"node-{p.rank // 2}") for p in pods}
    seen: dict[tuple[int, int], CollectiveRecord] = {}
    heartbeats: list[RankHeartbeat] = []
    verdicts = []
    missed = set()
    t = float(rng.uniform(0.1, 1.0))
    while True:
        t = min(t, end_s)
        reports = {}
        for p in pods:
            if p.rank not in missed and rng.random() < 0.1:
                missed.add(p.rank)  # this poll of it times out (never twice in a row)
                continue
            missed.discard(p.rank)
            since, _ = live.cursor("ns/j", 0, f"w-{p.rank}")
            answer = p.report(t, since)
            if answer is None:
                continue
            reports[f"w-{p.rank}"] = _Report(answer["state"], answer["collectives"])
            heartbeats.append(RankHeartbeat(p.rank, t, finished=answer["state"] == "finished"))
            for c in answer["collectives"]:
                seen[(p.rank, c["seq"])] = CollectiveRecord(p.rank, c["seq"], "all_reduce", 4096, c["enterS"], c["exitS"])
        verdicts += [f.verdict for f in live.feed("ns/j", CFG, 0, placement, reports, t)]
        if t >= end_s:
            break
        t += float(rng.uniform(0.3, 2.0))
    trace = Trace(Topology.from_mapping({r: n for r, (_, n) in placement.items()}),
                  RecordBatch.from_records(seen.values()), heartbeats=tuple(heartbeats), end_s=end_s)
    return verdicts, trace


@dataclass
class _Report:
    state: str
    collectives: list


def _key(verdicts: list) -> list:
    return sorted((v.kind.value, v.ranks, v.seq) for v in verdicts)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_live_and_offline_verdicts_agree(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pods, end_s = _job(rng)
    live, trace = _live_and_trace(pods, end_s, rng)
    offline = diagnose(trace, CFG)
    assert _key(live) == _key(offline), ([v.message for v in live], [v.message for v in offline])
