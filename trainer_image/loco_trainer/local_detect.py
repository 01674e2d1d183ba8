"""Fault detection without the operator: the local launcher (``--nproc``) watches its own ranks.

In a cluster the operator polls every worker's ``/status`` and runs the detector; a run started with
``python -m loco_trainer --nproc N`` has no operator, so the launcher does the same for its emulated pods:
every pod leader serves ``/status`` on a free port it names in a file, and :class:`LocalDetection` polls them
once a second, feeds the records to the same detector (``loco_detector.live.LiveDetectors``, one node:
this machine), logs each verdict with its evidence, keeps a trace ``loco diagnose`` replays, and hands
the verdicts the operator would act on to ``on_fault`` (the launcher stops the run when asked to).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from loco_contract.detection import DetectorConfig
from loco_contract.protocol import STATUS_PATH, ProgressReport, WorkerState
from loco_detector.live import FaultFinding, LiveDetectors, links_from_wire, records_from_wire
from loco_detector.trace import write_trace
from loco_detector.types import CollectiveRecord, LinkSample, RankHeartbeat

log = logging.getLogger("loco_trainer")

#: the one node of a local run (the detector's topology needs a node per rank)
LOCAL_NODE = "localhost"
JOB_KEY = "local"


class LocalDetection:
    """Polls the pod leaders at ``ports`` (pod index -> port, or the path of a file the leader writes its
    port to once it listens) and runs the detector over them.

    ``poll_s``: time between rounds; ``timeout_s``: how long one pod may take to answer (a stopped
    process does not answer: its silence is what the detector judges). ``trace_path``: where the
    trace goes (rewritten after each verdict and at :meth:`stop`). ``on_fault``: called, from the
    polling thread, with each finding the operator would act on.
    """

    def __init__(self, ports: Mapping[int, int | str], config: DetectorConfig, *, host: str = "127.0.0.1",
                 trace_path: str | None = None, on_fault: Callable[[FaultFinding], None] | None = None,
                 poll_s: float = 1.0, timeout_s: float = 0.5, epoch: int = 0) -> None:
        self.ports, self.config, self.host = dict(ports), config, host
        self.trace_path, self.on_fault = trace_path, on_fault
        self.poll_s, self.timeout_s, self.epoch = poll_s, timeout_s, epoch
        self.findings: list[FaultFinding] = []
        self._detectors = LiveDetectors()
        self._records: dict[tuple[int, int], CollectiveRecord] = {}
        self._links: list[LinkSample] = []
        self._heard: dict[int, float] = {}
        self._finished: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def pod(index: int) -> str:
        return f"pod-{index}"

    # ---------------------------------------------------------------------------- polling
    def _port(self, index: int) -> int | None:
        """The pod's port; a port file is read until the leader has written it (None: not listening yet)."""
        port = self.ports[index]
        if isinstance(port, int):
            return port
        try:
            with open(port, encoding="utf-8") as fh:
                self.ports[index] = int(fh.read())
        except (OSError, ValueError):
            return None
        return self.ports[index]

    def _fetch(self, index: int) -> ProgressReport | None:
        port = self._port(index)
        if port is None:
            return None
        since_seq, since_link = self._detectors.cursor(JOB_KEY, self.epoch, self.pod(index))
        url = f"http://{self.host}:{port}{STATUS_PATH}?sinceSeq={since_seq}&sinceLink={since_link}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:  # noqa: S310 - loopback, our own ranks
                return ProgressReport.model_validate_json(resp.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None  # not up yet, stopped, or gone: silence is evidence

    def poll_once(self, now_s: float | None = None) -> list[FaultFinding]:
        """One round: ask every pod, feed the detector; returns the new findings (also logged and kept)."""
        reports = {self.pod(i): r for i in sorted(self.ports) if (r := self._fetch(i)) is not None}
        now_s = time.time() if now_s is None else now_s
        self._remember(reports, now_s)
        placement = {i: (self.pod(i), LOCAL_NODE) for i in self.ports}
        found = self._detectors.feed(JOB_KEY, self.config, self.epoch, placement, reports, now_s)
        for finding in found:
            v = finding.verdict
            log.warning("fault detector: %s [%s, ranks %s%s] evidence %s", v.message, v.kind.value, list(v.ranks),
                        f", link {v.link}" if v.link else "", json.dumps(v.evidence, default=str))
        self.findings += found
        if found:
            self.write_trace(now_s)
            for finding in found:
                if finding.actionable and self.on_fault is not None:
                    self.on_fault(finding)
        return found

    def _remember(self, reports: Mapping[str, ProgressReport], now_s: float) -> None:
        """What ``loco diagnose`` will replay: every record (the newest copy of each: an in-flight one is
        fetched again when it completes), every connection sample, and when each rank was last heard."""
        for pod, report in reports.items():
            rank = int(pod.removeprefix("pod-"))
            self._heard[rank] = now_s
            if report.state == WorkerState.finished:
                self._finished.add(rank)
            for record in records_from_wire(rank, report.collectives or []):
                self._records[(record.rank, record.seq)] = record
            self._links += links_from_wire(report.links or [], max(self.ports) + 1)

    def write_trace(self, end_s: float | None = None) -> None:
        if not self.trace_path:
            return
        heartbeats = [RankHeartbeat(rank=r, last_report_s=t, finished=r in self._finished) for r, t in self._heard.items()]
        write_trace(self.trace_path, {i: LOCAL_NODE for i in self.ports}, sorted(self._records.values(),
                    key=lambda r: (r.rank, r.seq)), self._links, heartbeats, end_s=end_s or time.time(),
                    meta={"source": "loco_trainer local launcher", "epoch": self.epoch,
                          "verdicts": [f.verdict.to_dict() for f in self.findings]})

    # ---------------------------------------------------------------------------- thread
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the watch must never take the run down
                log.exception("fault detector: a polling round failed")

    def start(self) -> "LocalDetection":
        self._thread = threading.Thread(target=self._run, daemon=True, name="loco-local-detector")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5 * self.timeout_s * max(1, len(self.ports)))
        self.write_trace()


def summary(finding: FaultFinding) -> dict[str, Any]:
    """A finding as the launcher reports it when it stops the run."""
    return {"kind": finding.verdict.kind.value, "ranks": list(finding.verdict.ranks), "message": finding.verdict.message}
