"""Injected faults on 4 real gloo ranks -> the right C4 verdict from the real Comm records.

Each scenario spawns 4 processes that run a small all-reduce loop through ``loco_trainer.comm.Comm``
with the fault hook of ``loco_trainer.faults`` (what ``faultInjection`` configures in a job), with
clock sync and periodic probes as the trainer does. Every rank then writes its exported wire
records (``Comm.export_records``/``export_links``, the progress-channel format) to a file; the test
converts them with the operator's ``records_from_wire``/``links_from_wire`` and replays them through
the detector as the operator would have seen them live (``diagnose``). The verdict must blame the
faulty rank, of the right kind, within the documented number of collectives.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch.multiprocessing as mp

from dist_helpers import free_port
from loco_detector import DetectorConfig, RecordBatch, LinkBatch, Topology, diagnose
from loco_detector.live import links_from_wire, records_from_wire
from loco_detector.trace import Trace

WORLD = 4
# Small thresholds so each scenario takes seconds (the defaults suit real jobs, see docs/fault-detection.md).
CONFIG = DetectorConfig(warmup_collectives=3, consecutive=3, hang_timeout_floor_seconds=1.0,
                        warmup_hang_timeout_seconds=1.0, silence_timeout_seconds=5.0)


def _rank_main(rank: int, port: int, fault: dict, iterations: int, probe_every: int, outdir: str,
               sync_every: int = 1, slow: tuple[int, int, float] | None = None) -> None:
    import torch
    import torch.distributed as dist

    from loco_trainer.comm import Comm
    from loco_contract.config import FaultInjection
    from loco_trainer.faults import CommFaults, InjectedCrash, comm_faults

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    spec = FaultInjection.model_validate(fault)
    hook = comm_faults(spec, rank, restart_count=0)
    crash_at = spec.crash_at_step if (not spec.ranks or rank in spec.ranks) else None
    if isinstance(hook, CommFaults):  # a bounded hang so the test ends: 4 s, well past the 1 s timeout
        hook = CommFaults(spec, hang=lambda: time.sleep(4.0))
    comm = Comm(fault_hook=hook)
    comm.sync_clock()
    t = torch.ones(256)
    error = None

    def dump() -> None:
        comm.finish_probe(timeout_s=5)
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
            json.dump({"records": [r.to_wire() for r in comm.export_records()], "links": [x.to_wire() for x in comm.export_links()],
                       "clockError": comm.clock_error_s, "error": error}, fh)

    try:
        for i in range(iterations):
            if i == crash_at:
                dump()
                raise InjectedCrash(spec.exit_code)
            time.sleep(0.05)  # "compute"
            if slow is not None and rank == slow[0] and i >= slow[1]:
                time.sleep(slow[2])  # a straggler: this rank's compute is slower from iteration slow[1]
            if i % sync_every == sync_every - 1:
                comm.all_reduce(t, "sum")
            if probe_every and i % probe_every == 0:
                comm.probe()
    except InjectedCrash:
        os._exit(spec.exit_code)
    except RuntimeError as exc:  # a peer crashed: gloo reports the closed connection
        error = str(exc)
    dump()
    os._exit(0)


def _run(tmp_path, fault: dict, iterations: int, probe_every: int = 0, sync_every: int = 1,
         slow: tuple[int, int, float] | None = None) -> tuple[list, dict[int, dict]]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, fault, iterations, probe_every, str(tmp_path), sync_every, slow))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    dumps = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)
             if (tmp_path / f"rank{r}.json").exists()}
    assert len(dumps) == WORLD, f"only ranks {sorted(dumps)} wrote their records; exit codes {[p.exitcode for p in procs]}"
    for d in dumps.values():  # one host: the NTP-style offsets agree to far better than minLateness
        assert d["clockError"] is not None and d["clockError"] < CONFIG.min_lateness_seconds / 2
    records = [rec for r, d in dumps.items() for rec in records_from_wire(r, d["records"])]
    links = [s for d in dumps.values() for s in links_from_wire(d["links"], WORLD)]
    last = max(max(r.enter_s, r.exit_s or 0.0) for r in records)
    trace = Trace(topology=Topology.from_mapping({r: f"node-{r}" for r in range(WORLD)}),
                  records=RecordBatch.from_records(records), links=LinkBatch.from_samples(links),
                  end_s=last + 8.0)  # the operator keeps polling after the last record
    return diagnose(trace, CONFIG, tick_s=0.1), dumps


def _all_reduce_index(dumps: dict, rank: int, seq: int) -> int:
    """How many all-reduces rank ``rank`` had entered up to and including collective ``seq``."""
    return sum(1 for r in dumps[rank]["records"] if r["kind"] == "all_reduce" and r["seq"] <= seq)


def test_straggler_is_blamed_within_k_collectives_after_warmup(tmp_path) -> None:
    verdicts, dumps = _run(tmp_path, {"collectiveDelayS": 0.3, "ranks": [2]}, iterations=14)
    assert verdicts, "no verdict for a 0.3 s straggler"
    first = verdicts[0]
    assert first.kind.value == "slow-noncomm" and first.ranks == (2,) and first.node == "node-2", first
    # documented: K late informative collectives after warm-up
    assert first.seq is not None and first.seq <= CONFIG.warmup_collectives + CONFIG.consecutive
    assert all(2 in v.ranks for v in verdicts), verdicts  # the ranks that waited are never blamed


def test_probes_time_a_straggler_between_outer_syncs(tmp_path) -> None:
    """DiLoCo-like: one all-reduce every 8 iterations, a probe every iteration (a log interval).
    Rank 2 computes 0.3 s longer per iteration from iteration 12: its lateness shows at the probes'
    barriers, and the verdict comes before the second outer all-reduce after the slowdown (with
    only the all-reduces it would take K = 3 of them: 3 sync periods)."""
    sync_every, slow_from = 8, 12
    verdicts, dumps = _run(tmp_path, {}, iterations=32, probe_every=1, sync_every=sync_every, slow=(2, slow_from, 0.3))
    assert verdicts, "no verdict for a rank 0.3 s slower per log interval"
    first = verdicts[0]
    assert first.kind.value == "slow-noncomm" and first.ranks == (2,), first
    assert all(v.ranks == (2,) for v in verdicts), verdicts  # the ranks that waited are never blamed
    kinds = {r["seq"]: r["kind"] for r in dumps[0]["records"]}
    assert kinds[first.seq] == "barrier", f"blamed at a {kinds[first.seq]}, not at a probe"
    # outer all-reduces entered from the slowdown up to the verdict: the verdict needs at most one
    syncs_before = sum(1 for r in dumps[0]["records"] if r["kind"] == "all_reduce" and r["seq"] <= first.seq)
    assert syncs_before - slow_from // sync_every <= 1, (syncs_before, first)


def test_hang_before_collective_is_hang_noncomm_of_that_rank_at_that_seq(tmp_path) -> None:
    hang_at = 24  # an all-reduce: 6 calls per probed iteration (all_reduce, the probe's barrier, recv + send on 2 shifts)
    verdicts, dumps = _run(tmp_path, {"hangBeforeCollective": hang_at, "ranks": [1]}, iterations=14, probe_every=1)
    hangs = [v for v in verdicts if v.kind.value == "hang-noncomm"]
    assert hangs, verdicts
    assert hangs[0].ranks == (1,) and hangs[0].seq == hang_at, hangs[0]
    assert all(1 in v.ranks for v in verdicts), verdicts


def test_slow_link_is_blamed_on_that_link(tmp_path) -> None:
    verdicts, dumps = _run(tmp_path, {"linkDelay": {"peer": 2, "seconds": 0.3}, "ranks": [1]},
                           iterations=30, probe_every=1)
    links = [v for v in verdicts if v.kind.value.startswith("slow-comm")]
    assert links, verdicts
    assert links[0].kind.value == "slow-comm-link" and links[0].link == (1, 2), links[0]
    assert not [v for v in verdicts if v.kind.value == "slow-noncomm"], verdicts  # probes do not stall training
    # 1 -> 2 is a ring connection: every probe samples it, so the verdict needs only the K slow
    # samples' worth of probes (2 for a clear 0.3 s delay, K = 3 at most) after the reference fills
    assert links[0].evidence["samples"] <= CONFIG.consecutive + 2, links[0].evidence
    assert links[0].evidence  # numbers a human can check


def test_crash_is_hang_noncomm_of_the_crashed_rank(tmp_path) -> None:
    verdicts, dumps = _run(tmp_path, {"crashAtStep": 9, "ranks": [3], "exitCode": 13}, iterations=14)
    assert verdicts, "no verdict after a rank crashed"
    first = verdicts[0]
    assert first.kind.value == "hang-noncomm" and first.ranks == (3,), first
    assert first.seq == 9  # the first collective the crashed rank never entered
    assert all(d["error"] for r, d in dumps.items() if r != 3)  # its peers saw the broken connection


def test_comm_faults_apply_only_where_configured_and_cost_nothing_when_off() -> None:
    from loco_contract.config import FaultInjection
    from loco_trainer.faults import CommFaults, comm_faults

    assert comm_faults(None, 0, 0) is None
    assert comm_faults(FaultInjection(crash_at_step=3), 0, 0) is None  # not a comm fault: no hook at all
    straggler = FaultInjection.model_validate({"collectiveDelayS": 0.2, "ranks": [1]})
    assert comm_faults(straggler, 0, 0) is None and comm_faults(straggler, 1, 1) is None  # other rank / restarted
    slept: list[float] = []
    hook = CommFaults(straggler, sleep=slept.append)
    hook.before_enter(0, "all_reduce", None)
    assert slept == [0.2]

    link = FaultInjection.model_validate({"linkDelay": {"peer": 2, "seconds": 0.3}, "onlyFirstAttempt": False})
    hook = comm_faults(link, 1, restart_count=4)
    assert hook is not None
    assert hook.transfer_delay_s("send", 2) == 0.3
    assert hook.transfer_delay_s("send", 3) == 0.0 and hook.transfer_delay_s("recv", 2) == 0.0

    held = FaultInjection.model_validate({"hangLink": {"peer": 2, "afterCollective": 4}, "ranks": [1]})
    assert comm_faults(held, 0, 0) is None
    hook = comm_faults(held, 1, 0)
    assert hook is not None
    assert [hook.holds_send(seq, "send", 2) for seq in (3, 4, 9)] == [False, True, True]
    assert not hook.holds_send(5, "recv", 2) and not hook.holds_send(5, "send", 3)
    assert hook.transfer_delay_s("send", 2) == 0.0  # held, not slowed

    hangs: list[int] = []
    hang = FaultInjection.model_validate({"hangBeforeCollective": 5})
    hook = CommFaults(hang, hang=lambda: hangs.append(1))
    for seq in range(8):
        hook.before_enter(seq, "all_reduce", None)
    assert hangs == [1]  # blocks once, at seq 5


def test_fault_injection_fields_are_validated_with_the_field_named() -> None:
    from pydantic import ValidationError

    from loco_contract.config import FaultInjection

    with pytest.raises(ValidationError, match="linkDelay.seconds|link_delay.seconds"):
        FaultInjection.model_validate({"linkDelay": {"peer": 1, "seconds": 0}})
    with pytest.raises(ValidationError, match="hangLink.peer|hang_link.peer"):
        FaultInjection.model_validate({"hangLink": {"peer": -1}})
    with pytest.raises(ValidationError, match="collectiveDelayS|collective_delay_s"):
        FaultInjection.model_validate({"collectiveDelayS": -1})


# ----------------------------------------------------------------------------------- live hang-comm

HOLD_AT = 18  # seq of rank 1's send in iteration 6 (3 calls per iteration: send, recv, all_reduce)
LIVE_CONFIG = DetectorConfig(warmup_collectives=3, consecutive=3, hang_timeout_floor_seconds=2.0,
                             warmup_hang_timeout_seconds=2.0, silence_timeout_seconds=30.0)


def _exchange_main(rank: int, port: int, fault: dict, outdir: str, mode: str = "exchange") -> None:
    """A NoLoCo-like rank: every iteration a ring exchange (send to r+1, receive from r-1, posted
    together) then an all-reduce; or (``mode="ring"``) a DiLoCo-like outer all-reduce run as
    ``Comm.ring_all_reduce`` (``faultDetection.ringAllReduce``). ``/status`` served as the trainer
    serves it, for the live poll."""
    import pathlib

    import torch
    import torch.distributed as dist

    from loco_trainer.comm import Comm
    from loco_contract.config import FaultInjection
    from loco_trainer.faults import comm_faults
    from loco_trainer.progress import ProgressServer, ProgressState
    from loco_contract.protocol import ProgressReport, WorkerState

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=90))
    comm = Comm(fault_hook=comm_faults(FaultInjection.model_validate(fault), rank, 0), stall_after_s=0.5)
    comm.sync_clock()
    state = ProgressState(ProgressReport(job_name="hang", replica_index=rank, state=WorkerState.running))
    state.set_fault_source(lambda s, l: (comm.export_records(s), comm.export_links(l), comm.clock_error_s))
    server = ProgressServer(state, lambda: b"", "127.0.0.1", 0).start()
    out = pathlib.Path(outdir)
    (out / f"port{rank}.tmp").write_text(str(server.port))
    (out / f"port{rank}.tmp").rename(out / f"port{rank}")
    mine, theirs, acc = torch.full((1024,), float(rank)), torch.empty(1024), torch.ones(16)
    for _ in range(40):
        time.sleep(0.05)  # "compute"
        if mode == "ring":
            comm.ring_all_reduce(mine, op="avg")
            continue
        for handle in comm.batch_isend_irecv([("send", mine, (rank + 1) % WORLD), ("recv", theirs, (rank - 1) % WORLD)]):
            handle.wait()
        comm.all_reduce(acc, "sum")
    time.sleep(120)  # never reached by a healthy test: the stalled exchange blocks every rank


@pytest.mark.parametrize("mode", ["exchange", "ring"])
def test_stalled_link_is_hang_comm_of_that_pair_live(tmp_path, mode: str) -> None:
    """Rank 1's sends to rank 2 are held from a given seq (hangLink): polled live through /status
    with the operator's cursors, the detector blames connection 1 -> 2 from the stalled-connection
    samples, at the held call, and never blames a rank as hang-noncomm; before the fault, the
    traffic alone (no probes) filled every ring cell of the connection matrix. ``exchange``: a
    NoLoCo-like send/recv; ``ring``: the hang happens inside an all-reduce run as a ring of
    point-to-point steps (faultDetection.ringAllReduce), localised to the connection."""
    import urllib.request

    from loco_detector.live import LiveDetectors
    from loco_contract.protocol import ProgressReport

    # ring: 2(n-1) = 6 steps of (send, recv) per all-reduce; hold rank 1's first send of iteration 6
    hold_at = HOLD_AT if mode == "exchange" else 6 * 2 * 2 * (WORLD - 1)
    fault = {"hangLink": {"peer": 2, "afterCollective": hold_at}, "ranks": [1]}
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_exchange_main, args=(r, port, fault, str(tmp_path), mode), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    live, findings, sampled = LiveDetectors(), [], set()
    placement = {r: (f"pod-{r}", f"node-{r}") for r in range(WORLD)}
    try:
        deadline = time.monotonic() + 120
        ports: dict[int, int] = {}
        while len(ports) < WORLD and time.monotonic() < deadline:
            ports = {r: int((tmp_path / f"port{r}").read_text()) for r in range(WORLD) if (tmp_path / f"port{r}").exists()}
            time.sleep(0.1)
        assert len(ports) == WORLD, f"ranks {sorted(ports)} started; exit codes {[p.exitcode for p in procs]}"
        while not findings and time.monotonic() < deadline:
            reports = {}
            for r, p in ports.items():
                since_seq, since_link = live.cursor("ns/hang", 0, f"pod-{r}")
                url = f"http://127.0.0.1:{p}/status?sinceSeq={since_seq}&sinceLink={since_link}"
                with urllib.request.urlopen(url, timeout=10) as resp:
                    reports[f"pod-{r}"] = ProgressReport.model_validate(json.loads(resp.read()))
                sampled |= {(x.src, x.dst) for x in reports[f"pod-{r}"].links or [] if x.seconds is not None}
            findings += live.feed("ns/hang", LIVE_CONFIG, 0, placement, reports, time.time())
            time.sleep(0.2)
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    assert findings, "no verdict within 120 s of a stalled connection"
    kinds = [(f.verdict.kind.value, f.verdict.link, f.verdict.ranks) for f in findings]
    assert kinds == [("hang-comm", (1, 2), (1, 2))], [f.verdict.message for f in findings]
    verdict = findings[0].verdict
    # exchange: the stuck call is one every rank entered; ring: the first of a chain of stalled steps
    assert verdict.evidence["evidence_from"] == {"exchange": "stalled connections",
                                                 "ring": "stalled connections (the first of a chain)"}[mode], verdict.evidence
    assert verdict.seq in (hold_at, hold_at + 1)  # the held call itself, not a later collective
    assert findings[0].pods == ("pod-1", "pod-2") and findings[0].nodes == ("node-1", "node-2")
    # every ring cell got a transfer time from the healthy exchanges (no probe was run)
    assert {((r - 1) % WORLD, r) for r in range(WORLD)} <= sampled, sampled
