"""The fault simulator (bench/simulate_faults.py): it injects what it claims and the detector finds it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim():  # noqa: ANN201 - the benchmark module
    spec = importlib.util.spec_from_file_location("simulate_faults", REPO / "bench" / "simulate_faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate_faults"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["hang-noncomm", "hang-comm", "slow-noncomm", "slow-comm-link", "slow-comm-node"])
def test_simulated_fault_is_blamed_exactly_at_64_ranks(sim, kind: str) -> None:  # noqa: ANN001
    # the simulated fabric's ring hop takes 0.7 ms (16 MiB at 25 GB/s), so a 3x slow link is only
    # ~1.3 ms slower per sample: the simulator scales minLinkExcessSeconds to its fabric (the default
    # is sized for probes on loaded hosts), as docs/fault-detection.md advises for fast fabrics
    assert sim.simulator_detector_config().min_link_excess_seconds < 0.0013
    result = sim.run_trial(sim.SimConfig(world=64, seed=3), kind)
    assert result["found"], [v.message for v, _ in result["verdicts"]]
    assert result["wrong"] == 0, [v.message for v, _ in result["verdicts"]]
    assert result["latency_collectives"] >= 1 and result["latency_s"] > 0


def test_simulated_healthy_run_gives_no_verdict(sim) -> None:  # noqa: ANN001
    result = sim.run_trial(sim.SimConfig(world=64, seed=4), None, steps=300)
    assert result["verdicts"] == []
    assert len(result["step_cpu_s"]) == 300


def _probed_hits(sim, kind: str) -> list:  # noqa: ANN001
    """Six 64-rank runs with the trainer's probes (5 per sync period): each must blame the fault
    exactly, with no wrong verdict, under one sync period after it starts. Returns the right verdicts."""
    period = sim.SimConfig().period_s
    hits = []
    for seed in range(6):
        result = sim.run_trial(sim.SimConfig(world=64, seed=seed, probes=5), kind, steps=40 * 6)
        assert result["found"] and result["wrong"] == 0, [v.message for v, _ in result["verdicts"]]
        assert result["latency_s"] < period, (seed, result["latency_s"])
        hits.append(next(v for v, _ in result["verdicts"] if result["fault"].matches(v)))
    return hits


@pytest.mark.parametrize("kind", ["hang-noncomm", "slow-noncomm"])
def test_probe_barriers_bring_rank_faults_within_one_sync_period(sim, kind: str) -> None:  # noqa: ANN001
    """With the trainer's probe barriers (5 per sync period), a stopped rank or a straggler is blamed
    before the next-but-one sync: under one period after it starts, where syncs alone take 2-3,
    and at a collective (a probe's timing point or a sync)."""
    assert all(hit.seq is not None for hit in _probed_hits(sim, kind))


@pytest.mark.parametrize("kind", ["slow-comm-link", "slow-comm-node"])
def test_transfer_probes_bring_slow_connections_within_one_sync_period(sim, kind: str) -> None:  # noqa: ANN001
    """The probes' transfers sample every ring connection at every probe (5 per sync period): a
    slow link or node is blamed exactly, under one period after it starts, where the sync
    all-reduce's samples alone take 2-4 periods (3 slow samples, one per period)."""
    assert _probed_hits(sim, kind)
    without = sim.run_trial(sim.SimConfig(world=64, seed=0), kind)  # the same fault, syncs only
    assert without["found"] and without["latency_s"] > sim.SimConfig().period_s, without["latency_s"]


@pytest.mark.parametrize("kind", ["slow-comm-link", "slow-comm-node"])
def test_a_connection_that_lost_only_bandwidth_is_found_and_bigger_probes_find_it_sooner(sim, kind: str) -> None:  # noqa: ANN001
    """The fault slows only the size / bandwidth part of a transfer. 4 KiB probes stay healthy on
    it; they must not wipe out the slow samples of the sync ring's megabyte chunks (nor dilute a
    node's row), so it is still blamed exactly, at the ring's pace. 1 MiB probes
    (faultDetection.probeBytes) are bandwidth-bound and find it within a sync period."""
    period = sim.SimConfig().period_s
    for probe_bytes, bound in ((4096, 5 * period), (1 << 20, period)):
        for seed in range(3):
            cfg = sim.SimConfig(world=64, seed=seed, probes=5, slow_model="bandwidth", probe_bytes=probe_bytes)
            result = sim.run_trial(cfg, kind, steps=40 * 6)
            assert result["found"] and result["wrong"] == 0, (probe_bytes, [v.message for v, _ in result["verdicts"]])
            assert result["latency_s"] < bound, (probe_bytes, seed, result["latency_s"])
            hit = next(v for v, _ in result["verdicts"] if result["fault"].matches(v))
            assert hit.evidence["median_ratio"] > 2.0, hit.evidence  # the slow samples, not the healthy small ones


def test_probe_barriers_add_no_false_positive(sim) -> None:  # noqa: ANN001
    result = sim.run_trial(sim.SimConfig(world=64, seed=4, probes=5), None, steps=300 * 6)
    assert result["verdicts"] == []


def test_feeder_hands_over_records_timed_before_the_current_poll(sim) -> None:  # noqa: ANN001
    """A probe barrier right after a sync is entered before the poll that delivered the sync's exit:
    it must still reach the detector, at the next poll (once it did not, and a rank that stopped
    there was never blamed)."""
    from loco_detector import Detector, RecordBatch, LinkBatch, Topology

    class Spy(Detector):
        seen: list = []

        def observe(self, records, links, now_s):  # noqa: ANN001, ANN201
            self.seen.append((sorted(set(records.seq.tolist())), now_s))
            return super().observe(records, links, now_s)

    det = Spy(sim.simulator_detector_config(), Topology.uniform(4, 2))
    feeder = sim.Feeder(det, poll_s=2.0)
    feeder.feed(RecordBatch.from_arrays(rank=range(4), seq=0, enter_s=[2.5, 2.6, 2.7, 2.8], exit_s=3.0), LinkBatch.empty(), 0)
    assert feeder.t == 4.0
    feeder.feed(RecordBatch.from_arrays(rank=range(4), seq=1, enter_s=3.01, exit_s=3.02, kind="barrier"), LinkBatch.empty(), 1)
    feeder.feed(RecordBatch.from_arrays(rank=range(4), seq=2, enter_s=5.0, exit_s=5.5), LinkBatch.empty(), 2)
    # seq 1 goes out with the next poll (6.0), together with what became visible up to then
    assert [(s, t) for s, t in det.seen if s] == [([0], 4.0), ([1, 2], 6.0)]
