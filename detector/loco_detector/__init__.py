"""C4-style fault detection: find the faulty rank, link or node from collective timings.

Pure and torch-free (numpy only), a library of its own (it imports only ``loco_contract``): the operator
runs it live on every TrainingJob, the trainer's local launcher on its own ranks, ``loco diagnose`` on a
recorded trace, ``bench/simulate_faults.py`` runs it on simulated clusters of up to 16,384
ranks. Rules, thresholds and limits: docs/fault-detection.md.

Typical live use (the caller owns the clock and the I/O)::

    detector = Detector(DetectorConfig(), Topology.from_mapping({0: "node-a", 1: "node-b"}))
    for verdict in detector.observe(records, link_samples, now_s, heartbeats=heartbeats):
        ...  # isolate verdict.ranks / verdict.node, restart from the last checkpoint
"""

from loco_contract.detection import DetectorConfig
from loco_detector.detector import Detector, diagnose, replay
from loco_detector.trace import Trace, TraceError, read_trace, write_trace
from loco_detector.types import (
    KINDS, CollectiveRecord, LinkBatch, LinkSample, RankHeartbeat, RecordBatch, Topology, Verdict, VerdictKind
)

__all__ = [
    "KINDS",
    "CollectiveRecord",
    "Detector",
    "DetectorConfig",
    "LinkBatch",
    "LinkSample",
    "RankHeartbeat",
    "RecordBatch",
    "Topology",
    "Trace",
    "TraceError",
    "Verdict",
    "VerdictKind",
    "diagnose",
    "read_trace",
    "replay",
    "write_trace",
]
