"""bench/os_faults_local.py reads the launcher's verdict lines: its pattern must match what local_detect logs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import os_faults_local as bench  # noqa: E402

from loco_detector.live import FaultFinding  # noqa: E402
from loco_detector.types import Verdict, VerdictKind  # noqa: E402
from loco_trainer.local_detect import LocalDetection  # noqa: E402


def test_the_bench_parses_the_verdict_line_the_launcher_logs(tmp_path, caplog, monkeypatch):
    verdict = Verdict(kind=VerdictKind.hang_noncomm, ranks=(1,), link=None, node="localhost", seq=81,
                      evidence={"waited_s": 10.2}, message="rank(s) 1 never entered collective #81")
    detection = LocalDetection({0: 1, 1: 2}, bench_config())
    monkeypatch.setattr(detection, "_fetch", lambda index: None)
    monkeypatch.setattr(detection._detectors, "feed", lambda *a, **k: [FaultFinding(
        verdict=verdict, epoch=0, pods=("pod-1",), nodes=("localhost",), slowdown=None, min_slowdown=0.2)])
    with caplog.at_level(logging.WARNING, logger="loco_trainer"):
        detection.poll_once(now_s=100.0)
    (tmp_path / "launcher.log").write_text("\n".join(r.getMessage() for r in caplog.records) + "\n")
    assert bench.verdicts(tmp_path) == [{"kind": "hang-noncomm", "ranks": [1]}]


def bench_config():
    from loco_contract.detection import DetectorConfig

    return DetectorConfig.model_validate(bench.DETECTOR)
