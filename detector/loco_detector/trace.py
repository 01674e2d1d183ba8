"""Collective-timing traces: a JSON Lines file the detector can replay (``loco diagnose``).

Format (version 1), one JSON object per line, optionally gzip-compressed (``.gz``):

* line 1, the header::

    {"format": "loco-fault-trace", "version": 1, "topology": ["node-0", "node-0", ...],
     "endS": 1234.5, "meta": {...}}

  ``topology[rank]`` is the node of each rank (the list's length is the world size); ``endS``
  is when the trace was taken (the detector's "now" at the end of the replay, which is what
  reveals a hang still in progress); ``meta`` is free-form (job, epoch, simulator settings).
* then records, in any order, each with ``"t"`` giving its type:

  - ``{"t": "c", "rank", "seq", "kind", "nbytes", "enterS", "exitS", "peer"}``: a collective
    (:class:`CollectiveRecord`; ``exitS``/``peer`` null when absent);
  - ``{"t": "l", "src", "dst", "seconds", "nbytes", "atS"}``: a connection sample
    (:class:`LinkSample`; ``"seconds": null`` means a stalled connection);
  - ``{"t": "h", "rank", "lastReportS", "finished"}``: a heartbeat (:class:`RankHeartbeat`;
    ``finished`` true when that report said training ended on the rank, else absent).

Times are seconds on one common clock. Writing and reading are streaming (no whole-file JSON).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from loco_detector.types import (
    KINDS, CollectiveRecord, LinkBatch, LinkSample, RankHeartbeat, RecordBatch, Topology, kind_code
)

FORMAT = "loco-fault-trace"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Trace:
    """A whole recorded trace, columnar."""

    topology: Topology
    records: RecordBatch
    links: LinkBatch = dataclasses.field(default_factory=LinkBatch.empty)
    heartbeats: tuple[RankHeartbeat, ...] = ()
    end_s: float | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def start_s(self) -> float:
        times = [a.min() for a in (self.records.enter_s, self.links.at_s) if a.size]
        times += [min(h.last_report_s for h in self.heartbeats)] if self.heartbeats else []
        return float(min(times)) if times else 0.0

    @property
    def last_event_s(self) -> float:
        times = [float(np.nanmax(a)) for a in (self.records.enter_s, self.records.exit_s, self.links.at_s)
                 if a.size and not np.isnan(a).all()]
        times += [max(h.last_report_s for h in self.heartbeats)] if self.heartbeats else []
        return max(times) if times else 0.0


def _open(path: str | Path, mode: str) -> IO[str]:
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8")  # type: ignore[arg-type]
    return open(path, mode, encoding="utf-8")


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def write_trace(
    path: str | Path,
    topology: Topology | Mapping[int, str],
    records: RecordBatch | Iterable[CollectiveRecord],
    links: LinkBatch | Iterable[LinkSample] = (),
    heartbeats: Iterable[RankHeartbeat] = (),
    *,
    end_s: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a trace file (see the module docstring); ``.gz`` paths are compressed."""
    topo = topology if isinstance(topology, Topology) else Topology.from_mapping(topology)
    rb = records if isinstance(records, RecordBatch) else RecordBatch.from_records(records)
    lb = links if isinstance(links, LinkBatch) else LinkBatch.from_samples(links)
    with _open(path, "w") as f:
        header = {"format": FORMAT, "version": VERSION, "topology": list(topo.nodes), "endS": end_s, "meta": dict(meta or {})}
        f.write(json.dumps(header) + "\n")
        exit_s = [None if math.isnan(x) else x for x in rb.exit_s.tolist()]
        for rank, seq, kind, nbytes, enter, ex, peer in zip(
            rb.rank.tolist(), rb.seq.tolist(), rb.kind.tolist(), rb.nbytes.tolist(), rb.enter_s.tolist(), exit_s, rb.peer.tolist()
        ):
            f.write(json.dumps({"t": "c", "rank": rank, "seq": seq, "kind": KINDS[kind], "nbytes": nbytes,
                                "enterS": enter, "exitS": ex, "peer": None if peer < 0 else peer}) + "\n")
        for src, dst, sec, nbytes, at in zip(lb.src.tolist(), lb.dst.tolist(), lb.seconds.tolist(), lb.nbytes.tolist(), lb.at_s.tolist()):
            f.write(json.dumps({"t": "l", "src": src, "dst": dst, "seconds": _num(sec), "nbytes": nbytes, "atS": at}) + "\n")
        for hb in heartbeats:
            line = {"t": "h", "rank": hb.rank, "lastReportS": hb.last_report_s}
            f.write(json.dumps({**line, "finished": True} if hb.finished else line) + "\n")


class TraceError(ValueError):
    """A malformed trace file: the message names the line and the field."""


def _lines(f: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_trace(path: str | Path) -> Trace:
    """Read a trace file; a :class:`TraceError` names the offending line and field."""
    cols: dict[str, list[Any]] = {k: [] for k in ("rank", "seq", "kind", "nbytes", "enter", "exit", "peer")}
    lcols: dict[str, list[Any]] = {k: [] for k in ("src", "dst", "seconds", "nbytes", "at")}
    heartbeats: list[RankHeartbeat] = []
    with _open(path, "r") as f:
        lines = _lines(f)
        try:
            _, header = next(lines)
        except StopIteration:
            raise TraceError(f"{path}: empty file; expected a '{FORMAT}' header line") from None
        if header.get("format") != FORMAT:
            raise TraceError(f"line 1: 'format' is {header.get('format')!r}, expected {FORMAT!r} (is this a Loco fault trace?)")
        if header.get("version") != VERSION:
            raise TraceError(f"line 1: 'version' {header.get('version')!r} is not supported (this reader knows version {VERSION})")
        topo_raw = header.get("topology")
        if not isinstance(topo_raw, list) or not topo_raw:
            raise TraceError("line 1: 'topology' must be a non-empty list giving each rank's node name")
        topology = Topology(tuple(str(n) for n in topo_raw))
        for lineno, obj in lines:
            t = obj.get("t")
            try:
                if t == "c":
                    cols["rank"].append(int(obj["rank"]))
                    cols["seq"].append(int(obj["seq"]))
                    cols["kind"].append(kind_code(str(obj["kind"])))
                    cols["nbytes"].append(int(obj.get("nbytes", 0)))
                    cols["enter"].append(float(obj["enterS"]))
                    ex = obj.get("exitS")
                    cols["exit"].append(math.nan if ex is None else float(ex))
                    peer = obj.get("peer")
                    cols["peer"].append(-1 if peer is None else int(peer))
                elif t == "l":
                    lcols["src"].append(int(obj["src"]))
                    lcols["dst"].append(int(obj["dst"]))
                    sec = obj.get("seconds")
                    lcols["seconds"].append(math.inf if sec is None else float(sec))
                    lcols["nbytes"].append(int(obj.get("nbytes", 0)))
                    lcols["at"].append(float(obj.get("atS", 0.0)))
                elif t == "h":
                    heartbeats.append(RankHeartbeat(int(obj["rank"]), float(obj["lastReportS"]), bool(obj.get("finished", False))))
                else:
                    raise TraceError(f"line {lineno}: unknown record type 't': {t!r} (expected 'c', 'l' or 'h')")
            except KeyError as exc:
                raise TraceError(f"line {lineno}: record of type {t!r} lacks field {exc.args[0]!r}") from None
            except (TypeError, ValueError) as exc:
                if isinstance(exc, TraceError):
                    raise
                raise TraceError(f"line {lineno}: {exc}") from None
    records = RecordBatch(
        rank=np.array(cols["rank"], dtype=np.int64), seq=np.array(cols["seq"], dtype=np.int64),
        kind=np.array(cols["kind"], dtype=np.int64), nbytes=np.array(cols["nbytes"], dtype=np.int64),
        enter_s=np.array(cols["enter"], dtype=np.float64), exit_s=np.array(cols["exit"], dtype=np.float64),
        peer=np.array(cols["peer"], dtype=np.int64),
    )
    links = LinkBatch(
        src=np.array(lcols["src"], dtype=np.int64), dst=np.array(lcols["dst"], dtype=np.int64),
        seconds=np.array(lcols["seconds"], dtype=np.float64), nbytes=np.array(lcols["nbytes"], dtype=np.int64),
        at_s=np.array(lcols["at"], dtype=np.float64),
    )
    end = header.get("endS")
    return Trace(topology, records, links, tuple(heartbeats), None if end is None else float(end), header.get("meta") or {})
