"""Issue 29: what the detector learns from a hang, what it does once training ends, and a rank
whose last report went stale before it froze.

Each scenario is built by hand, 16 ranks (or 4) entering evenly spread over +-0.1 s, one
collective every ``PERIOD`` seconds; time is the detector's injected clock.
"""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from loco_detector import (
    CollectiveRecord,
    Detector,
    DetectorConfig,
    RankHeartbeat,
    RecordBatch,
    Topology,
    VerdictKind,
    diagnose,
)
from loco_detector.trace import Trace, read_trace, write_trace
from loco_detector.live import LiveDetectors
from loco_cli import main as loco
from loco_contract.protocol import ProgressReport

PERIOD = 2.0
OFFSETS = np.linspace(-0.1, 0.1, 16)
CFG = DetectorConfig(hang_timeout_floor_seconds=10.0)  # warm-up: 5 collectives


def _collective(det: Detector, seq: int, t0: float, *, exit_after: float = 0.01) -> float:
    """All 16 ranks enter ``seq`` around ``t0`` and leave ``exit_after`` after the last; returns the exit."""
    enter = t0 + OFFSETS
    exit_s = float(enter.max()) + exit_after
    assert det.observe(RecordBatch.from_arrays(rank=np.arange(16), seq=seq, enter_s=enter, exit_s=exit_s), (), exit_s) == []
    return exit_s


def _warm(det: Detector, seqs: range) -> float:
    t = 0.0
    for s in seqs:
        t = _collective(det, s, PERIOD * s)
    return t


def _noncomm_hang_fires_within(det: Detector, seq: int, t0: float, missing: int) -> float:
    """``missing`` never enters ``seq``; returns how long after the median entry the verdict came."""
    keep = np.setdiff1d(np.arange(16), [missing])
    rb = RecordBatch.from_arrays(rank=keep, seq=seq, enter_s=t0 + OFFSETS[keep])
    assert det.observe(rb, (), t0 + 0.2) == []
    for waited in np.arange(1.0, 200.0, 0.5):
        verdicts = det.observe((), (), t0 + waited)
        if verdicts:
            assert [(v.kind, v.ranks, v.seq) for v in verdicts] == [(VerdictKind.hang_noncomm, (missing,), seq)]
            return float(waited)
    raise AssertionError("no hang verdict within 200 s")


# ---------------------------------------------------------------- timeouts learn only from healthy intervals


def test_a_noncomm_hang_does_not_raise_the_timeout_for_the_next_one() -> None:
    det = Detector(CFG, Topology.uniform(16, 8))
    _warm(det, range(10))
    t0 = PERIOD * 10
    assert _noncomm_hang_fires_within(det, 10, t0, missing=3) <= 10.5
    # rank 3 comes back 60 s later; #10 completes and the job goes on
    late = CollectiveRecord(3, 10, "all_reduce", 0, t0 + 60.0, t0 + 60.01)
    exits = RecordBatch.from_arrays(rank=np.arange(16), seq=10, enter_s=np.where(np.arange(16) == 3, t0 + 60.0, t0 + OFFSETS),
                                    exit_s=t0 + 60.01)
    assert det.observe(exits, (), late.exit_s) == []
    t = late.exit_s
    for s in range(11, 15):
        t = _collective(det, s, t + PERIOD)
    noncomm, comm = det._hang_timeouts()
    assert noncomm == 10.0 and comm == 10.0, (noncomm, comm)
    # a second hang (another rank) is reported after the floor again, not after a minute
    assert _noncomm_hang_fires_within(det, 15, t + PERIOD, missing=9) <= 10.5


def test_a_comm_hang_that_resolved_does_not_raise_the_hang_comm_timeout() -> None:
    det = Detector(CFG, Topology.uniform(16, 8))
    t = _warm(det, range(10))
    t0 = t + PERIOD
    enter = t0 + OFFSETS
    assert det.observe(RecordBatch.from_arrays(rank=np.arange(16), seq=10, enter_s=enter), (), t0 + 0.2) == []
    verdicts = det.observe((), (), t0 + 11.0)
    assert [(v.kind, v.seq) for v in verdicts] == [(VerdictKind.hang_comm, 10)]
    # the connection recovers after 60 s: #10 completes, the job goes on
    done = RecordBatch.from_arrays(rank=np.arange(16), seq=10, enter_s=enter, exit_s=t0 + 60.0)
    assert det.observe(done, (), t0 + 60.0) == []
    t = t0 + 60.0
    for s in range(11, 15):
        t = _collective(det, s, t + PERIOD)
    assert det._hang_timeouts() == (10.0, 10.0)


def test_healthy_intervals_still_raise_the_timeout() -> None:
    """A job whose collectives are 30 s apart: a rank 15 s late is a straggler, not a hang."""
    det = Detector(CFG, Topology.uniform(16, 8))
    for s in range(10):
        _collective(det, s, 30.0 * s)
    assert det._hang_timeouts()[0] >= 29.0


# ---------------------------------------------------------------- no verdicts once training ended


def _finished_job() -> tuple[Detector, float]:
    """4 ranks; in the last collective #12 ranks 0 and 1 leave first and exit the trainer: their
    last shipped records still show them inside #12; ranks 2 and 3 report it done."""
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=1.0, warmup_hang_timeout_seconds=1.0), Topology.uniform(4, 2))
    for s in range(12):
        enter = PERIOD * s + np.array([0.0, 0.01, 0.02, 0.03])
        det.observe(RecordBatch.from_arrays(rank=np.arange(4), seq=s, enter_s=enter, exit_s=enter.max() + 0.01), (),
                    enter.max() + 0.01, heartbeats=[RankHeartbeat(r, enter.max() + 0.01) for r in range(4)])
    t0 = PERIOD * 12
    stale = RecordBatch.from_arrays(rank=[0, 1], seq=12, enter_s=[t0, t0 + 0.01])
    done = RecordBatch.from_arrays(rank=[2, 3], seq=12, enter_s=[t0 + 0.02, t0 + 0.03], exit_s=t0 + 0.04)
    det.observe(RecordBatch.concat([stale, done]), (), t0 + 0.05)
    return det, t0


def test_no_verdict_after_a_rank_reported_that_training_finished() -> None:
    det, t0 = _finished_job()
    hbs = [RankHeartbeat(0, t0 + 0.5, finished=True), RankHeartbeat(1, t0 + 0.5, finished=True)]
    assert det.observe((), (), t0 + 0.6, heartbeats=hbs) == []
    assert det.observe((), (), t0 + 1000.0) == []
    assert det.ended is not None and det.ended["rank"] == 0 and "finished" in det.ended["reason"]


def test_without_the_finished_report_the_same_records_look_like_a_comm_hang() -> None:
    """The control: what issue 29 saw (two healthy ranks blamed), when ranks 0 and 1 still answer
    after 2 and 3 left #12 but do not say that training finished."""
    det, t0 = _finished_job()
    hbs = [RankHeartbeat(0, t0 + 0.5), RankHeartbeat(1, t0 + 0.5)]
    assert [(v.kind, v.ranks) for v in det.observe((), (), t0 + 1000.0, heartbeats=hbs)] == [(VerdictKind.hang_comm, (0, 1))]


def test_quiet_ranks_whose_peers_left_the_collective_are_not_held_in_it() -> None:
    """Ranks 0 and 1 are not heard from after 2 and 3 left #12: their in-flight records are stale
    (they left too, then went quiet), so nothing holds the job in #12."""
    det, t0 = _finished_job()
    assert det.observe((), (), t0 + 1000.0) == []


def test_the_live_detector_stops_at_a_finished_report_and_the_trace_says_why(tmp_path) -> None:  # noqa: ANN001
    live = LiveDetectors()
    cfg = DetectorConfig(warmup_collectives=2, hang_timeout_floor_seconds=1.0, warmup_hang_timeout_seconds=1.0)
    placement = {r: (f"j-worker-{r}", f"node-{r}") for r in range(3)}

    def report(rank: int, state: str, recs: list[dict]) -> ProgressReport:
        return ProgressReport.model_validate({"jobName": "j", "replicaIndex": rank, "state": state, "collectives": recs})

    def rec(s: int, exit_: bool = True) -> dict:
        return {"seq": s, "kind": "all_reduce", "nbytes": 8, "enterS": 1000.0 + s, "exitS": 1000.0 + s + 0.01 if exit_ else None}

    reports = {f"j-worker-{r}": report(r, "running", [rec(s) for s in range(6)]) for r in range(3)}
    assert live.feed("ns/j", cfg, 0, placement, reports, 1006.0) == []
    # rank 0 leaves #6 first and finishes; its last shipped record of #6 is in flight
    reports = {"j-worker-0": report(0, "finished", [rec(6, exit_=False)]),
               "j-worker-1": report(1, "running", [rec(6)]), "j-worker-2": report(2, "running", [rec(6)])}
    assert live.feed("ns/j", cfg, 0, placement, reports, 1006.5) == []
    assert live.feed("ns/j", cfg, 0, placement, {}, 2000.0) == []
    # the same, offline: a trace with the finished heartbeat gives no verdict either
    det = live._jobs["ns/j"].detector
    assert det.ended is not None and det.ended["rank"] == 0
    path = tmp_path / "t.jsonl"
    recs = [CollectiveRecord(r, s, "all_reduce", 8, 1000.0 + s, 1000.0 + s + 0.01) for r in range(3) for s in range(6)]
    recs += [CollectiveRecord(0, 6, "all_reduce", 8, 1006.0, None)]
    recs += [CollectiveRecord(r, 6, "all_reduce", 8, 1006.0, 1006.01) for r in (1, 2)]
    write_trace(path, {0: "a", 1: "b", 2: "c"}, recs, heartbeats=[RankHeartbeat(0, 1006.5, finished=True)], end_s=2000.0)
    tr = read_trace(path)
    assert tr.heartbeats[0].finished
    assert diagnose(tr, cfg) == []
    out = CliRunner().invoke(loco, ["diagnose", "--config", str(cfg_path(tmp_path, cfg)), str(path)])
    assert out.exit_code == 0 and "detection stopped at t=1006.500s: rank 0 reported that training finished" in out.output
    no_finish = Trace(tr.topology, tr.records, end_s=2000.0)
    assert [v.kind for v in diagnose(no_finish, cfg)] == [VerdictKind.hang_comm]


def cfg_path(tmp_path, cfg: DetectorConfig):  # noqa: ANN001,ANN201
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


# ---------------------------------------------------------------- a stale last report


def test_a_rank_frozen_after_its_last_report_is_blamed_where_its_peers_wait() -> None:
    """Rank 2's last report showed it inside #8; it then finished #8-#10 (its peers did too, so
    it took part) and froze before #11. Those records never shipped. Its peers wait in #11."""
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=10.0), Topology.uniform(4, 2))
    hb = lambda t, ranks=range(4): [RankHeartbeat(r, t) for r in ranks]  # noqa: E731
    offsets = np.array([0.0, 0.01, 0.02, 0.03])
    for s in range(8):
        enter = PERIOD * s + offsets
        det.observe(RecordBatch.from_arrays(rank=np.arange(4), seq=s, enter_s=enter, exit_s=enter.max() + 0.01), (),
                    enter.max() + 0.01, heartbeats=hb(enter.max() + 0.01))
    t8 = PERIOD * 8
    # the last poll that reached rank 2: it is inside #8
    assert det.observe(RecordBatch.from_arrays(rank=np.arange(4), seq=8, enter_s=t8 + offsets), (), t8 + 0.05,
                       heartbeats=hb(t8 + 0.05)) == []
    peers = np.array([0, 1, 3])
    t = t8 + 0.05
    for s in (8, 9, 10):
        enter = PERIOD * s + offsets[peers]
        t = PERIOD * s + 0.05
        assert det.observe(RecordBatch.from_arrays(rank=peers, seq=s, enter_s=enter, exit_s=t), (), t,
                           heartbeats=hb(t, peers)) == []
    t11 = PERIOD * 11
    assert det.observe(RecordBatch.from_arrays(rank=peers, seq=11, enter_s=t11 + offsets[peers]), (), t11 + 0.1,
                       heartbeats=hb(t11 + 0.1, peers)) == []
    assert det.observe((), (), t11 + 9.0, heartbeats=hb(t11 + 9.0, peers)) == []  # not yet: within the timeout
    verdicts = det.observe((), (), t11 + 10.5, heartbeats=hb(t11 + 10.5, peers))
    assert [(v.kind, v.ranks, v.seq) for v in verdicts] == [(VerdictKind.hang_noncomm, (2,), 11)], [v.message for v in verdicts]


def test_a_rank_still_reporting_from_inside_an_earlier_call_is_not_blamed_for_the_next() -> None:
    """The counterpart: rank 2 keeps answering (alive, held inside #8 by a comm fault), so its
    peers' wait in #9 does not make it a hang-noncomm suspect."""
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=10.0), Topology.uniform(4, 2))
    offsets = np.array([0.0, 0.01, 0.02, 0.03])
    for s in range(8):
        enter = PERIOD * s + offsets
        det.observe(RecordBatch.from_arrays(rank=np.arange(4), seq=s, enter_s=enter, exit_s=enter.max() + 0.01), (),
                    enter.max() + 0.01)
    t8 = PERIOD * 8
    inside = RecordBatch.from_arrays(rank=[2], seq=8, enter_s=t8 + 0.02)
    peers = np.array([0, 1, 3])
    done = RecordBatch.from_arrays(rank=peers, seq=8, enter_s=t8 + offsets[peers], exit_s=t8 + 0.05)
    waiting = RecordBatch.from_arrays(rank=peers, seq=9, enter_s=t8 + PERIOD + offsets[peers])
    det.observe(RecordBatch.concat([inside, done, waiting]), (), t8 + PERIOD + 0.1)
    for t in np.arange(t8 + PERIOD + 1.0, t8 + PERIOD + 40.0, 1.0):
        verdicts = det.observe((), (), float(t), heartbeats=[RankHeartbeat(r, float(t)) for r in range(4)])
        assert all(v.kind is not VerdictKind.hang_noncomm for v in verdicts), [v.message for v in verdicts]


# ---------------------------------------------------------------- silence, judged against the other ranks


def test_ranks_going_quiet_together_are_never_blamed_whenever_the_detector_looks() -> None:
    """All 4 ranks stop reporting within 1.2 s (the job ended, or the operator was cut off). Old
    rule: at the instant rank 0 was quiet for the timeout but the others not quite yet, rank 0
    was blamed; a replay ticking a second later saw everyone quiet and blamed nobody."""
    det = Detector(DetectorConfig(silence_timeout_seconds=40.0), Topology.uniform(4, 2))
    det.observe(RecordBatch.from_arrays(rank=np.arange(4), seq=0, enter_s=1.0, exit_s=1.1), (), 1.1,
                heartbeats=[RankHeartbeat(0, 14.7)] + [RankHeartbeat(r, 15.9) for r in (1, 2, 3)])
    for t in np.arange(16.0, 120.0, 0.1):
        assert det.observe((), (), float(t)) == [], t


def test_a_rank_quiet_while_its_peers_keep_reporting_is_still_blamed() -> None:
    det = Detector(DetectorConfig(silence_timeout_seconds=40.0), Topology.uniform(4, 2))
    det.observe(RecordBatch.from_arrays(rank=np.arange(4), seq=0, enter_s=1.0, exit_s=1.1), (), 1.1,
                heartbeats=[RankHeartbeat(r, 1.1) for r in range(4)])
    verdicts = []
    for t in np.arange(2.0, 60.0, 1.0):
        verdicts += det.observe((), (), float(t), heartbeats=[RankHeartbeat(r, float(t)) for r in (0, 1, 3)])
    assert [(v.kind, v.ranks, v.seq) for v in verdicts] == [(VerdictKind.hang_noncomm, (2,), None)]
    assert 41.0 <= verdicts[0].at_s <= 43.0


def test_a_rank_frozen_inside_a_collective_before_reporting_it_is_the_one_blamed() -> None:
    """Rank 2 entered #8 right after its last report and froze there; every rank waits inside #8.
    Live, the entry never shipped and rank 2 is missing from #8 (hang-noncomm); a trace holding
    the entry must blame rank 2 the same way, not every rank as a comm hang."""
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=10.0), Topology.uniform(4, 2))
    offsets = np.array([0.0, 0.01, 0.02, 0.03])
    for s in range(8):
        enter = PERIOD * s + offsets
        det.observe(RecordBatch.from_arrays(rank=np.arange(4), seq=s, enter_s=enter, exit_s=enter.max() + 0.01), (),
                    enter.max() + 0.01, heartbeats=[RankHeartbeat(r, enter.max() + 0.01) for r in range(4)])
    t8 = PERIOD * 8
    det.observe(RecordBatch.from_arrays(rank=np.arange(4), seq=8, enter_s=t8 + offsets), (), t8 + 0.1,
                heartbeats=[RankHeartbeat(r, t8 + 0.1) for r in (0, 1, 3)] + [RankHeartbeat(2, t8 - 0.5)])
    verdicts = []
    for t in np.arange(t8 + 1.0, t8 + 15.0, 1.0):
        verdicts += det.observe((), (), float(t), heartbeats=[RankHeartbeat(r, float(t)) for r in (0, 1, 3)])
    assert [(v.kind, v.ranks, v.seq) for v in verdicts] == [(VerdictKind.hang_noncomm, (2,), 8)], [v.message for v in verdicts]
    assert "stopped reporting" in verdicts[0].message
