"""The C4-style detector on synthetic traces: each fault class blames exactly the right component.

Traces are built here step by step (numpy, seeded) so each scenario states its timing plainly:
every rank computes ``period`` seconds (+- jitter), enters the collective, and all ranks leave
it together once the last one arrived. Time is the detector's injected clock: nothing sleeps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from loco_detector import (
    CollectiveRecord,
    Detector,
    DetectorConfig,
    LinkBatch,
    LinkSample,
    RankHeartbeat,
    RecordBatch,
    Topology,
    VerdictKind,
)

RPN = 8  # ranks per node


class Job:
    """A synthetic data-parallel job: one all-reduce per step over a rail-aligned ring."""

    def __init__(self, world: int = 64, *, period_s: float = 1.0, jitter: float = 0.2, seed: int = 0) -> None:
        self.world, self.period_s, self.jitter = world, period_s, jitter
        self.rng = np.random.default_rng(seed)
        self.topology = Topology.uniform(world, RPN)
        self.ready_s = np.zeros(world)
        self.seq = 0
        ranks = np.arange(world)
        base = ranks - ranks % RPN
        self.src = np.concatenate([ranks, ranks])
        self.dst = np.concatenate([base + (ranks % RPN + 1) % RPN, (ranks + RPN) % world])
        self.link_slow = np.ones(self.src.size)
        self.link_base_s = 0.02

    def link_index(self, src: int, dst: int) -> int:
        return int(np.flatnonzero((self.src == src) & (self.dst == dst))[0])

    def step(self, *, slow: dict[int, float] | None = None, missing: tuple[int, ...] = (),
             complete: bool = True) -> tuple[RecordBatch, LinkBatch, float]:
        """One collective: records (and connection samples when it completes) and its end time."""
        compute = self.period_s * self.rng.uniform(1 - self.jitter, 1 + self.jitter, self.world)
        for rank, factor in (slow or {}).items():
            compute[rank] *= factor
        enter = self.ready_s + compute
        keep = np.setdiff1d(np.arange(self.world), missing)
        start = float(enter.max())
        seq = self.seq
        if missing or not complete:
            return RecordBatch.from_arrays(rank=keep, seq=seq, enter_s=enter[keep], nbytes=1 << 20), LinkBatch.empty(), start
        exit_s = start + 0.01 + self.rng.uniform(0, 1e-3, self.world)
        self.ready_s = exit_s
        self.seq += 1
        # 1 MiB per connection at ~50 MB/s: a slow link's excess is tens of ms, above minLinkExcessSeconds
        seconds = self.link_base_s * self.rng.uniform(1 - self.jitter, 1 + self.jitter, self.src.size) * self.link_slow
        links = LinkBatch.from_arrays(src=self.src, dst=self.dst, seconds=seconds, nbytes=1 << 20, at_s=float(exit_s.max()))
        records = RecordBatch.from_arrays(rank=np.arange(self.world), seq=seq, enter_s=enter, exit_s=exit_s, nbytes=1 << 20)
        return records, links, float(exit_s.max())


def run(job: Job, det: Detector, steps: int, **step_kwargs) -> list:  # noqa: ANN003
    verdicts = []
    for _ in range(steps):
        records, links, now = job.step(**step_kwargs)
        verdicts += det.observe(records, links, now)
    return verdicts


def test_healthy_64_ranks_1000_steps_with_20_percent_jitter_give_no_verdict() -> None:
    job = Job(64, jitter=0.2, seed=1)
    det = Detector(DetectorConfig(), job.topology)
    assert run(job, det, 1000) == []
    assert det.stats["records"] == 64_000 and det.stats["link_samples"] == 128_000


def test_straggler_is_blamed_and_the_ranks_that_waited_for_it_never_are() -> None:
    job = Job(64, seed=2)
    det = Detector(DetectorConfig(), job.topology)
    assert run(job, det, 20) == []
    verdicts = run(job, det, 10, slow={37: 2.5})
    assert [(v.kind, v.ranks, v.node) for v in verdicts] == [(VerdictKind.slow_noncomm, (37,), "node-4")]
    v = verdicts[0]
    # ~1.5 s late against a ~0.6 s threshold: each late collective adds the capped 1.5, so 2 reach K = 3
    assert v.evidence["consecutive"] == 2 and v.evidence["lateness_s"] > 1.5 * v.evidence["threshold_s"]
    assert v.evidence["score"] == 3.0 and v.evidence["required_score"] == 3
    assert v.seq == 21  # the second late collective (20, 21)
    # the 63 others spent ~0.6 s waiting inside each collective: still never blamed
    assert all(set(v.ranks) == {37} for v in det.history)


def test_late_arrivals_that_never_repeat_in_a_row_are_not_blamed() -> None:
    """Each on-time collective resets the evidence score: isolated late collectives, however
    late, never add up."""
    job = Job(64, seed=3)
    det = Detector(DetectorConfig(consecutive=3), job.topology)
    run(job, det, 20)
    verdicts = []
    for _ in range(5):
        verdicts += run(job, det, 1, slow={5: 2.0}) + run(job, det, 1)
    assert verdicts == []
    # the control: in a row they are blamed, at the K-th: they are about as late as the one-off outliers seen
    assert run(job, det, 2, slow={5: 2.0}) == [] and run(job, det, 1, slow={5: 2.0})


def test_a_whole_node_of_stragglers_is_one_verdict_naming_the_node() -> None:
    job = Job(64, seed=4)
    det = Detector(DetectorConfig(), job.topology)
    run(job, det, 20)
    verdicts = run(job, det, 5, slow={r: 2.0 for r in range(16, 24)})
    assert [(v.kind, v.ranks, v.node, v.evidence["scope"]) for v in verdicts] == [
        (VerdictKind.slow_noncomm, tuple(range(16, 24)), "node-2", "node")
    ]


def test_noncomm_hang_blames_exactly_the_rank_that_never_entered_after_the_timeout() -> None:
    job = Job(64, seed=5)
    cfg = DetectorConfig(hang_timeout_floor_seconds=3.0)
    det = Detector(cfg, job.topology)
    run(job, det, 20)
    records, _, _ = job.step(missing=(11,))
    median_enter = float(np.median(records.enter_s))
    noncomm_timeout = max(3.0, cfg.hang_timeout_multiplier * det._max_healthy_spread_s, det._max_interval_s)
    assert det.observe(records, (), median_enter + noncomm_timeout - 0.01) == []  # not yet: could be a straggler
    verdicts = det.observe((), (), median_enter + noncomm_timeout + 0.01)
    assert [(v.kind, v.ranks, v.node, v.seq) for v in verdicts] == [(VerdictKind.hang_noncomm, (11,), "node-1", 20)]
    assert verdicts[0].evidence["entered"] == 63 and verdicts[0].evidence["missing"] == 1
    assert det.observe((), (), median_enter + 1000) == []  # reported once


def test_a_straggler_one_period_late_is_slow_not_hung() -> None:
    job = Job(64, jitter=0.1, seed=6)
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=0.5), job.topology)
    run(job, det, 20)
    verdicts = []
    for _ in range(6):  # poll finely while rank 3 is 0.45 to 0.75 periods late each step
        records, links, end = job.step(slow={3: 1.6})
        for t in np.arange(records.enter_s.min(), end + 0.1, 0.05):
            visible = records.take(records.enter_s <= t)
            visible = RecordBatch.from_arrays(rank=visible.rank, seq=visible.seq, enter_s=visible.enter_s,
                                              exit_s=np.where(visible.exit_s <= t, visible.exit_s, np.nan), nbytes=1 << 20)
            verdicts += det.observe(visible, links if t >= end else (), float(t))
    assert {v.kind for v in verdicts} == {VerdictKind.slow_noncomm} and {v.ranks for v in verdicts} == {(3,)}


def test_comm_hang_blames_the_stalled_connection() -> None:
    job = Job(64, seed=7)
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=2.0), job.topology)
    run(job, det, 20)
    records, _, start = job.step(complete=False)
    stalled = [LinkSample(15, 23, math.inf, 4096, start + 0.1)]
    assert det.observe(records, stalled, start + 1.0) == []
    verdicts = det.observe((), (), start + 2.5)
    assert [(v.kind, v.link, v.ranks, v.seq) for v in verdicts] == [(VerdictKind.hang_comm, (15, 23), (15, 23), 20)]
    assert verdicts[0].evidence["evidence_from"] == "stalled connections"


def test_comm_hang_blames_the_endpoint_all_stalled_connections_share() -> None:
    job = Job(64, seed=8)
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=2.0), job.topology)
    run(job, det, 20)
    records, _, start = job.step(complete=False)
    stalled = [LinkSample(9, 17, math.inf, 4096, start), LinkSample(1, 9, math.inf, 4096, start)]
    verdicts = det.observe(records, stalled, start + 3.0)
    assert [(v.kind, v.ranks, v.link, v.node, v.evidence["scope"]) for v in verdicts] == [
        (VerdictKind.hang_comm, (9,), None, "node-1", "endpoint")
    ]


def test_comm_hang_on_point_to_point_blames_the_unfinished_pair() -> None:
    topo = Topology.uniform(4, 2)
    cfg = DetectorConfig(warmup_collectives=0, hang_timeout_floor_seconds=1.0, warmup_hang_timeout_seconds=1.0)
    det = Detector(cfg, topo)
    # seq 0: 0 -> 1 and 2 -> 3 exchange; 2 -> 3 completes, 0 -> 1 never does
    recs = [
        CollectiveRecord(0, 0, "send", 64, 10.0, None, peer=1),
        CollectiveRecord(1, 0, "recv", 64, 10.0, None, peer=0),
        CollectiveRecord(2, 0, "send", 64, 10.0, 10.1, peer=3),
        CollectiveRecord(3, 0, "recv", 64, 10.0, 10.1, peer=2),
    ]
    verdicts = det.observe(recs, (), 12.0)
    assert [(v.kind, v.link) for v in verdicts] == [(VerdictKind.hang_comm, (0, 1))]
    assert verdicts[0].evidence["evidence_from"] == "unfinished point-to-point calls"


def test_a_hang_inside_a_ring_of_point_to_point_steps_blames_the_first_stalled_connection() -> None:
    """A ring all-reduce run in the open (faultDetection.ringAllReduce) on 4 ranks: step 0 (seqs 0-1)
    completes; in step 1 (seqs 2-3) rank 1's send to rank 2 never completes, so rank 2 waits in its
    receive, rank 3 finishes step 1 and waits in step 2 for rank 2, and so on: every rank is inside a
    different call, connections stall one after the other. The one of the call furthest behind
    (1 -> 2, seq 2) is blamed, even though its stall was reported with a later time (clocks of
    different ranks disagree by more than a step), once the hang-comm timeout passed without any
    call completing; not before."""
    topo = Topology.uniform(4, 1)
    cfg = DetectorConfig(warmup_collectives=0, hang_timeout_floor_seconds=1.0, warmup_hang_timeout_seconds=1.0)
    det = Detector(cfg, topo)
    recs = []
    for r in range(4):  # step 0: send right, receive from the left, all done
        recs += [CollectiveRecord(r, 0, "send", 64, 10.0, 10.01, peer=(r + 1) % 4),
                 CollectiveRecord(r, 1, "recv", 64, 10.0, 10.01, peer=(r - 1) % 4)]
    recs += [CollectiveRecord(1, 2, "send", 64, 10.02, None, peer=2),  # held: the fault
             CollectiveRecord(1, 3, "recv", 64, 10.02, None, peer=0),
             CollectiveRecord(2, 2, "send", 64, 10.02, 10.03, peer=3),
             CollectiveRecord(2, 3, "recv", 64, 10.02, None, peer=1),  # waits on 1 -> 2
             CollectiveRecord(3, 2, "send", 64, 10.02, 10.03, peer=0),
             CollectiveRecord(3, 3, "recv", 64, 10.02, 10.03, peer=2),
             CollectiveRecord(3, 4, "send", 64, 10.04, 10.05, peer=0),
             CollectiveRecord(3, 5, "recv", 64, 10.04, None, peer=2),  # waits on 2 -> 3 (rank 2 is stuck)
             CollectiveRecord(0, 2, "send", 64, 10.02, 10.03, peer=1),
             CollectiveRecord(0, 3, "recv", 64, 10.02, 10.03, peer=3),
             CollectiveRecord(0, 4, "send", 64, 10.04, None, peer=1)]  # rank 1 never receives it
    stalled = [LinkSample(1, 2, math.inf, 64, 10.045), LinkSample(2, 3, math.inf, 64, 10.04),
               LinkSample(0, 1, math.inf, 64, 10.04)]
    assert det.observe(recs, stalled, 10.9) == []  # within the timeout: nothing yet
    verdicts = det.observe((), (), 11.2)
    assert [(v.kind, v.link, v.ranks) for v in verdicts] == [(VerdictKind.hang_comm, (1, 2), (1, 2))]
    assert verdicts[0].seq == 2 and [1, 2] in verdicts[0].evidence["stalled_links"]
    assert det.observe((), (), 12.0) == []  # reported once


def test_slow_link_blames_one_cell_of_the_matrix() -> None:
    job = Job(64, seed=9)
    det = Detector(DetectorConfig(), job.topology)
    run(job, det, 10)
    job.link_slow[job.link_index(20, 28)] = 4.0
    verdicts = run(job, det, 6)
    assert [(v.kind, v.link, v.ranks, v.node) for v in verdicts] == [(VerdictKind.slow_comm_link, (20, 28), (20, 28), None)]
    # 4x slow is 2x the factor: each sample adds the capped 1.5, so 2 samples reach K = 3
    assert verdicts[0].evidence["median_ratio"] > 2.0 and verdicts[0].evidence["consecutive"] == 2
    assert verdicts[0].evidence["score"] == 3.0


def test_slow_node_blames_the_node_whose_row_and_column_are_slow() -> None:
    job = Job(64, seed=10)
    det = Detector(DetectorConfig(), job.topology)
    run(job, det, 10)
    node = job.topology.node_index
    cross = node[job.src] != node[job.dst]
    job.link_slow[cross & ((node[job.src] == 5) | (node[job.dst] == 5))] = 4.0
    verdicts = run(job, det, 6)
    assert [(v.kind, v.node, v.ranks, v.evidence["scope"]) for v in verdicts] == [
        (VerdictKind.slow_comm_node, "node-5", tuple(range(40, 48)), "node")
    ]
    # its neighbours' rows/columns point at node-5 only: explained away, not blamed
    assert verdicts[0].evidence["slow_out"] == 8 and verdicts[0].evidence["slow_in"] == 8


def test_slow_nic_of_one_rank_blames_that_rank() -> None:
    job = Job(64, seed=11)
    det = Detector(DetectorConfig(), job.topology)
    run(job, det, 10)
    job.link_slow[job.link_index(42, 50)] = 4.0
    job.link_slow[job.link_index(34, 42)] = 4.0
    verdicts = run(job, det, 6)
    assert [(v.kind, v.ranks, v.node, v.evidence["scope"]) for v in verdicts] == [
        (VerdictKind.slow_comm_node, (42,), "node-5", "nic")
    ]


def test_slow_link_recovers_and_can_be_blamed_again() -> None:
    job = Job(16, seed=12)
    det = Detector(DetectorConfig(), job.topology)
    run(job, det, 10)
    i = job.link_index(3, 11)
    job.link_slow[i] = 4.0
    assert len(run(job, det, 5)) == 1
    job.link_slow[i] = 1.0
    assert run(job, det, 5) == []
    job.link_slow[i] = 4.0
    assert [v.link for v in run(job, det, 5)] == [(3, 11)]


def test_silent_rank_is_blamed_only_when_the_job_stops_progressing() -> None:
    job = Job(16, seed=13)
    det = Detector(DetectorConfig(silence_timeout_seconds=5.0), job.topology)
    records, links, now = job.step()
    det.observe(records, links, now, heartbeats=[RankHeartbeat(r, now) for r in range(16)])
    # rank 4 goes quiet but collectives keep completing: it still takes part
    for _ in range(8):
        records, links, t = job.step()
        assert det.observe(records, links, t, heartbeats=[RankHeartbeat(r, t) for r in range(16) if r != 4]) == []
    # now nothing completes any more
    verdicts = det.observe((), (), t + 6.0, heartbeats=[RankHeartbeat(r, t + 6.0) for r in range(16) if r != 4])
    assert [(v.kind, v.ranks) for v in verdicts] == [(VerdictKind.hang_noncomm, (4,))]
    assert verdicts[0].evidence["reason"].startswith("stopped reporting")


def test_detector_is_deterministic() -> None:
    def once() -> list:
        job = Job(32, seed=14)
        det = Detector(DetectorConfig(), job.topology)
        return [v.to_dict() for v in run(job, det, 15) + run(job, det, 6, slow={7: 2.0})]

    first = once()
    assert first and first == once()


def test_records_outside_the_topology_are_refused_with_the_field_named() -> None:
    det = Detector(DetectorConfig(), Topology.uniform(4, 2))
    with pytest.raises(ValueError, match=r"record.rank 7 is outside the topology's ranks 0..3"):
        det.observe([CollectiveRecord(7, 0, "all_reduce", 8, 1.0, 2.0)], (), 2.0)
    with pytest.raises(ValueError, match=r"link.dst 9"):
        det.observe((), [LinkSample(0, 9, 0.1, 8)], 2.0)
    with pytest.raises(ValueError, match=r"record kind 'allreduce' is not one of"):
        det.observe([CollectiveRecord(0, 0, "allreduce", 8, 1.0, 2.0)], (), 2.0)


def test_config_is_camel_case_and_rejects_inconsistent_values() -> None:
    cfg = DetectorConfig.model_validate({"consecutive": 4, "madMultiplier": 6, "hangTimeoutFloorSeconds": 20})
    assert (cfg.consecutive, cfg.mad_multiplier, cfg.hang_timeout_floor_seconds) == (4, 6.0, 20.0)
    with pytest.raises(ValueError, match=r"consecutive \(40\) must be <= window \(32\)"):
        DetectorConfig(consecutive=40)
    with pytest.raises(ValueError, match="linkSlownessFactor|link_slowness_factor"):
        DetectorConfig.model_validate({"linkSlownessFactor": 0.5})
    with pytest.raises(ValueError, match="madMultipler"):
        DetectorConfig.model_validate({"madMultipler": 3})


def test_collectives_completing_out_of_order_are_judged_once_and_never_look_hung() -> None:
    det = Detector(DetectorConfig(warmup_collectives=0, warmup_hang_timeout_seconds=10.0, hang_timeout_floor_seconds=1.0),
                   Topology.uniform(4, 2))
    # async all-reduce #0 is issued, #1 is issued and completes first, then #0 completes
    issued = [CollectiveRecord(r, 0, "all_reduce", 8, 1.0 + 0.01 * r, None) for r in range(4)]
    second = [CollectiveRecord(r, 1, "all_reduce", 8, 1.5 + 0.01 * r, 2.0) for r in range(4)]
    first_done = [CollectiveRecord(r, 0, "all_reduce", 8, 1.0 + 0.01 * r, 2.5) for r in range(4)]
    assert det.observe(issued + second, (), 2.1) == []
    assert det.observe(first_done, (), 2.6) == []
    assert det._open == {} and det._finalized_below == 2
    # a duplicate report of #1 arriving late is ignored, not mistaken for a new, half-entered collective
    assert det.observe(second[:1], (), 100.0) == [] and det._open == {}
    assert det.stats["late_records_ignored"] == 1


def test_a_lost_record_is_not_mistaken_for_a_hang() -> None:
    job = Job(16, seed=15)
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=1.0), job.topology)
    run(job, det, 10)
    records, links, now = job.step()
    det.observe(records.take(records.rank != 2), links, now)  # rank 2's record of #10 never arrives
    records, links, now = job.step()
    det.observe(records, links, now)  # but rank 2 went on to #11, so it did enter #10
    assert det.observe((), (), now + 1000.0) == []
    assert det.stats["incomplete_dropped"] == 1 and det._open == {}


def test_back_to_back_collectives_neither_hide_nor_reset_a_straggler() -> None:
    """DDP-style buckets: after the first all-reduce of a step everyone arrives together; those
    collectives say nothing about anyone, so the straggler's streak carries over them."""
    job = Job(32, jitter=0.1, seed=16)
    det = Detector(DetectorConfig(), job.topology)
    verdicts = []
    for step in range(20):
        records, links, now = job.step(slow={9: 2.0} if step >= 12 else None)
        verdicts += det.observe(records, links, now)
        for _ in range(2):  # two more buckets, entered right after the previous one
            t0 = job.ready_s + job.rng.uniform(0, 1e-3, job.world)
            bucket = RecordBatch.from_arrays(rank=np.arange(job.world), seq=job.seq, enter_s=t0, exit_s=t0.max() + 0.01)
            job.ready_s = np.full(job.world, t0.max() + 0.01)
            job.seq += 1
            verdicts += det.observe(bucket, (), float(job.ready_s[0]))
    assert [(v.kind, v.ranks) for v in verdicts] == [(VerdictKind.slow_noncomm, (9,))]
    assert verdicts[0].seq == 3 * 13  # first collective of the second (clearly) slow step (12, 13)


def test_comm_hang_without_connection_data_is_reported_but_not_localised() -> None:
    job = Job(16, seed=17)
    det = Detector(DetectorConfig(hang_timeout_floor_seconds=2.0), job.topology)
    run(job, det, 10)
    records, _, start = job.step(complete=False)
    verdicts = det.observe(records, (), start + 3.0)
    assert [(v.kind, v.ranks, v.link) for v in verdicts] == [(VerdictKind.hang_comm, tuple(range(16)), None)]
    assert "no per-connection data" in verdicts[0].evidence["evidence_from"]


def test_two_node_job_names_both_nodes_when_the_slow_one_cannot_be_told_apart() -> None:
    job = Job(16, seed=18)
    det = Detector(DetectorConfig(), job.topology)
    run(job, det, 10)
    node = job.topology.node_index
    job.link_slow[node[job.src] != node[job.dst]] = 4.0  # every cross-node connection touches both nodes
    verdicts = run(job, det, 4)
    assert [(v.kind, v.node, v.ranks, v.evidence["scope"]) for v in verdicts] == [
        (VerdictKind.slow_comm_node, None, tuple(range(16)), "ambiguous-nodes")
    ]


def _loaded_host_probes(det: Detector, floor_cfg_rounds: int, seed: int) -> list:
    """Healthy 1 ms probe samples on a starved host: every round, a random fifth of the samples is
    stretched 2x-9x (the receiving thread waited for a CPU), and one fixed link is starved in every
    round (its receiver sits on the busiest core). Returns the verdicts."""
    rng = np.random.default_rng(seed)
    n = 8
    src = np.repeat(np.arange(n), n - 1)
    dst = np.array([d for s in range(n) for d in range(n) if d != s])
    verdicts = []
    for k in range(floor_cfg_rounds):
        seconds = 1e-3 * rng.uniform(0.8, 1.2, src.size)
        starved = rng.random(src.size) < 0.2
        starved[(src == 3) & (dst == 5)] = True
        seconds[starved] *= rng.uniform(2.0, 9.0, int(starved.sum()))
        verdicts += det.observe((), LinkBatch.from_arrays(src=src, dst=dst, seconds=seconds, nbytes=4096, at_s=float(k)), float(k))
    return verdicts


def test_link_floor_keeps_cpu_starved_millisecond_probes_from_a_verdict() -> None:
    topo = Topology.uniform(8, 4)
    healthy = _loaded_host_probes(Detector(DetectorConfig(), topo), 40, seed=5)
    assert healthy == []
    # the same samples without the floor: the starved link is blamed (so the floor is what saved it)
    no_floor = _loaded_host_probes(Detector(DetectorConfig(min_link_excess_seconds=0.0), topo), 40, seed=5)
    assert any(v.kind is VerdictKind.slow_comm_link and v.link == (3, 5) for v in no_floor), [v.message for v in no_floor]


def test_link_floor_still_blames_a_link_slower_by_more_than_the_floor() -> None:
    topo = Topology.uniform(8, 4)
    det = Detector(DetectorConfig(min_link_excess_seconds=0.01), topo)
    n = 8
    src = np.repeat(np.arange(n), n - 1)
    dst = np.array([d for s in range(n) for d in range(n) if d != s])
    verdicts = []
    for k in range(8):
        seconds = np.full(src.size, 0.005)
        if k >= 3:
            seconds[(src == 2) & (dst == 6)] = 0.05  # 45 ms slower: above the floor
        verdicts += det.observe((), LinkBatch.from_arrays(src=src, dst=dst, seconds=seconds, nbytes=4096, at_s=float(k)), float(k))
    assert [(v.kind, v.link) for v in verdicts] == [(VerdictKind.slow_comm_link, (2, 6))]


def _rotating_probes(det: Detector, n: int, rounds: range, slow_node: int | None, rpn: int) -> list:
    """The trainer's transfer probes (Comm.probe) on ``n`` ranks: every round samples the ring
    (shift 1) and one rotating shift 2 .. n - 1; 1 ms healthy, 3 ms for every cross-node connection
    of ``slow_node``. Returns the verdicts with the round they came in."""
    ranks = np.arange(n)
    out = []
    for k in rounds:
        shift = 2 + k % (n - 2)
        src = np.concatenate([ranks, ranks])
        dst = np.concatenate([(ranks + 1) % n, (ranks + shift) % n])
        seconds = np.full(src.size, 1e-3)
        if slow_node is not None:
            touches = (src // rpn == slow_node) | (dst // rpn == slow_node)
            seconds[touches & (src // rpn != dst // rpn)] *= 3.0
        out += [(k, v) for v in det.observe((), LinkBatch.from_arrays(src=src, dst=dst, seconds=seconds, nbytes=4096,
                                                                       at_s=float(k)), float(k))]
    return out


def test_a_slow_node_is_judged_on_the_connections_sampled_since_it_became_slow() -> None:
    """8 ranks on 4 nodes, rotating probes: 30 healthy rounds sample every pair, then node-1's
    cross-node connections turn 3x slow. Each round samples only 2 of its many cross-node
    connections per rank; the old healthy samples of the others must not dilute its row, or the
    slowness would be pinned on its NICs or on single links. Blamed as the node, within 2 rounds."""
    n, rpn = 8, 2
    det = Detector(DetectorConfig(min_link_excess_seconds=0.0), Topology.uniform(n, rpn))
    assert _rotating_probes(det, n, range(30), None, rpn) == []
    verdicts = _rotating_probes(det, n, range(30, 40), 1, rpn)
    assert verdicts, "no verdict for a 3x slow node"
    k, first = verdicts[0]
    assert (first.kind, first.node, first.evidence["scope"]) == (VerdictKind.slow_comm_node, "node-1", "node"), first.message
    assert k <= 31, k  # a clear 3x slowdown: two slow rounds
    assert all(v.node == "node-1" for _, v in verdicts), [v.message for _, v in verdicts]


def test_ranks_held_in_a_stalled_exchange_are_not_blamed_for_missing_the_next_collective() -> None:
    """Rank 0's send to 1 stalls inside seq 0/1 (a p2p exchange); rank 2 finished its part and waits in the
    all-reduce #2 that 0 and 1 never reach. The fault is the stalled connection, not a non-comm hang."""
    cfg = DetectorConfig(warmup_collectives=0, hang_timeout_floor_seconds=1.0, warmup_hang_timeout_seconds=1.0)
    det = Detector(cfg, Topology.uniform(3, 1))
    recs = [
        CollectiveRecord(0, 0, "send", 64, 10.0, None, peer=1), CollectiveRecord(0, 1, "recv", 64, 10.0, 10.01, peer=2),
        CollectiveRecord(1, 0, "send", 64, 10.0, 10.01, peer=2), CollectiveRecord(1, 1, "recv", 64, 10.0, None, peer=0),
        CollectiveRecord(2, 0, "send", 64, 10.0, 10.01, peer=0), CollectiveRecord(2, 1, "recv", 64, 10.0, 10.01, peer=1),
        CollectiveRecord(2, 2, "all_reduce", 64, 10.02, None),
    ]
    stall = [LinkSample(src=0, dst=1, seconds=math.inf, nbytes=64, at_s=10.5)]
    verdicts = det.observe(recs, stall, 13.0)
    assert [(v.kind, v.link, v.ranks) for v in verdicts] == [(VerdictKind.hang_comm, (0, 1), (0, 1))], [v.message for v in verdicts]


# ------------------------------------------------------------------ evidence score (strong vs marginal)

#: 16 ranks entering evenly spread over +-0.1 s: every collective is informative (spread 0.2 s >
#: minLatenessSeconds) while nobody is late. With one rank moved past the others the median is
#: 0.013 s and the MAD 0.06 s, so the lateness threshold is 3 x 1.4826 x 0.06 = 0.267 s.
_OFFSETS = np.linspace(-0.1, 0.1, 16)


def _collective(det: Detector, seq: int, late: dict[int, float] | None = None) -> list:
    """Collective ``seq`` at t = 10 * seq; ``late`` maps a rank to its entry offset in seconds."""
    enter = 10.0 * seq + _OFFSETS
    for rank, offset in (late or {}).items():
        enter[rank] = 10.0 * seq + offset
    exit_s = enter.max() + 0.01
    records = RecordBatch.from_arrays(rank=np.arange(16), seq=seq, enter_s=enter, exit_s=exit_s, nbytes=1 << 20)
    return det.observe(records, (), exit_s)


def _warm_detector() -> Detector:
    # the lateness figures below are worked out for a 3-sigma threshold
    det = Detector(DetectorConfig(consecutive=3, mad_multiplier=3.0), Topology.uniform(16, 8))
    for seq in range(8):  # past warm-up (5 collectives)
        assert _collective(det, seq) == []
    return det


def test_a_clear_straggler_is_blamed_at_its_second_late_collective() -> None:
    det = _warm_detector()
    assert _collective(det, 8, {5: 2.0}) == []  # ~10x the threshold: capped at 1.5, short of K = 3
    verdicts = _collective(det, 9, {5: 2.0})
    assert [(v.kind, v.ranks, v.seq) for v in verdicts] == [(VerdictKind.slow_noncomm, (5,), 9)]
    assert verdicts[0].evidence["consecutive"] == 2 and verdicts[0].evidence["score"] == 3.0


def test_a_marginal_straggler_still_needs_k_late_collectives() -> None:
    det = _warm_detector()
    # 0.307 s late against a 0.267 s threshold: each late collective adds ~1.15 < 1.5
    assert _collective(det, 8, {5: 0.32}) == [] and _collective(det, 9, {5: 0.32}) == []
    verdicts = _collective(det, 10, {5: 0.32})
    assert [(v.kind, v.ranks, v.seq) for v in verdicts] == [(VerdictKind.slow_noncomm, (5,), 10)]
    ev = verdicts[0].evidence
    assert ev["threshold_s"] < ev["lateness_s"] < 1.5 * ev["threshold_s"], ev  # it really was marginal
    assert ev["consecutive"] == 3 and 3.0 <= ev["score"] < 4.5


def test_a_single_huge_outlier_followed_by_a_normal_collective_is_never_blamed() -> None:
    det = _warm_detector()
    verdicts = []
    for k in range(10):
        verdicts += _collective(det, 8 + 2 * k, {5: 9.0})  # 9 s late: ~40x the threshold, one collective
        verdicts += _collective(det, 9 + 2 * k)  # on time again: the score resets
    assert verdicts == []
    assert det._late_score[5] == 0.0 and det._late_streak[5] == 0


def test_after_a_one_off_outlier_only_a_straggler_later_than_it_counts_as_clear() -> None:
    """Two unrelated pauses in a row on one of thousands of ranks must not convict it: lateness
    within the largest one-off outlier seen so far counts as marginal (K collectives needed)."""
    det = _warm_detector()
    assert _collective(det, 8, {3: 9.0}) == [] and _collective(det, 9) == []  # a 9 s pause, once
    assert det._outlier_bar_s == pytest.approx(9.0, abs=0.05)
    # 2 s late (~7x the threshold, but within the pause seen): counts 1 each, blamed at the 3rd
    assert _collective(det, 10, {5: 2.0}) == [] and _collective(det, 11, {5: 2.0}) == []
    assert [v.seq for v in _collective(det, 12, {5: 2.0})] == [12]
    # 14 s late, beyond the pause: clear again, blamed at the 2nd
    assert _collective(det, 13, {6: 14.0}) == []
    verdicts = _collective(det, 14, {6: 14.0})
    assert [(v.ranks, v.seq) for v in verdicts] == [((6,), 14)]
    assert verdicts[0].evidence["outlier_bar_s"] == pytest.approx(9.0, abs=0.05)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 1024, 16_383, 16_384])
def test_the_detectors_fast_median_is_numpys_to_the_bit(size: int) -> None:
    """The judging rule's medians (entry times, lateness, exits) go through one partition instead of np.median:
    the verdicts must not change, so neither may a single bit of the medians (odd and even sizes, ties)."""
    from loco_detector.detector import _median

    rng = np.random.default_rng(size)
    for values in (rng.normal(1000.0, 5.0, size), np.round(rng.uniform(0, 3, size), 1), np.full(size, 2.5)):
        before = values.copy()
        assert _median(values) == float(np.median(values))
        assert np.array_equal(values, before)  # the input is left as it was (the rank order of entry times matters)
        assert _median(values.copy(), scratch=True) == float(np.median(values))  # a temporary: reordered in place
