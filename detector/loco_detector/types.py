"""Input and output types of the fault detector: torch-free, numpy-only, frozen.

The detector's inputs mirror what the trainer's communication layer records
(the trainer's ``comm.CollectiveRecord``) but carry a rank and times in **seconds on one common
clock** (each rank's monotonic clock plus its estimated offset to the operator's clock). Two
forms exist for each stream:

* row objects (:class:`CollectiveRecord`, :class:`LinkSample`), convenient and readable;
* columnar batches (:class:`RecordBatch`, :class:`LinkBatch`), numpy arrays, one row per record:
  what the detector works on internally and what a fast producer (the simulator, the operator
  merging thousands of ranks) should hand it, since touching 16,384 Python objects per step
  already costs several milliseconds.

The output is a :class:`Verdict`: what is blamed (ranks, a link, a node), on which collective,
and the numbers behind the decision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np

from loco_contract.protocol import CollectiveSummary, LinkSummary

#: The collective kinds the trainer's ``Comm`` records; a record of another kind is refused.
KINDS: tuple[str, ...] = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv", "barrier")
#: Point-to-point kinds: their ``peer`` is the other end of one connection.
P2P_KINDS: frozenset[str] = frozenset({"send", "recv"})
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}


class VerdictKind(str, Enum):
    """The four C4 fault classes (communication slowness split into link and node/NIC)."""

    hang_noncomm = "hang-noncomm"  #: all ranks but k entered collective #n; k never does
    hang_comm = "hang-comm"  #: every rank entered #n; it never completes (a connection stopped)
    slow_noncomm = "slow-noncomm"  #: a rank keeps entering collectives later than its peers
    slow_comm_link = "slow-comm-link"  #: one slow cell of the source x destination latency matrix
    slow_comm_node = "slow-comm-node"  #: a whole slow row/column: a slow node or NIC


# ------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass(frozen=True, slots=True)
class CollectiveRecord:
    """One communication call of one rank.

    ``seq`` counts the communicator's calls from 0 and is identical on every rank of a healthy
    group; ``enter_s``/``exit_s`` are seconds on the common clock; ``exit_s`` is ``None`` while
    the call is in flight. ``peer`` is the other end of a send/recv (or a broadcast's source).
    The same ``(rank, seq)`` may be observed twice: first in flight, then completed; the later
    observation's ``exit_s`` wins.
    """

    rank: int
    seq: int
    kind: str
    nbytes: int
    enter_s: float
    exit_s: float | None = None
    peer: int | None = None

    @classmethod
    def from_summary(cls, rank: int, summary: CollectiveSummary) -> "CollectiveRecord":
        """``rank``'s record as the flight recorder exports it (the progress protocol's shape, common clock)."""
        return cls(rank=rank, seq=summary.seq, kind=summary.kind, nbytes=summary.nbytes, enter_s=summary.enter_s,
                   exit_s=summary.exit_s, peer=summary.peer)


@dataclasses.dataclass(frozen=True, slots=True)
class LinkSample:
    """Time one connection took to move ``nbytes`` from rank ``src`` to rank ``dst``.

    Comes from transport-level timestamps of a collective's connections, from probes, or from
    point-to-point calls. ``seconds = math.inf`` reports a **stalled** connection: a transfer that
    has made no progress (what a hang-comm verdict is built from). ``at_s`` is when the sample
    was taken (common clock; informational).
    """

    src: int
    dst: int
    seconds: float
    nbytes: int
    at_s: float = 0.0

    @classmethod
    def from_summary(cls, summary: LinkSummary) -> "LinkSample":
        """A sample as the flight recorder exports it (a stalled connection's null ``seconds`` is ``inf``)."""
        return cls(src=summary.src, dst=summary.dst, seconds=math.inf if summary.seconds is None else summary.seconds,
                   nbytes=summary.nbytes, at_s=summary.at_s)


@dataclasses.dataclass(frozen=True, slots=True)
class RankHeartbeat:
    """The last time (common clock) the operator heard from ``rank`` (e.g. a /status answer).

    ``finished``: that answer said training ended on the rank (``ProgressReport.state`` finished);
    from then on the detector reaches no verdicts (the ranks still running are winding down).
    """

    rank: int
    last_report_s: float
    finished: bool = False


def _f64(values: Any) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64)


def _i64(values: Any) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class RecordBatch:
    """Columnar :class:`CollectiveRecord` rows (all arrays have the same length).

    ``exit_s`` holds ``NaN`` for in-flight calls, ``peer`` holds ``-1`` for none, ``kind`` holds
    indices into :data:`KINDS`.
    """

    rank: np.ndarray
    seq: np.ndarray
    kind: np.ndarray
    nbytes: np.ndarray
    enter_s: np.ndarray
    exit_s: np.ndarray
    peer: np.ndarray

    @classmethod
    def empty(cls) -> "RecordBatch":
        z = np.zeros(0, dtype=np.int64)
        f = np.zeros(0, dtype=np.float64)
        return cls(z, z, z, z, f, f, z)

    @classmethod
    def from_arrays(
        cls,
        *,
        rank: Any,
        seq: Any,
        enter_s: Any,
        exit_s: Any | None = None,
        kind: str | Any = "all_reduce",
        nbytes: int | Any = 0,
        peer: Any | None = None,
    ) -> "RecordBatch":
        """Build a batch from arrays (scalars broadcast); ``kind`` may be a name or codes."""
        rank_a = _i64(rank)
        n = rank_a.shape[0]
        if isinstance(kind, str):
            kind_a = np.full(n, kind_code(kind), dtype=np.int64)
        else:
            kind_a = np.broadcast_to(_i64(kind), (n,)).copy()
        return cls(
            rank=rank_a,
            seq=np.broadcast_to(_i64(seq), (n,)).copy(),
            kind=kind_a,
            nbytes=np.broadcast_to(_i64(nbytes), (n,)).copy(),
            enter_s=np.broadcast_to(_f64(enter_s), (n,)).copy(),
            exit_s=np.full(n, np.nan) if exit_s is None else np.broadcast_to(_f64(exit_s), (n,)).copy(),
            peer=np.full(n, -1, dtype=np.int64) if peer is None else np.broadcast_to(_i64(peer), (n,)).copy(),
        )

    @classmethod
    def from_records(cls, records: Iterable[CollectiveRecord]) -> "RecordBatch":
        rows = list(records)
        if not rows:
            return cls.empty()
        return cls(
            rank=_i64([r.rank for r in rows]),
            seq=_i64([r.seq for r in rows]),
            kind=_i64([kind_code(r.kind) for r in rows]),
            nbytes=_i64([r.nbytes for r in rows]),
            enter_s=_f64([r.enter_s for r in rows]),
            exit_s=_f64([math.nan if r.exit_s is None else r.exit_s for r in rows]),
            peer=_i64([-1 if r.peer is None else r.peer for r in rows]),
        )

    @classmethod
    def concat(cls, batches: Sequence["RecordBatch"]) -> "RecordBatch":
        if not batches:
            return cls.empty()
        return cls(*(np.concatenate([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(cls)))

    def __len__(self) -> int:
        return int(self.rank.shape[0])

    def take(self, index: Any) -> "RecordBatch":
        """Rows selected by a boolean mask or an index array."""
        return RecordBatch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def to_records(self) -> list[CollectiveRecord]:
        return [
            CollectiveRecord(
                rank=int(self.rank[i]), seq=int(self.seq[i]), kind=KINDS[int(self.kind[i])],
                nbytes=int(self.nbytes[i]), enter_s=float(self.enter_s[i]),
                exit_s=None if math.isnan(self.exit_s[i]) else float(self.exit_s[i]),
                peer=None if self.peer[i] < 0 else int(self.peer[i]),
            )
            for i in range(len(self))
        ]


@dataclasses.dataclass(frozen=True)
class LinkBatch:
    """Columnar :class:`LinkSample` rows (``seconds`` may hold ``inf``: a stalled connection)."""

    src: np.ndarray
    dst: np.ndarray
    seconds: np.ndarray
    nbytes: np.ndarray
    at_s: np.ndarray

    @classmethod
    def empty(cls) -> "LinkBatch":
        z = np.zeros(0, dtype=np.int64)
        f = np.zeros(0, dtype=np.float64)
        return cls(z, z, f, z, f)

    @classmethod
    def from_arrays(cls, *, src: Any, dst: Any, seconds: Any, nbytes: int | Any = 0, at_s: float | Any = 0.0) -> "LinkBatch":
        src_a = _i64(src)
        n = src_a.shape[0]
        return cls(
            src=src_a,
            dst=np.broadcast_to(_i64(dst), (n,)).copy(),
            seconds=np.broadcast_to(_f64(seconds), (n,)).copy(),
            nbytes=np.broadcast_to(_i64(nbytes), (n,)).copy(),
            at_s=np.broadcast_to(_f64(at_s), (n,)).copy(),
        )

    @classmethod
    def from_samples(cls, samples: Iterable[LinkSample]) -> "LinkBatch":
        rows = list(samples)
        if not rows:
            return cls.empty()
        return cls(
            src=_i64([s.src for s in rows]), dst=_i64([s.dst for s in rows]),
            seconds=_f64([s.seconds for s in rows]), nbytes=_i64([s.nbytes for s in rows]),
            at_s=_f64([s.at_s for s in rows]),
        )

    @classmethod
    def concat(cls, batches: Sequence["LinkBatch"]) -> "LinkBatch":
        if not batches:
            return cls.empty()
        return cls(*(np.concatenate([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(cls)))

    def __len__(self) -> int:
        return int(self.src.shape[0])

    def take(self, index: Any) -> "LinkBatch":
        return LinkBatch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def to_samples(self) -> list[LinkSample]:
        return [
            LinkSample(int(self.src[i]), int(self.dst[i]), float(self.seconds[i]), int(self.nbytes[i]), float(self.at_s[i]))
            for i in range(len(self))
        ]


def kind_code(kind: str) -> int:
    """Index of ``kind`` in :data:`KINDS`; a clear ValueError for anything else."""
    try:
        return _KIND_CODE[kind]
    except KeyError:
        raise ValueError(f"record kind {kind!r} is not one of {', '.join(KINDS)}") from None


# ---------------------------------------------------------------------------------- topology


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where each rank runs: ``nodes[rank]`` is the node (host) name of ``rank``.

    Ranks are ``0 .. world_size - 1``. Node indices (``node_index``) number the distinct names
    in order of first appearance.
    """

    nodes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("topology is empty: give at least one rank -> node entry")
        names: dict[str, int] = {}
        index = np.array([names.setdefault(n, len(names)) for n in self.nodes], dtype=np.int64)
        object.__setattr__(self, "_node_index", index)
        object.__setattr__(self, "_node_names", tuple(names))

    @classmethod
    def from_mapping(cls, rank_to_node: Mapping[int, str]) -> "Topology":
        """From ``{rank: node}``; every rank ``0 .. max`` must be present."""
        ranks = sorted(int(r) for r in rank_to_node)
        if ranks != list(range(len(ranks))):
            missing = sorted(set(range(max(ranks) + 1)) - set(ranks)) if ranks else [0]
            raise ValueError(f"topology must map every rank 0..{max(ranks, default=0)}; missing ranks {missing[:10]}")
        return cls(tuple(str(rank_to_node[r] if r in rank_to_node else rank_to_node[str(r)]) for r in ranks))  # type: ignore[index]

    @classmethod
    def uniform(cls, world_size: int, ranks_per_node: int = 8, prefix: str = "node") -> "Topology":
        """``world_size`` ranks packed ``ranks_per_node`` to a node, nodes named ``prefix-<i>``."""
        if world_size < 1 or ranks_per_node < 1:
            raise ValueError(f"world_size ({world_size}) and ranks_per_node ({ranks_per_node}) must be >= 1")
        return cls(tuple(f"{prefix}-{r // ranks_per_node}" for r in range(world_size)))

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    @property
    def node_index(self) -> np.ndarray:
        """``int64[world_size]``: node number of each rank."""
        return self._node_index  # type: ignore[attr-defined]

    @property
    def node_names(self) -> tuple[str, ...]:
        """Distinct node names; ``node_names[node_index[r]] == nodes[r]``."""
        return self._node_names  # type: ignore[attr-defined]

    def ranks_of(self, node: str) -> tuple[int, ...]:
        return tuple(r for r, n in enumerate(self.nodes) if n == node)

    def to_mapping(self) -> dict[int, str]:
        return dict(enumerate(self.nodes))


# ------------------------------------------------------------------------------------ output


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One diagnosed fault.

    ``ranks`` are the blamed ranks (a link's two ends; every rank of a blamed node); ``link`` is
    ``(src, dst)`` for link faults; ``node`` names the node when all blamed ranks live on one
    node (for a node/NIC verdict it is the blamed component); ``seq`` is the collective at which
    the decision was taken (``None`` for link-sample-only decisions); ``at_s`` is the detector
    clock when it was emitted; ``evidence`` holds plain numbers a human can check.
    """

    kind: VerdictKind
    ranks: tuple[int, ...]
    link: tuple[int, int] | None
    node: str | None
    seq: int | None
    evidence: dict[str, Any]
    message: str
    at_s: float = 0.0

    def key(self) -> tuple[Any, ...]:
        """Identity of the blamed component (kind, ranks, link, node): equal keys = same fault."""
        return (self.kind.value, self.ranks, self.link, self.node)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "ranks": list(self.ranks),
            "link": list(self.link) if self.link is not None else None,
            "node": self.node,
            "seq": self.seq,
            "atS": self.at_s,
            "evidence": self.evidence,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Verdict":
        link = data.get("link")
        return cls(
            kind=VerdictKind(data["kind"]),
            ranks=tuple(int(r) for r in data.get("ranks", ())),
            link=(int(link[0]), int(link[1])) if link else None,
            node=data.get("node"),
            seq=data.get("seq"),
            evidence=dict(data.get("evidence", {})),
            message=str(data.get("message", "")),
            at_s=float(data.get("atS", 0.0)),
        )
