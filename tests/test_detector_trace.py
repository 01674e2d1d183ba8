"""Trace files, offline replay (`diagnose`), `loco diagnose` and the `spec.faultDetection` field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from loco_cli import main as loco
from loco_detector import (
    CollectiveRecord,
    DetectorConfig,
    LinkSample,
    RankHeartbeat,
    Topology,
    TraceError,
    VerdictKind,
    diagnose,
    read_trace,
    write_trace,
)
from loco_operator.spec import TrainingJobSpec


def _straggler_trace(path: Path, world: int = 16, steps: int = 14, straggler: int = 6) -> None:
    """Lock-step ranks (1 s compute, +-5 %); from step 8 ``straggler`` computes 2x slower."""
    rng = np.random.default_rng(0)
    ready = np.zeros(world)
    records = []
    for seq in range(steps):
        compute = rng.uniform(0.95, 1.05, world)
        if seq >= 8:
            compute[straggler] *= 2
        enter = ready + compute
        exit_s = enter.max() + 0.01
        records += [CollectiveRecord(r, seq, "all_reduce", 1024, float(enter[r]), float(exit_s)) for r in range(world)]
        ready = np.full(world, exit_s)
    write_trace(path, Topology.uniform(world, 4), records, end_s=float(ready[0]) + 0.1, meta={"case": "straggler"})


def _hang_trace(path: Path) -> None:
    """Rank 2 of 4 never enters collective #6; the trace was taken 60 s later."""
    records = []
    for seq in range(7):
        for r in range(4):
            if seq == 6 and r == 2:
                continue
            records.append(CollectiveRecord(r, seq, "all_reduce", 64, seq * 1.0 + 0.01 * r, None if seq == 6 else seq + 0.5))
    write_trace(path, {0: "a", 1: "a", 2: "b", 3: "b"}, records, [LinkSample(0, 2, 0.01, 64, 1.0)],
                [RankHeartbeat(2, 5.9)], end_s=66.0)


def test_trace_round_trips_through_jsonl_and_gzip(tmp_path: Path) -> None:
    for name in ("t.jsonl", "t.jsonl.gz"):
        path = tmp_path / name
        recs = [CollectiveRecord(0, 0, "send", 8, 1.0, None, peer=1), CollectiveRecord(1, 0, "recv", 8, 1.0, 1.5, peer=0)]
        write_trace(path, Topology(("n0", "n1")), recs, [LinkSample(0, 1, math.inf, 8, 2.0)], [RankHeartbeat(1, 3.0)],
                    end_s=9.0, meta={"job": "j"})
        tr = read_trace(path)
        assert tr.records.to_records() == recs
        assert tr.links.to_samples() == [LinkSample(0, 1, math.inf, 8, 2.0)]
        assert tr.heartbeats == (RankHeartbeat(1, 3.0),)
        assert (tr.topology.nodes, tr.end_s, dict(tr.meta)) == (("n0", "n1"), 9.0, {"job": "j"})


def test_diagnose_replays_a_trace_and_blames_the_straggler(tmp_path: Path) -> None:
    _straggler_trace(tmp_path / "s.jsonl")
    verdicts = diagnose(read_trace(tmp_path / "s.jsonl"))
    assert [(v.kind, v.ranks) for v in verdicts] == [(VerdictKind.slow_noncomm, (6,))]
    assert verdicts[0].seq == 9  # second late collective (8, 9): clearly late twice reaches the score K = 3


def test_diagnose_finds_a_hang_still_in_progress_at_the_end_of_the_trace(tmp_path: Path) -> None:
    _hang_trace(tmp_path / "h.jsonl")
    cfg = DetectorConfig(warmup_collectives=2, hang_timeout_floor_seconds=5.0)
    verdicts = diagnose(read_trace(tmp_path / "h.jsonl"), cfg)
    assert [(v.kind, v.ranks, v.node, v.seq) for v in verdicts] == [(VerdictKind.hang_noncomm, (2,), "b", 6)]
    assert 5.0 < verdicts[0].at_s - 6.0 < 7.0  # reached one tick after the timeout, not at the trace's end


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"format": "other"}'], "'format' is 'other'"),
        (['{"format": "loco-fault-trace", "version": 1, "topology": ["a"]}', '{"t": "c", "rank": 0}'], "line 2: record of type 'c' lacks field 'seq'"),
        (['{"format": "loco-fault-trace", "version": 1, "topology": ["a"]}', "{oops"], "line 2: not valid JSON"),
        (['{"format": "loco-fault-trace", "version": 1, "topology": ["a"]}', '{"t": "x"}'], "unknown record type"),
        (['{"format": "loco-fault-trace", "version": 2, "topology": ["a"]}'], "'version' 2 is not supported"),
    ],
)
def test_malformed_trace_errors_name_the_line_and_field(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_trace(path)


def test_loco_diagnose_prints_verdicts_with_evidence_and_exits_3(tmp_path: Path) -> None:
    _straggler_trace(tmp_path / "s.jsonl")
    result = CliRunner().invoke(loco, ["diagnose", str(tmp_path / "s.jsonl")])
    assert result.exit_code == 3, result.output
    assert "[slow-noncomm]" in result.output and "blame: ranks 6" in result.output and "consecutive: 2" in result.output
    assert "score: 3.0" in result.output and "required_score: 3" in result.output
    as_json = CliRunner().invoke(loco, ["diagnose", "--json", str(tmp_path / "s.jsonl")])
    data = json.loads(as_json.output)
    assert [(v["kind"], v["ranks"]) for v in data["verdicts"]] == [("slow-noncomm", [6])]


def test_loco_diagnose_reads_thresholds_from_a_trainingjob_manifest(tmp_path: Path) -> None:
    _straggler_trace(tmp_path / "s.jsonl")
    manifest = {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "spec": {"faultDetection": {"consecutive": 10}}}
    (tmp_path / "tj.yaml").write_text(yaml.safe_dump(manifest))
    result = CliRunner().invoke(loco, ["diagnose", str(tmp_path / "s.jsonl"), "--config", str(tmp_path / "tj.yaml")])
    assert result.exit_code == 0, result.output  # 6 late collectives < 10 consecutive
    assert "no fault found" in result.output
    (tmp_path / "bad.yaml").write_text("madMultiplier: -1\n")
    bad = CliRunner().invoke(loco, ["diagnose", str(tmp_path / "s.jsonl"), "--config", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2 and "faultDetection.madMultiplier" in bad.output


def test_trainingjob_spec_carries_fault_detection_thresholds() -> None:
    spec = TrainingJobSpec.model_validate({"faultDetection": {"hangTimeoutFloorSeconds": 30, "consecutive": 2}})
    assert spec.fault_detection is not None and spec.fault_detection.hang_timeout_floor_seconds == 30.0
    assert spec.to_wire()["faultDetection"]["consecutive"] == 2
    with pytest.raises(ValueError, match="faultDetection"):
        TrainingJobSpec.model_validate({"faultDetection": {"window": 1}})


def test_the_flight_recorders_summaries_become_detector_records_and_samples() -> None:
    """One wire shape: what the trainer's flight recorder exports is what the detector reads (no dict round trip)."""
    from loco_contract.protocol import CollectiveSummary, LinkSummary
    from loco_detector.live import links_from_wire, records_from_wire
    from loco_detector.types import LinkSample

    summary = CollectiveSummary(seq=4, kind="send", nbytes=128, enter_s=12.0, exit_s=12.5, peer=3)
    assert CollectiveRecord.from_summary(1, summary) == CollectiveRecord(1, 4, "send", 128, 12.0, 12.5, peer=3)
    assert records_from_wire(1, [summary, summary.to_wire(), {"seq": "x"}]) == [CollectiveRecord(1, 4, "send", 128, 12.0, 12.5, peer=3)] * 2
    stalled = LinkSummary(id=7, src=0, dst=2, seconds=None, nbytes=64, at_s=3.0)
    assert links_from_wire([stalled, LinkSummary(id=8, src=0, dst=9, seconds=0.1)], 3) == [
        LinkSample(src=0, dst=2, seconds=math.inf, nbytes=64, at_s=3.0)]