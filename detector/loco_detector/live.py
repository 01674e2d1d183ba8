"""The live detector: feeds the workers' collective records to one :class:`Detector` per job.

Its callers are the operator (for every TrainingJob) and the trainer's local launcher (``--nproc``, for
its own ranks). The caller polls every running worker's ``GET /status?sinceSeq=S&sinceLink=L`` (see
docs/progress-protocol.md); each report carries the pod leader's collective records with
``seq > S`` and probe samples with ``id > L`` (bounded), times on the common clock (rank 0's wall
clock, see the trainer's ``Comm.sync_clock``). :class:`LiveDetectors` keeps, per job:

* one :class:`Detector` for the job's current membership epoch (a new epoch starts a fresh one:
  sequence numbers restart with the new processes; so does a change of ``spec.faultDetection``);
* per pod, the cursors to ask for next: the newest seq/link id seen, minus the records still in
  flight (so their completion is fetched again);
* the time each pod was last heard from (its heartbeat), and whether it said training finished
  (from then on the detector reaches no verdicts: the other ranks are winding down, not hung).

Detector ranks are **pod replica indices**: the pod leader (local rank 0) speaks for its pod, and
with one process per pod (the usual low-communication setup) that is the global rank.

Nothing here talks to Kubernetes or reads a clock: the caller passes ``now_s`` (wall-clock
seconds) and gets back :class:`FaultFinding` objects; the operator's planner turns them into actions
(event, ``status.faults``, pod deletion, avoid-list, optional cordon), the launcher logs them and may
stop the run.
A restarted operator starts with empty state: the verdicts that already acted are in
``status.faults`` (and their pods are gone), and the detector of the running epoch warms up again.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from loco_contract.detection import DetectorConfig
from loco_contract.protocol import CollectiveSummary, LinkSummary
from loco_detector.detector import Detector
from loco_detector.types import (
    CollectiveRecord,
    LinkSample,
    RankHeartbeat,
    Topology,
    Verdict,
    VerdictKind,
)

#: Most records a single poll asks a pod for (the server also caps what it returns).
MAX_RECORDS_PER_POLL = 512
#: ``ProgressReport.state`` of a worker whose training ended (``loco_contract.protocol.WorkerState``,
#: a str enum, compares equal): from then on the job's detector reaches no verdicts.
FINISHED = "finished"


def records_from_wire(rank: int, items: Iterable[CollectiveSummary | Mapping[str, Any]]) -> list[CollectiveRecord]:
    """Detector records of ``rank`` from the protocol's ``CollectiveSummary`` items (``ProgressReport.collectives``,
    as the flight recorder exports them), or their wire dicts (validated into it); malformed entries are skipped."""
    out = []
    for item in items:
        try:
            summary = item if isinstance(item, CollectiveSummary) else CollectiveSummary.model_validate(item)
        except ValidationError:
            continue
        out.append(CollectiveRecord.from_summary(rank, summary))
    return out


def links_from_wire(items: Iterable[LinkSummary | Mapping[str, Any]], world_size: int) -> list[LinkSample]:
    """Connection samples from the protocol's ``LinkSummary`` items (``ProgressReport.links``), or their wire dicts;
    entries naming ranks outside the job, or malformed, are skipped."""
    out = []
    for item in items:
        try:
            summary = item if isinstance(item, LinkSummary) else LinkSummary.model_validate(item)
        except ValidationError:
            continue
        if 0 <= summary.src < world_size and 0 <= summary.dst < world_size and summary.src != summary.dst:
            out.append(LinkSample.from_summary(summary))
    return out


@dataclasses.dataclass(frozen=True)
class FaultFinding:
    """A verdict resolved to Kubernetes objects: what the planner acts on.

    ``pods``/``nodes`` are the blamed ranks' pods and nodes (ranks whose pod is unknown are
    left out); ``epoch`` is the membership epoch the verdict was reached in (the planner ignores a
    finding from another epoch).
    """

    verdict: Verdict
    epoch: int
    pods: tuple[str, ...]
    nodes: tuple[str, ...]
    #: For slow-noncomm: the straggler's lateness as a fraction of the median interval between
    #: collectives (how much it slows the job); None when not applicable or not yet measurable.
    slowdown: float | None = None

    @property
    def actionable(self) -> bool:
        """Whether the operator should act (replace pods, avoid the node), per
        ``faultDetection.minSlowdownToAct``: hangs and connection faults always, a straggler only
        when it costs at least that fraction of the collective interval."""
        return self.slowdown is None or self.slowdown >= self.min_slowdown

    #: faultDetection.minSlowdownToAct of the job when the finding was made
    min_slowdown: float = 0.0

    @property
    def kind(self) -> str:
        return self.verdict.kind.value


@dataclasses.dataclass
class _PodCursor:
    since_seq: int = -1
    since_link: int = -1


@dataclasses.dataclass
class _JobState:
    epoch: int
    config: DetectorConfig
    detector: Detector
    pods_by_rank: dict[int, tuple[str, str]]  # rank -> (pod, node)
    cursors: dict[str, _PodCursor] = dataclasses.field(default_factory=dict)
    heard: dict[int, float] = dataclasses.field(default_factory=dict)
    #: ranks whose report said training finished (``ProgressReport.state``)
    finished: set[int] = dataclasses.field(default_factory=set)
    last_now_s: float = -math.inf
    #: entry times per collective seq (recent ones only), for the collective interval
    enters: dict[int, list[float]] = dataclasses.field(default_factory=dict)

    def note_enters(self, records: Sequence[CollectiveRecord], keep: int = 64) -> None:
        for rec in records:
            self.enters.setdefault(rec.seq, []).append(rec.enter_s)
        if len(self.enters) > keep:
            for seq in sorted(self.enters)[: len(self.enters) - keep]:
                del self.enters[seq]

    def interval_s(self) -> float | None:
        """Median time between consecutive collectives (median entry of each), or None."""
        seqs = sorted(self.enters)
        if len(seqs) < 3:
            return None
        med = [statistics.median(self.enters[s]) for s in seqs]
        gaps = [b - a for a, b in zip(med, med[1:]) if b > a]
        return statistics.median(gaps) if gaps else None


class LiveDetectors:
    """Per-job detectors of one operator process (kept in the operator memo, never global)."""

    def __init__(self) -> None:
        self._jobs: dict[str, _JobState] = {}

    def forget(self, job_key: str) -> None:
        self._jobs.pop(job_key, None)

    def cursor(self, job_key: str, epoch: int, pod: str) -> tuple[int, int]:
        """``(sinceSeq, sinceLink)`` to send with the next poll of ``pod`` (-1, -1 when unknown)."""
        state = self._jobs.get(job_key)
        if state is None or state.epoch != epoch or pod not in state.cursors:
            return (-1, -1)
        c = state.cursors[pod]
        return (c.since_seq, c.since_link)

    def feed(
        self,
        job_key: str,
        config: DetectorConfig,
        epoch: int,
        placement: Mapping[int, tuple[str, str | None]],
        reports: Mapping[str, Any],
        now_s: float,
    ) -> list[FaultFinding]:
        """Fold one poll round in; returns the new findings.

        ``placement`` maps every current-epoch worker rank to ``(pod name, node name or None)``;
        ``reports`` maps pod names to their polled ``ProgressReport`` (objects with ``collectives``
        and ``links`` lists; pods that did not answer are simply absent: their silence is a signal).
        Detection starts once every rank has a node (all pods scheduled); until then, and while
        ``config.enabled`` is false, nothing is fed.
        A report of an older epoch than ``epoch`` (a live resize's survivor that has not switched
        yet) counts as heard from its pod, but its records are not taken and its cursor stays.
        """
        if not config.enabled or not placement:
            return []
        world = max(placement) + 1
        if any(r not in placement or not placement[r][1] for r in range(world)):
            return []
        pods_by_rank = {r: (pod, node) for r, (pod, node) in placement.items()}  # type: ignore[misc]
        state = self._jobs.get(job_key)
        if state is None or state.epoch != epoch or state.pods_by_rank != pods_by_rank or state.config != config:
            # a new epoch, placement or spec.faultDetection: start over (the new detector warms up)
            topology = Topology.from_mapping({r: node for r, (_, node) in pods_by_rank.items()})
            state = _JobState(epoch, config, Detector(config, topology), pods_by_rank)
            self._jobs[job_key] = state
        now_s = max(now_s, state.last_now_s)
        state.last_now_s = now_s
        rank_of = {pod: r for r, (pod, _) in pods_by_rank.items()}
        records: list[CollectiveRecord] = []
        links: list[LinkSample] = []
        for pod, report in reports.items():
            rank = rank_of.get(pod)
            if rank is None:
                continue
            state.heard[rank] = now_s
            report_epoch = getattr(report, "epoch", None)
            if isinstance(report_epoch, int) and report_epoch < epoch:
                # a survivor of a live resize that has not switched yet: alive, but its records
                # belong to the old membership (old ranks, old collective sequence)
                continue
            if getattr(report, "state", None) == FINISHED:
                state.finished.add(rank)
            link_items = list(getattr(report, "links", None) or [])
            recs = records_from_wire(rank, getattr(report, "collectives", None) or [])
            records += recs
            links += links_from_wire(link_items, world)
            cursor = state.cursors.setdefault(pod, _PodCursor())
            if recs:
                in_flight = [r.seq for r in recs if r.exit_s is None]
                cursor.since_seq = (min(in_flight) - 1) if in_flight else max(r.seq for r in recs)
            ids = [x.id for x in link_items if isinstance(x, LinkSummary)]
            ids += [int(x["id"]) for x in link_items if isinstance(x, Mapping) and "id" in x]
            if ids:
                cursor.since_link = max(ids)
        heartbeats = [RankHeartbeat(rank=r, last_report_s=t, finished=r in state.finished) for r, t in state.heard.items()]
        state.note_enters(records)
        verdicts = state.detector.observe(records, links, now_s, heartbeats=heartbeats)
        return [self._resolve(state, v) for v in verdicts]

    @staticmethod
    def _resolve(state: _JobState, verdict: Verdict) -> FaultFinding:
        pods = tuple(state.pods_by_rank[r][0] for r in verdict.ranks if r in state.pods_by_rank)
        nodes = tuple(dict.fromkeys(state.pods_by_rank[r][1] for r in verdict.ranks if r in state.pods_by_rank))
        if verdict.node and verdict.node not in nodes:
            nodes = (verdict.node, *nodes)
        slowdown = None
        if verdict.kind is VerdictKind.slow_noncomm:
            interval = state.interval_s()
            lateness = verdict.evidence.get("lateness_s")
            if interval and lateness is not None:
                slowdown = float(lateness) / interval
        return FaultFinding(verdict=verdict, epoch=state.epoch, pods=pods, nodes=nodes, slowdown=slowdown,
                            min_slowdown=state.config.min_slowdown_to_act)


def blamed_nodes(finding: FaultFinding) -> tuple[str, ...]:
    """The nodes a finding puts on the job's avoid-list: the node of a node/NIC verdict, else the
    nodes of the blamed ranks (both ends of a slow link: the detector cannot tell which end is
    at fault). A verdict naming two indistinguishable nodes (``scope: ambiguous-nodes``) avoids
    none: the pods are still replaced."""
    v = finding.verdict
    if v.evidence.get("scope") == "ambiguous-nodes":
        return ()
    return finding.nodes
