"""Simulate collective timings of 8 ... 16,384 ranks with injected faults; benchmark the detector.

The simulated job is low-communication training (DiLoCo-like): every rank computes for one
sync period, then all ranks run one all-reduce, a ring in rank order (``faultDetection.
ringAllReduce``: the trainer's ``Comm.ring_all_reduce``; its hops inside a node run over NVLink,
the one hop from a node's last rank to the next node's first over a NIC). Every connection of
the ring reports its transfer time, as the trainer's ring does.

Probes (``--probes``, the rows "1 + 5 probes"): the trainer's ``Comm.probe`` at every log
interval, modelled as it runs: a timing point (recorded as a barrier) and, since the probes of a
30 s period are 6 s apart (more than ``probeIntervalSeconds``, 1 s), a transfer probe every
time: one 4 KiB transfer per rank on the ring (shift 1) and one on a rotating shift
``2 + k % min(n - 2, 8)``. A transfer takes latency + bytes / bandwidth (5 us + NVLink inside a
node, 10 us + the NIC across nodes), with the connection jitter below.

Jitter model (``--jitter-model``):

* ``realistic`` (default): compute time ``period * (1 + N(0, 3 %))`` clipped to +-20 %, plus
  pauses (GC, I/O, a noisy neighbour) on 0.1 % of rank-steps lasting up to 30 % of a period;
  connection times ``* (1 + |N(0, 5 %)|)`` with 0.1 % of samples up to 1.8x;
* ``uniform``: compute time ``period * U(0.8, 1.2)`` (the +-20 % of the unit tests).

Injected faults (one per trial, at a random step after warm-up):
hang-noncomm (a rank stops computing and never enters the next collective), hang-comm (one
cross-node connection stops moving data: its sample is reported stalled), slow-noncomm (a
rank computes 1.5x slower), slow-comm-link (one cross-node connection of the ring 3x slower),
slow-comm-node (every cross-node connection of one node 3x slower). A slow connection is slow
at every size (congestion, a degraded or flapping port, retransmits), except in the rows marked
bandwidth-only (``SimConfig.slow_model``), where only the size / bandwidth part of a transfer is
slower: those run with the default 4 KiB probes and with 1 MiB ones (``probeBytes``).

The detector is fed as the operator feeds it: every ``poll`` seconds, with what became
visible since the last poll. Measured: right blame (precision/recall per class), detection
latency (collectives and seconds from injection to the verdict, and in sync periods), false
positives on healthy runs, and the detector's CPU time per sync step.

Usage::

    python bench/simulate_faults.py                 # full benchmark, writes docs/benchmarks.md
    python bench/simulate_faults.py --quick --no-docs
    python bench/simulate_faults.py --trace /tmp/t.jsonl --world 64 --fault slow-noncomm
    loco diagnose /tmp/t.jsonl
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))  # runnable from a checkout without installing

from loco_detector import (  # noqa: E402
    Detector,
    DetectorConfig,
    LinkBatch,
    RecordBatch,
    Topology,
    Verdict,
    VerdictKind,
    write_trace,
)

FAULT_CLASSES = [k.value for k in VerdictKind]
SECTION = "## Fault detection (simulator)"
PROBES = 5  # probe barriers per sync period in the probe rows: the trainer's defaults, syncEvery 50 / logEvery 10


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """The simulated cluster and job."""

    world: int = 64
    ranks_per_node: int = 8
    period_s: float = 30.0  # one sync period (DiLoCo: H inner steps)
    fragments: int = 1  # collectives per sync period (Streaming DiLoCo syncs M fragments, spread over the period)
    # probes per sync period (the trainer's Comm.probe at every log interval: H / logEvery, 5 at the
    # defaults); the last one follows the sync all-reduce at once. Only with fragments == 1. Each is a
    # timing point (a barrier record) and a transfer probe (ring + rotating shift, see the module docstring).
    probes: int = 0
    probe_bytes: int = 4096
    intra_latency_s: float = 5e-6
    cross_latency_s: float = 10e-6
    barrier_s: float = 50e-6  # a barrier's duration once the last rank has entered
    nbytes: int = 1 << 30  # payload of the sync all-reduce (a 256M-parameter fp32 model)
    intra_bytes_per_s: float = 150e9  # NVLink
    cross_bytes_per_s: float = 25e9  # one 200 Gb/s NIC per GPU
    poll_s: float = 2.0  # how often the operator hands the detector new records
    jitter_model: str = "realistic"
    # what an injected slow connection slows: "all" (latency and bandwidth alike: congestion, retransmits,
    # a flapping port) or "bandwidth" (only the size / bandwidth part: one link of a bond down)
    slow_model: str = "all"
    seed: int = 0

    @property
    def per_period(self) -> int:
        """Collectives per sync period: the syncs, plus the probe barriers (the last probe follows the sync)."""
        return self.fragments * (self.probes + 1 if self.probes else 1)


@dataclasses.dataclass(frozen=True)
class Fault:
    """One injected fault: its class, the step it starts at, and the component."""

    kind: str
    step: int
    rank: int | None = None
    link: tuple[int, int] | None = None
    node: str | None = None
    factor: float = 1.0

    def matches(self, v: Verdict) -> bool:
        """Whether ``v`` blames exactly this fault's component with the right class."""
        if v.kind.value != self.kind:
            return False
        if self.kind in ("hang-noncomm", "slow-noncomm"):
            return v.ranks == (self.rank,)
        if self.kind in ("hang-comm", "slow-comm-link"):
            return v.link == self.link
        return v.node == self.node and v.evidence.get("scope") == "node"


class Cluster:
    """Generates one collective (all ranks' records and connection samples) per sync step."""

    def __init__(self, cfg: SimConfig, fault: Fault | None = None) -> None:
        self.cfg = cfg
        self.fault = fault
        self.rng = np.random.default_rng(cfg.seed)
        n, rpn = cfg.world, cfg.ranks_per_node
        self.topology = Topology.uniform(n, rpn)
        ranks = np.arange(n)
        self.src = ranks  # the ring, in rank order
        self.dst = (ranks + 1) % n
        node = self.topology.node_index
        self.cross = node[self.src] != node[self.dst]
        self.chunk = cfg.nbytes // n
        bw = np.where(self.cross, cfg.cross_bytes_per_s, cfg.intra_bytes_per_s)
        self.base_s = self.chunk / bw
        self.slow = np.ones(self.src.size)
        self.time_s = 0.0  # all ranks start computing together
        self.ready_s = np.zeros(n)
        self.step = 0
        self.faulted = False  # a slow connection or node, once it started
        self.injected_at_s: float | None = None
        self.stopped = False
        self.transfer_probes = 0

    def _slowdown(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """The injected slowdown (1 = healthy) of any connections ``src -> dst``, once it started."""
        f, out = self.fault, np.ones(src.size)
        if f is None or not self.faulted:
            return out
        if f.kind == "slow-comm-link":
            out[(src == f.link[0]) & (dst == f.link[1])] = f.factor
        elif f.kind == "slow-comm-node":
            node = self.topology.node_index
            x = self.topology.node_names.index(f.node)
            out[(node[src] != node[dst]) & ((node[src] == x) | (node[dst] == x))] = f.factor
        return out

    def _jitter(self, size: int) -> np.ndarray:
        jitter = 1 + np.abs(self.rng.normal(0, 0.05, size))
        if self.cfg.jitter_model == "realistic":
            hiccup = self.rng.random(size) < 0.001
            jitter[hiccup] *= self.rng.uniform(1, 1.8, int(hiccup.sum()))
        return jitter

    def _probe_transfers(self, exit_s: np.ndarray) -> LinkBatch:
        """The connection samples of one transfer probe (Comm.probe) that left its timing point at ``exit_s``."""
        cfg, n = self.cfg, self.cfg.world
        ranks = np.arange(n)
        shifts = [1] + ([2 + self.transfer_probes % min(n - 2, 8)] if n > 2 else [])
        self.transfer_probes += 1
        src = np.concatenate([ranks] * len(shifts))
        dst = np.concatenate([(ranks + s) % n for s in shifts])
        node = self.topology.node_index
        cross = node[src] != node[dst]
        latency = np.where(cross, cfg.cross_latency_s, cfg.intra_latency_s)
        transfer = cfg.probe_bytes / np.where(cross, cfg.cross_bytes_per_s, cfg.intra_bytes_per_s)
        slow = self._slowdown(src, dst)
        if cfg.slow_model == "bandwidth":
            seconds = (latency + transfer * slow) * self._jitter(src.size)
        else:
            seconds = (latency + transfer) * self._jitter(src.size) * slow
        start = float(exit_s.max())
        return LinkBatch.from_arrays(src=src, dst=dst, seconds=seconds, nbytes=cfg.probe_bytes, at_s=start + seconds)

    def pick_fault(self, kind: str, step: int) -> Fault:
        """A random fault of class ``kind`` for this cluster, starting at ``step``."""
        n, rng = self.cfg.world, self.rng
        if kind in ("hang-noncomm", "slow-noncomm"):
            return Fault(kind, step, rank=int(rng.integers(n)), factor=1.5)
        if kind in ("hang-comm", "slow-comm-link"):
            i = int(rng.choice(np.flatnonzero(self.cross) if self.cross.any() else np.arange(self.src.size)))
            return Fault(kind, step, link=(int(self.src[i]), int(self.dst[i])), factor=3.0)
        node = self.topology.node_names[int(rng.integers(len(self.topology.node_names)))]
        return Fault(kind, step, node=node, factor=3.0)

    def kind_at(self, seq: int) -> str:
        """What collective ``seq`` is: ``all_reduce`` (a sync) or ``barrier`` (a probe)."""
        p = self.cfg.probes
        return "barrier" if p and seq % (p + 1) != p - 1 else "all_reduce"

    def sync_index(self, seq: int) -> int:
        """The seq of the first sync all-reduce at or after ``seq``."""
        while self.kind_at(seq) != "all_reduce":
            seq += 1
        return seq

    def _compute_s(self, seq: int) -> np.ndarray:
        cfg, rng, n = self.cfg, self.rng, self.cfg.world
        if cfg.probes and seq % (cfg.probes + 1) == cfg.probes:
            return rng.uniform(0, 1e-3, n)  # the probe right after the sync: logging only
        each_s = cfg.period_s / (cfg.fragments * max(1, cfg.probes))
        if cfg.jitter_model == "uniform":
            return each_s * rng.uniform(0.8, 1.2, n)
        c = each_s * (1 + np.clip(rng.normal(0, 0.03, n), -0.2, 0.2))
        pause = rng.random(n) < 0.001
        c[pause] += each_s * rng.uniform(0, 0.3, int(pause.sum()))
        return c

    def next_step(self) -> tuple[RecordBatch, LinkBatch]:
        """Records and samples of the next collective (exit NaN when it never completes)."""
        cfg, rng, n, f = self.cfg, self.rng, self.cfg.world, self.fault
        seq = self.step
        compute = self._compute_s(seq)
        kind = self.kind_at(seq)
        active = f is not None and seq >= f.step
        if active and seq == f.step:
            self.injected_at_s = float(self.ready_s.min())
        if active and f.kind == "slow-noncomm":
            compute[f.rank] *= f.factor
        if active and f.kind in ("slow-comm-link", "slow-comm-node") and not self.faulted:
            self.faulted = True
            self.slow = self._slowdown(self.src, self.dst)
        enter = self.ready_s + compute
        if active and f.kind == "hang-noncomm":
            # the rank stops somewhere in its compute phase and never enters this collective
            self.injected_at_s = float(self.ready_s[f.rank] + rng.uniform(0, compute[f.rank]))
            keep = np.arange(n) != f.rank
            self.stopped = True
            return (RecordBatch.from_arrays(rank=np.flatnonzero(keep), seq=seq, enter_s=enter[keep], kind=kind,
                                            nbytes=cfg.nbytes if kind == "all_reduce" else 0), LinkBatch.empty())
        start = float(enter.max())
        if kind == "barrier":  # a probe: every rank leaves once the last one entered
            exit_s = start + cfg.barrier_s + rng.uniform(0, 1e-4, n)
            self.ready_s = exit_s
            self.step += 1
            records = RecordBatch.from_arrays(rank=np.arange(n), seq=seq, enter_s=enter, exit_s=exit_s, kind=kind)
            return records, self._probe_transfers(exit_s)
        link_s = self.base_s * self._jitter(self.src.size) * self.slow
        ring_steps = 2 * (n - 1)
        duration = float(link_s.max()) * ring_steps  # the slowest connection paces the ring
        if active and f.kind == "hang-comm":
            self.injected_at_s = start
            self.stopped = True
            stall = LinkBatch.from_arrays(src=[f.link[0]], dst=[f.link[1]], seconds=math.inf, nbytes=self.chunk, at_s=start + 1.0)
            return RecordBatch.from_arrays(rank=np.arange(n), seq=seq, enter_s=enter, nbytes=cfg.nbytes), stall
        exit_s = start + duration + rng.uniform(0, 1e-4, n)
        self.ready_s = exit_s
        self.step += 1
        records = RecordBatch.from_arrays(rank=np.arange(n), seq=seq, enter_s=enter, exit_s=exit_s, nbytes=cfg.nbytes)
        links = LinkBatch.from_arrays(src=self.src, dst=self.dst, seconds=link_s, nbytes=self.chunk, at_s=start + duration)
        return records, links


class Feeder:
    """Hands the detector, every ``poll_s``, what became visible since the previous poll.

    Batches wait in a queue until a poll reaches their times: a record entered (or exited) at ``x``
    goes out with the first poll at or after ``x``, even when ``x`` falls before the poll time
    reached while feeding the previous batch (a probe barrier right after a sync)."""

    def __init__(self, detector: Detector, poll_s: float) -> None:
        self.detector = detector
        self.poll_s = poll_s
        self.t = 0.0
        self.cpu_s = 0.0
        self.calls = 0
        self.verdicts: list[tuple[Verdict, int]] = []  # with the step being fed
        # (records, entry handed over, exit handed over, links, sample handed over)
        self._queue: list[tuple[RecordBatch, np.ndarray, np.ndarray, LinkBatch, np.ndarray]] = []

    def feed(self, records: RecordBatch, links: LinkBatch, step: int, until_s: float | None = None) -> None:
        """Queue ``records``/``links``, then poll until everything in them was handed over (or until ``until_s``)."""
        n, self._step = len(records), step
        self._queue.append((records, np.zeros(n, bool), np.isnan(records.exit_s), links, np.zeros(len(links), bool)))
        ends = [a.max() for a in (records.enter_s, records.exit_s, links.at_s) if a.size and not np.isnan(a).all()]
        last = max(ends) if ends else self.t
        if until_s is not None:
            last = until_s
        while self.t < last:
            self.t += self.poll_s
            self._poll()
        self._queue = [q for q in self._queue if not (q[1].all() and q[2].all() and q[4].all())]

    def _poll(self) -> None:
        t, batches, samples = self.t, [], []
        for records, entered, exited, links, sampled in self._queue:
            new_enter = ~entered & (records.enter_s <= t)
            new_exit = ~exited & (records.exit_s <= t)
            take = new_enter | new_exit
            if take.any():
                batch = records.take(take)
                batches.append(dataclasses.replace(batch, exit_s=np.where(batch.exit_s <= t, batch.exit_s, np.nan)))
                entered |= new_enter
                exited |= new_exit
            if len(links):
                new = ~sampled & (links.at_s <= t)
                if new.any():
                    samples.append(links.take(new))
                    sampled |= new
        batch = RecordBatch.concat(batches) if batches else RecordBatch.empty()
        lb = LinkBatch.concat(samples) if samples else LinkBatch.empty()
        c0 = time.process_time()
        out = self.detector.observe(batch, lb, t)
        self.cpu_s += time.process_time() - c0
        self.calls += 1
        self.verdicts += [(v, self._step) for v in out]



#: issue 27 #4: the detector's median CPU time per collective at 16,384 ranks must stay under this
CPU_GOAL_MS = 2.0
#: healthy runs timed at 16,384 ranks; their medians' median is the figure judged against CPU_GOAL_MS
CPU_GOAL_RUNS = 3

def simulator_detector_config() -> DetectorConfig:
    """The default thresholds, except the slow-link absolute floor, which is off: the simulated
    fabric's ring hops take well under a millisecond (0.7 ms at 64 ranks, less at 1,024 and more),
    far below the 10 ms default floor meant for CPU-starved probes on real hosts, and the simulated
    hosts are never CPU-starved (docs/fault-detection.md: lower the floor on fast fabrics). Every
    other threshold is the shipped default."""
    return DetectorConfig(min_link_excess_seconds=0.0)


def run_trial(cfg: SimConfig, kind: str | None, *, steps: int = 40, horizon_periods: float = 12.0,
              det_cfg: DetectorConfig | None = None, record: list | None = None) -> dict[str, Any]:
    """One simulated run: healthy (``kind`` None) or with one injected fault of class ``kind``."""
    cluster = Cluster(cfg)
    fault = None
    if kind is not None:
        step = int(cluster.rng.integers(12 * cfg.per_period, 18 * cfg.per_period))
        if kind == "hang-comm":  # a connection stops moving data: it shows in the sync's transfers
            step = cluster.sync_index(step)
        fault = cluster.pick_fault(kind, step=step)
        cluster.fault = fault
    det = Detector(det_cfg or simulator_detector_config(), cluster.topology)
    feeder = Feeder(det, cfg.poll_s)
    step_cpu: list[float] = []
    while cluster.step < steps:
        step = cluster.step
        records, links = cluster.next_step()
        if record is not None:
            record.append((records, links))
        c0 = feeder.cpu_s
        if cluster.stopped:  # a hang: poll on until the horizon
            feeder.feed(records, links, step, until_s=float(records.enter_s.max()) + horizon_periods * cfg.period_s)
            break
        feeder.feed(records, links, step)
        step_cpu.append(feeder.cpu_s - c0)
        if fault and any(fault.matches(v) for v, _ in feeder.verdicts) and cluster.step > fault.step + 3:
            break  # found; a few more steps catch any wrong follow-up verdict
    result: dict[str, Any] = {"fault": fault, "verdicts": feeder.verdicts, "step_cpu_s": step_cpu, "end_s": feeder.t,
                              "topology": cluster.topology}
    if fault:
        hit = next(((v, s) for v, s in feeder.verdicts if fault.matches(v)), None)
        result["found"] = hit is not None
        result["correct"] = sum(fault.matches(v) for v, _ in feeder.verdicts)
        result["wrong"] = len(feeder.verdicts) - result["correct"]
        if hit:
            v, s = hit
            result["latency_s"] = v.at_s - cluster.injected_at_s
            result["latency_collectives"] = s - fault.step + 1
    return result


# ----------------------------------------------------------------------------- benchmark


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def benchmark(scales: list[int], trials: dict[int, int], healthy_steps: dict[int, int], seed: int,
              jitter_model: str, log=print, fragments: int = 1, classes: list[str] | None = None,
              probes: int = 0, variant: dict[str, Any] | None = None) -> dict[str, Any]:  # noqa: ANN001
    """Run every class at every scale; return the table rows (``healthy_steps[n] == 0``: no healthy run).
    ``healthy_steps`` counts sync periods; the CPU time is per collective (all the polls it took).
    ``variant``: further :class:`SimConfig` fields for every run (shown in the rows)."""
    variant = variant or {}
    rows, healthy, cpu = [], [], []
    per_period = SimConfig(fragments=fragments, probes=probes).per_period
    for n in scales:
        for kind in classes or FAULT_CLASSES:
            res = [run_trial(SimConfig(world=n, seed=seed + 1000 * i + 37 * FAULT_CLASSES.index(kind), jitter_model=jitter_model,
                                       fragments=fragments, probes=probes, **variant), kind, steps=40 * per_period)
                   for i in range(trials[n])]
            found = [r for r in res if r["found"]]
            correct = sum(r["correct"] for r in res)
            emitted = correct + sum(r["wrong"] for r in res)
            lat_c = [r["latency_collectives"] for r in found]
            lat_s = [r["latency_s"] for r in found]
            row = {
                "ranks": n, "class": kind, "trials": len(res), "recall": len(found) / len(res),
                "precision": correct / emitted if emitted else 1.0,
                "lat_coll_median": float(np.median(lat_c)) if lat_c else math.nan,
                "lat_coll_max": max(lat_c) if lat_c else math.nan,
                "lat_s_median": float(np.median(lat_s)) if lat_s else math.nan,
                "lat_s_max": max(lat_s) if lat_s else math.nan,
                "wrong": [v.message for r in res for v, _ in r["verdicts"] if not r["fault"].matches(v)][:3],
            }
            row["fragments"], row["probes"], row["variant"] = fragments, probes, _variant_label(variant)
            rows.append(row)
            log(f"  {n:>6} ranks {kind:<15} recall {_pct(row['recall'])} precision {_pct(row['precision'])} "
                f"latency {row['lat_coll_median']} coll / {row['lat_s_median']:.1f} s" + (f"  WRONG: {row['wrong']}" if row["wrong"] else ""))
        if not healthy_steps.get(n):
            continue
        t0 = time.perf_counter()
        h = run_trial(SimConfig(world=n, seed=seed + 7, jitter_model=jitter_model, fragments=fragments, probes=probes),
                      None, steps=healthy_steps[n] * per_period)
        step_cpu = np.array(h["step_cpu_s"][10 * per_period:])  # per collective (all the polls it took)
        healthy.append({"ranks": n, "steps": healthy_steps[n], "false_positives": len(h["verdicts"]),
                        "fragments": fragments, "probes": probes,
                        "examples": [v.message for v, _ in h["verdicts"][:3]]})
        run_medians = [float(np.median(step_cpu))]
        if n >= 16384:  # the goal's scale: this 2-core machine moves one run's median by +-10 %, so take 3 runs'
            for _ in range(CPU_GOAL_RUNS - 1):
                again = run_trial(SimConfig(world=n, seed=seed + 7, jitter_model=jitter_model, fragments=fragments,
                                            probes=probes), None, steps=healthy_steps[n] * per_period)
                run_medians.append(float(np.median(np.array(again["step_cpu_s"][10 * per_period:]))))
        cpu.append({"ranks": n, "median_ms": 1e3 * float(np.median(run_medians)), "p99_ms": 1e3 * float(np.quantile(step_cpu, 0.99)),
                    "max_ms": 1e3 * float(step_cpu.max()), "run_medians_ms": [1e3 * m for m in run_medians]})
        log(f"  {n:>6} ranks healthy: {len(h['verdicts'])} verdicts in {healthy_steps[n]} steps; detector "
            f"{cpu[-1]['median_ms']:.2f} ms/step median, {cpu[-1]['p99_ms']:.2f} ms p99 ({time.perf_counter() - t0:.0f} s)")
    return {"rows": rows, "healthy": healthy, "cpu": cpu}


def _variant_label(variant: dict[str, Any]) -> str:
    parts = []
    if variant.get("slow_model") == "bandwidth":
        parts.append("bandwidth-only fault")
    if "probe_bytes" in variant:
        parts.append(f"{variant['probe_bytes'] // 1024} KiB probes")
    return ", ".join(parts)


def _per_period(row: dict[str, Any]) -> str:
    """The "collectives per sync period" cell: syncs, plus the probe barriers when there are some, and the variant."""
    cell = f"{row['fragments']} + {row['probes']} probes" if row.get("probes") else f"{row['fragments']}"
    return cell + (f" ({row['variant']})" if row.get("variant") else "")


def _worst_periods(rows: list[dict[str, Any]], period: float, classes: tuple[str, ...], probes: bool) -> list[float]:
    return [r["lat_s_max"] / period for r in rows
            if r["class"].startswith(classes) and r["fragments"] == 1 and bool(r.get("probes")) == probes
            and not r.get("variant") and not math.isnan(r["lat_s_max"])]


def _span(values: list[float], fmt: str = ".1f") -> str:
    return "-" if not values else (f"{min(values):{fmt}}" if f"{min(values):{fmt}}" == f"{max(values):{fmt}}"
                                   else f"{min(values):{fmt}} to {max(values):{fmt}}")


def render(result: dict[str, Any], sim: SimConfig, det: DetectorConfig, command: str, probes: int = 0) -> str:
    period, rows = sim.period_s, result["rows"]
    slow_lat = [r[k] for r in rows if r["class"].startswith("slow") and not r.get("probes")
                for k in ("lat_coll_median", "lat_coll_max") if not math.isnan(r[k])]
    one = _worst_periods(rows, period, ("slow",), probes=False)
    if not one:
        one_period = "With one collective per period"
    elif max(one) > 2:
        one_period = (f"With one collective per period and no probes (what a job without timing points between its"
                      f" syncs would get) that is {_span(one)} sync periods in the worst case, above the 2-period goal:")
    else:
        one_period = f"With one collective per period that is at most {max(one):.1f} sync periods, within the goal, although"
    probed_noncomm = _worst_periods(rows, period, ("hang-noncomm", "slow-noncomm"), probes=True)
    probed_comm = _worst_periods(rows, period, ("slow-comm",), probes=True)
    lines = [
        SECTION,
        "",
        f"Generated by `{command}` ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average"
        f" {os.getloadavg()[0]:.1f} while it ran (other work shared the machine), Python {platform.python_version()},"
        f" numpy {np.__version__}; CPU time is process time of the detector's `observe` calls only). Simulated job: DiLoCo-like, one {sim.nbytes >> 20} MiB all-reduce per"
        f" {period:.0f} s sync period, 8 ranks per node, a ring in rank order (`faultDetection.ringAllReduce`, the"
        f" trainer's `Comm.ring_all_reduce`: every connection reports its transfer time), {sim.jitter_model} jitter (see `bench/simulate_faults.py`); the detector is polled every"
        f" {sim.poll_s:.0f} s with default thresholds (`DetectorConfig()`, slow-link absolute floor off for the simulated sub-millisecond hops: `minLinkExcessSeconds: 0`). Rows with 4 collectives per sync period"
        " simulate Streaming DiLoCo (a fragment sync every quarter period)."
        + (f" Rows with `1 + {probes} probes` add the trainer's probe (`Comm.probe`) at every log interval, {probes} per"
           f" sync period as with the defaults `syncEvery: 50`, `logEvery: 10` (the last one right after the sync): a"
           " timing point whose entry times the trainer ships as collective records, and, the probes being 6 s apart"
           f" (more than `probeIntervalSeconds`, 1 s), a transfer probe each time: one {sim.probe_bytes // 1024} KiB"
           " transfer per rank on the ring and one on a rotating shift (2 to 9), latency"
           f" ({sim.intra_latency_s * 1e6:.0f} us inside a node, {sim.cross_latency_s * 1e6:.0f} us across) plus"
           " size / bandwidth, with the connections' jitter. An injected slow connection is slow at every size"
           " (congestion, a degraded port, retransmits); one that only lost bandwidth would barely show in 4 KiB"
           " and be convicted by the ring's own samples alone, as in the rows without probes." if probes else ""),
        "",
        "Latency: from injection to the first right verdict, in collectives (the collective during which the fault"
        " started counts as 1; probe barriers count) and in seconds / sync periods. Precision: right verdicts / all verdicts in the faulty"
        " runs; recall: runs whose fault was blamed exactly (right class and right rank, link or node).",
        "",
        "| ranks | collectives per sync period | class | runs | recall | precision | latency (collectives) median / max | latency s median / max | sync periods (max) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {_per_period(r)} | {r['class']} | {r['trials']} | {_pct(r['recall'])} | {_pct(r['precision'])} | "
            f"{r['lat_coll_median']:.0f} / {r['lat_coll_max']:.0f} | {r['lat_s_median']:.1f} / {r['lat_s_max']:.1f} | "
            f"{r['lat_s_max'] / period:.2f} |"
        )
    lines += ["", "Healthy runs (no fault injected) and detector CPU time per collective (all the polls it took; a sync"
              " all-reduce brings one transfer time per ring connection, a probe two per rank):", "",
              "| ranks | collectives per sync period | healthy sync periods | verdicts (false positives) | CPU ms/collective median | p99 | max |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for h, c in zip(result["healthy"], result["cpu"]):
        lines.append(f"| {h['ranks']} | {_per_period(h)} | {h['steps']} | {h['false_positives']} | {c['median_ms']:.2f} | {c['p99_ms']:.2f} | {c['max_ms']:.2f} |")
    largest = [c["median_ms"] for h, c in zip(result["healthy"], result["cpu"]) if h["ranks"] >= 16384]
    runs = "; ".join(", ".join(f"{m:.2f}" for m in c.get("run_medians_ms", [])) for h, c in zip(result["healthy"], result["cpu"])
                     if h["ranks"] >= 16384)
    cpu_goal = (f" The CPU goal (issue 27 #4): a median under {CPU_GOAL_MS:g} ms per collective at 16,384 ranks: "
                + ("**met**" if largest and max(largest) < CPU_GOAL_MS else "**missed**")
                + f" ({' / '.join(f'{m:.2f}' for m in largest)} ms in the rows above, each the median of {CPU_GOAL_RUNS}"
                  f" healthy runs' medians: {runs}; 3.81 / 3.33 ms before the"
                  " 2026-12-07 rework; recall and precision unchanged: the faulty-run rows at 64 and 1,024 ranks, with"
                  " and without probes (recall, precision, latencies, wrong verdicts), are identical to the old"
                  " detector's)."
                if largest else "")
    lines += [
        "",
        "Goals: right blame >= 99 %, zero false positives on healthy traces, verdict within 2 sync periods, < 10 ms"
        " per step at 16,384 ranks." + cpu_goal + " Reading the latencies:",
        "",
        "- **hang-noncomm** = the time until the peers reach the collective (up to one period after the rank stopped)"
        " + the timeout, which is at least one healthy collective interval (`hangTimeoutMinIntervals: 1`) so that a"
        " straggler is never reported as hung; hence, with one collective per period, a median under 2 periods and a worst case a little above."
        " `hangTimeoutMinIntervals: 0.5` cuts the worst case to about 1.6 periods, but then ranks more than ~1.5x"
        " slow start being reported as hung.",
        f"- **hang-comm** = the {det.hang_timeout_floor_seconds:.0f} s timeout floor (5x the healthy transfer time"
        " is smaller here) plus one poll.",
        f"- **slow classes** need an evidence score of `consecutive` (K = {det.consecutive}) from slow collectives in a row: each adds"
        " its strength (lateness / threshold, or ratio / `linkSlownessFactor`) capped at 1.5, so a clear fault is"
        " blamed at its 2nd slow collective and a marginal one at its K-th, never at its 1st (one outlier never"
        " convicts); a rank is clear only when also later than every one-off pause seen so far. A 1.5x straggler"
        " (~15 s late, ~4x its threshold, beyond the pauses of at most 9 s) is clear and a slow node usually is (one"
        " of its many 3x connections suffices); a single 3x link sits right at 1.5x the factor, so its jitter makes it marginal:"
        f" {_span(slow_lat, '.0f')} collectives to the verdict here. {one_period} the first slow"
        " collective completes up to a period after the fault starts, and a 1.5x straggler's periods are themselves"
        " 1.5x long. Two slow collectives are the floor; with four collectives per period they take well under one"
        " period.",
    ]
    if probes:
        lines.append(
            f"- **with the probes** (`1 + {probes} probes`), a stopped rank or a straggler shows at the next probe barrier, a"
            f" fifth of a period later: hang-noncomm and slow-noncomm in at most {_span(probed_noncomm, '.2f')} sync periods,"
            " within the goal. Every transfer probe samples every ring connection, so a slow link or node gets a slow"
            " sample a fifth of a period after it starts and is convicted at its second (clear) or third (marginal)"
            + (f" one: at most {_span(probed_comm, '.2f')} sync periods, within the goal too." if probed_comm else " one.")
            + " A slow node is told from a slow link by its row and column: the connections sampled since the slowness"
            " began, its ring neighbours' and the rotating shift's.")
    bw = {r["variant"]: r for r in rows if r.get("variant") and r["class"] == "slow-comm-link"}
    if bw:
        cells = "; ".join(f"{label}: {r['lat_s_max'] / period:.2f} periods at worst" for label, r in bw.items())
        lines.append(
            "- **a connection that only lost bandwidth** (rows marked bandwidth-only: the fault slows only the size /"
            " bandwidth part of a transfer, as one link of a bond down would) hardly shows in 4 KiB probes, which are"
            " latency-bound, and is convicted by the sync ring's samples alone; probes of 1 MiB"
            " (`faultDetection.probeBytes: 1048576`, about 10x the bandwidth-delay product of a 200 Gb/s, 10 us hop)"
            f" are bandwidth-bound and find it within the period again. Slow links: {cells}.")
    wrong = [(r, m) for r in rows for m in r["wrong"]]
    if wrong:
        rank_fp = [m for _, m in wrong if "consecutive collectives late" in m]
        lines.append(
            "- **wrong verdicts** in the faulty runs (the rows' precision below 100 %; at most 3 per row shown): "
            + "; ".join(f"{r['ranks']} ranks, `{_per_period(r)}`, {r['class']} run: \"{m}\"" for r, m in wrong[:3])
            + (". A healthy rank blamed as a straggler is two back-to-back pauses (the jitter model pauses 0.1 % of"
               " rank-intervals for up to 30 % of an interval) before any one-off pause raised its bar; about once per"
               " 10^6 rank-intervals, more often per period the more timing points a period has (docs/fault-detection.md,"
               " Limits)." if rank_fp else "."))
    lines.append("")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace (or append) this benchmark's marked section of ``path``, leaving the other sections alone."""
    from benchdoc import markers, write_section as write_marked  # bench/ is on sys.path when run as a script

    write_marked(section, *markers("simulate_faults"), path)


@click.command()
@click.option("--scales", default="64,1024,16384", show_default=True, help="Comma-separated world sizes.")
@click.option("--trials", default="100,40,10", show_default=True, help="Faulty runs per class at each scale.")
@click.option("--healthy-steps", default="1000,1000,1000", show_default=True, help="Healthy sync steps at each scale.")
@click.option("--jitter-model", type=click.Choice(["realistic", "uniform"]), default="realistic", show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--quick", is_flag=True, help="Small run (32 and 64 ranks, few trials) for a smoke test.")
@click.option("--docs/--no-docs", default=True, show_default=True, help="Write the section of docs/benchmarks.md.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="Instead: write one simulated run as a trace file.")
@click.option("--world", default=64, show_default=True, help="With --trace: ranks.")
@click.option("--fault", type=click.Choice([*FAULT_CLASSES, "none"]), default="slow-noncomm", show_default=True, help="With --trace.")
def main(scales: str, trials: str, healthy_steps: str, jitter_model: str, seed: int, quick: bool, docs: bool,
         trace_path: str | None, world: int, fault: str) -> None:
    """Benchmark the fault detector on simulated clusters (or write one simulated trace)."""
    if trace_path:
        sim = SimConfig(world=world, seed=seed, jitter_model=jitter_model)
        captured: list = []
        r = run_trial(sim, None if fault == "none" else fault, steps=40, record=captured)
        records = RecordBatch.concat([c[0] for c in captured])
        links = LinkBatch.concat([c[1] for c in captured])
        write_trace(trace_path, r["topology"], records, links, end_s=r["end_s"],
                    meta={"simulator": dataclasses.asdict(sim), "injected": dataclasses.asdict(r["fault"]) if r["fault"] else None})
        click.echo(f"wrote {trace_path}: {len(records)} records, {len(links)} connection samples; injected {r['fault']}")
        return
    if quick:
        scales, trials, healthy_steps = "32,64", "3,3", "200,200"  # >= 4 nodes: with 2, a slow node is ambiguous
    ns = [int(x) for x in scales.split(",")]
    tr = dict(zip(ns, (int(x) for x in trials.split(","))))
    hs = dict(zip(ns, (int(x) for x in healthy_steps.split(","))))
    if len(tr) != len(ns) or len(hs) != len(ns):
        raise click.UsageError("--trials and --healthy-steps need one value per scale in --scales")
    t0 = time.perf_counter()
    result = benchmark(ns, tr, hs, seed, jitter_model, log=click.echo)
    # Streaming DiLoCo: 4 fragment syncs spread over each period, at the middle scale
    mid = ns[len(ns) // 2]
    click.echo(f"streaming (4 collectives per sync period) at {mid} ranks:")
    streaming = benchmark([mid], {mid: tr[mid]}, {mid: 0}, seed, jitter_model, log=click.echo, fragments=4,
                          classes=["hang-noncomm", "slow-noncomm", "slow-comm-link", "slow-comm-node"])
    result["rows"] += streaming["rows"]
    # the trainer's probes: a barrier at every log interval, 5 per sync period at the defaults (H 50, logEvery 10)
    click.echo(f"1 sync + {PROBES} probes per sync period:")
    probed = benchmark(ns, tr, hs, seed, jitter_model, log=click.echo, probes=PROBES)
    for key in ("rows", "healthy", "cpu"):
        result[key] += probed[key]
    # a connection that only lost bandwidth, with the default 4 KiB probes and with faultDetection.probeBytes 1 MiB
    for probe_bytes in (4096, 1 << 20):
        variant = {"slow_model": "bandwidth", "probe_bytes": probe_bytes}
        click.echo(f"bandwidth-only slow connections, {probe_bytes // 1024} KiB probes, at {mid} ranks:")
        result["rows"] += benchmark([mid], {mid: tr[mid]}, {mid: 0}, seed, jitter_model, log=click.echo, probes=PROBES,
                                    classes=["slow-comm-link", "slow-comm-node"], variant=variant)["rows"]
    click.echo(f"done in {time.perf_counter() - t0:.0f} s")
    if docs:
        cmd = "python bench/simulate_faults.py" + (" --quick" if quick else "")
        write_section(REPO / "docs" / "benchmarks.md", render(result, SimConfig(jitter_model=jitter_model), simulator_detector_config(), cmd,
                                                                    probes=PROBES))
        click.echo("updated docs/benchmarks.md")


if __name__ == "__main__":
    main()
