"""C4-style fault detection: find the faulty rank, link or node from collective timings.

Pure and torch-free (numpy only): the operator runs it live, ``loco diagnose`` runs it on a
recorded trace, ``bench/simulate_faults.py`` runs it on simulated clusters of up to 16,384
ranks. Rules, thresholds and limits: docs/fault-detection.md.

Typical live use (the caller owns the clock and the I/O)::

    detector = Detector(DetectorConfig(), Topology.from_mapping({0: "node-a", 1: "node-b"}))
    for verdict in detector.observe(records, link_samples, now_s, heartbeats=heartbeats):
        ...  # isolate verdict.ranks / verdict.node, restart from the last checkpoint
"""

from loco_operator.faults.detector import Detector, diagnose, replay
from loco_operator.faults.trace import Trace, TraceError, read_trace, write_trace
from loco_operator.faults.types import (
    KINDS,
    CollectiveRecord,
    DetectorConfig,
    LinkBatch,
    LinkSample,
    RankHeartbeat,
    RecordBatch,
    Topology,
    Verdict,
    VerdictKind,
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
