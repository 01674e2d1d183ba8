"""The fault detector's settings (``spec.faultDetection``), and the part of them the trainer uses.

The operator runs the detector (``loco_detector``) with a :class:`DetectorConfig`; the trainer's
communication layer needs only how to probe and when a transfer counts as stalled, which the operator
renders into the trainer config as :class:`ProbeSettings` (:meth:`ProbeSettings.of`), so the trainer reads
no fault setting from its environment.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from loco_contract.base import Model


class DetectorConfig(Model):
    """Thresholds of the fault detector (``spec.faultDetection``); the defaults suit most jobs.

    A rank is *late* at a collective when it enters more than
    ``max(minLatenessSeconds, madMultiplier * 1.4826 * MAD)`` after the median rank (MAD: median
    absolute deviation of the entry times across ranks). Hang timeouts follow NVIDIA's
    resiliency extension: ``max(hangTimeoutFloorSeconds, hangTimeoutMultiplier * longest healthy
    interval)``, where the interval is measured after warm-up. See docs/fault-detection.md.
    """

    enabled: bool = Field(True, description="Run the detector on this job's collective timings.")
    warmup_collectives: int = Field(
        5, ge=0, le=100_000,
        description="Collectives ignored at the start (and after each restart) while timings settle: no slowness verdicts, no hang baseline.",
    )
    window: int = Field(
        32, ge=2, le=4096,
        description="Recent observations kept per rank and per link; their median is reported as evidence.",
    )
    consecutive: int = Field(
        3, ge=1, le=1000,
        description="K: a rank or link is blamed when its slow informative observations in a row reach an evidence score of K. Each adds its strength (lateness / max(threshold, largest one-off outlier / 1.5) for a rank, ratio / linkSlownessFactor for a link) capped at 1.5, and an observation that is not slow resets the score to 0: a marginal fault needs K observations, a clear one ceil(K / 1.5), and with K >= 2 never fewer than 2, so a single outlier never convicts.",
    )
    mad_multiplier: float = Field(
        4.0, gt=0, le=1000,
        description="A rank is late when it enters more than this many robust standard deviations (1.4826 x MAD) after the median rank.",
    )
    min_lateness_seconds: float = Field(
        0.1, ge=0,
        description="Absolute floor on lateness: a rank entering less than this after the median rank is never late (guards against MAD ~ 0).",
    )
    hang_timeout_floor_seconds: float = Field(
        10.0, gt=0,
        description="Shortest hang timeout, whatever the healthy intervals were.",
    )
    hang_timeout_multiplier: float = Field(
        5.0, gt=1,
        description="Hang timeout = this multiple of the longest healthy interval seen after warm-up (arrival spread for hang-noncomm, transfer time for hang-comm).",
    )
    hang_timeout_min_intervals: float = Field(
        1.0, gt=0,
        description="The hang-noncomm timeout is at least this many healthy collective intervals (time between consecutive collectives), so a straggler less than this many intervals late is reported slow, not hung.",
    )
    warmup_hang_timeout_seconds: float = Field(
        300.0, gt=0,
        description="Hang timeout used before warm-up ends (start-up: data loading, compilation, rendezvous).",
    )
    link_slowness_factor: float = Field(
        2.0, gt=1,
        description="A connection sample is slow when it takes more than this multiple of the median time of samples of the same size.",
    )
    min_link_excess_seconds: float = Field(
        0.01, ge=0, le=3600,
        description="Absolute floor for slow connections: a connection sample is slow only when it also takes more than this many seconds longer than the median of its class, so a CPU-starved probe thread measuring a healthy millisecond link at 2x cannot trigger a restart. 0 disables the floor (judge by linkSlownessFactor alone).",
    )
    slow_endpoint_fraction: float = Field(
        0.75, gt=0, le=1,
        description="Blame a node (or a rank's NIC) instead of single links when at least this fraction of its row or column of connections is slow.",
    )
    silence_timeout_seconds: float = Field(
        60.0, gt=0,
        description="The last resort for a silent rank: one not heard from for this long, measured against the reports of at least half the ranks (so a cut-off observer or a finished job blames nobody), while no collective completes, is blamed as hung (hang-noncomm). A rank that stops while its peers wait for it in a collective is blamed sooner, by the learned hang timeout.",
    )
    min_slowdown_to_act: float = Field(
        0.2, ge=0, le=100,
        description="The operator replaces pods and avoids the node for a slow-noncomm verdict only when the straggler's lateness is at least this fraction of the healthy interval between collectives (a restart costs more than a small slowdown); below it the verdict is only reported (FaultSuspected event). Hangs and slow connections are always acted on.",
    )
    avoid_node_seconds: float = Field(
        3600.0, ge=0,
        description="How long a node blamed for a fault stays on the job's avoid-list (status.avoidNodes, a required node anti-affinity on new worker pods), counted from the last fault that blamed it. Afterwards new pods may land on it again, so a transient fault or a false alarm does not shrink the usable cluster for the job's whole life. 0: avoid for the job's lifetime. A cordoned node stays cordoned until an administrator uncordons it.",
    )
    ring_all_reduce: bool = Field(
        False,
        description="Run the outer all-reduce of the DiLoCo family (DiLoCo, Streaming DiLoCo, CO2) as a ring of point-to-point steps in the trainer's communication layer instead of one opaque collective: every ring connection then gets a transfer time from real traffic, and a connection that stops moving data is blamed as hang-comm on that one link. Same bytes; costs 2(n-1) small latencies per bucket (negligible once every H steps). DDP's per-step gradient all-reduce is unchanged.",
    )
    probe_interval_seconds: float = Field(
        1.0, ge=0, le=3600,
        description="Shortest time between two trainer probes that transfer data. The probe's timing point (an 8-byte all-reduce at every log interval) always runs; its small timed transfers on the ring's connections and on a rotating set of other pairs, which give the detector its connection samples, run at most this often, so jobs with short steps spend a bounded share of their time on them (about 2 ms per transfer probe on a CPU host). 0: at every log interval. Slow connections are convicted after `consecutive` transfer probes, so a larger value makes their verdicts slower.",
    )
    probe_bytes: int = Field(
        4096, ge=4, le=64 * 1024 * 1024,
        description="Payload of each trainer probe transfer. The default 4 KiB is latency-bound: it shows congestion, retransmits and dead or flapping ports, but hardly a connection that only lost bandwidth (one link of a bond down). On a fast fabric, a payload of about 10x the bandwidth-delay product (1 MiB at 200 Gb/s and 10 us) makes the transfer bandwidth-bound, so such a connection is found within a few probes too; each transfer probe then moves 2 x this per rank.",
    )
    cordon_nodes: bool = Field(
        False,
        description="Ask the operator to also cordon a blamed node (spec.unschedulable, a loco.dev/fault taint and an annotation with the reason). A cordon affects every tenant, so it is honoured only when the cluster operator enabled cordoning (loco operator run --cordon-nodes; chart value faultIsolation.cordonNodes); otherwise a CordonNotEnabled Warning event answers it. Either way the node is avoided by this job's own pods (status.avoidNodes).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "DetectorConfig":
        if self.consecutive > self.window:
            raise ValueError(
                f"consecutive ({self.consecutive}) must be <= window ({self.window}): raise window or lower consecutive"
            )
        if self.warmup_hang_timeout_seconds < self.hang_timeout_floor_seconds:
            raise ValueError(
                f"warmupHangTimeoutSeconds ({self.warmup_hang_timeout_seconds}) must be >= hangTimeoutFloorSeconds "
                f"({self.hang_timeout_floor_seconds}): start-up is never judged more strictly than steady state"
            )
        return self


class ProbeSettings(Model):
    """What the trainer's communication layer takes from ``spec.faultDetection`` (``TrainerConfig.probes``)."""

    stall_after_s: float = Field(
        5.0, gt=0,
        description="A send/recv in flight this long is reported as a stalled connection: half the hang timeout "
        "floor, so the sample is there when the hang-comm timeout expires.",
    )
    ring_all_reduce: bool = Field(False, description="faultDetection.ringAllReduce: the outer all-reduce as a ring of point-to-point steps.")
    probe_interval_s: float = Field(1.0, ge=0, description="faultDetection.probeIntervalSeconds.")
    probe_bytes: int = Field(4096, ge=4, description="faultDetection.probeBytes.")

    @classmethod
    def of(cls, detector: DetectorConfig) -> "ProbeSettings":
        # half the floor (the hang-comm timeout is never shorter), at most 5 s
        return cls(stall_after_s=min(5.0, detector.hang_timeout_floor_seconds / 2), ring_all_reduce=detector.ring_all_reduce,
                   probe_interval_s=detector.probe_interval_seconds, probe_bytes=detector.probe_bytes)
