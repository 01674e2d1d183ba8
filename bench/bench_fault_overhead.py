"""Fault-detection costs: (1) the timing records and probes on training throughput, (2) fault-to-running
time on the embedded cluster.

1. **Overhead.** The real trainer (``python -m loco_trainer --nproc 2``, tiny GPT, DDP: one
   all-reduce per step, the worst case for per-collective costs) runs with fault detection as
   shipped (a flight-recorder record per collective, clock sync at start, a probe every log
   interval: its timing point always, its transfers at most every ``probeIntervalSeconds``, 1 s) and with it off (``Comm`` recording and probing patched out in the worker processes
   through a ``sitecustomize`` on ``PYTHONPATH``). Runs alternate on/off ``--repeats`` times; the
   median steps/s of each side are compared. On a shared 2-core machine the run-to-run noise is
   larger than the effect, so the bench also measures the cost directly: nanoseconds per recorded
   call (``Comm.open_record`` on a group of one, timed in-process) and wall time per probe, with and
   without its transfers, and states the overhead they imply per step. It also times one blocking
   8-byte all-reduce with the ``Comm`` interruptible (live jobs) and not (``--waits-only``: just that).
2. **Fault to running.** On the embedded cluster (3 nodes) a 3-worker DDP job gets a 0.5 s
   straggler on worker 1. Timed from the moment the job is Running: until the operator records the
   fault (detection), and until the job is Running again in the next epoch with every pod away
   from the blamed node (recovery).

Writes its section of ``docs/benchmarks.md`` (between markers) and ``bench/results/bench_fault_overhead.json``.

    python bench/bench_fault_overhead.py                 # both parts
    python bench/bench_fault_overhead.py --skip-cluster  # overhead only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_fault_overhead.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench_fault_overhead:start -->", "<!-- bench_fault_overhead:end -->"

CONFIG = {
    "jobName": "bench-faults",
    "model": {"gpt": {"nLayer": 2, "nHead": 2, "nEmbd": 64, "blockSize": 64}},
    "data": {"maxBytes": 2_000_000},
    "training": {"steps": 110, "batchSize": 8, "seqLen": 64, "logEvery": 10, "evalEvery": 0, "evalBatches": 1},
    "algorithm": {"name": "ddp"},
    "checkpoint": {"everySteps": 0},
}
WARMUP_STEPS = 10
#: The fault-to-running scenario (the same as e2e/test_faults.py).
STRAGGLER = {"collectiveDelayS": 1.5, "ranks": [1], "onlyFirstAttempt": True}
DETECTION = {"warmupCollectives": 8, "consecutive": 3, "minLatenessSeconds": 0.8}

#: Loaded into every trainer process when LOCO_BENCH_RECORDS_OFF=1: fault detection off.
SITECUSTOMIZE = '''
import os
if os.environ.get("LOCO_BENCH_RECORDS_OFF") == "1":
    import collections, time
    import loco_trainer.comm as c

    class _Null:
        exit_ns = None
    def open_record(self, kind, nbytes, sent, recv, peer=None, *, count=True):
        counter = self._counters[kind]
        counter.calls += 1; counter.sent += int(round(sent)); counter.recv += int(round(recv))
        return _Null()
    c.Comm.open_record = open_record
    c.Comm.probe = lambda self, nbytes=4096, **kw: None
    c.Comm.sync_clock = lambda self, rounds=5: 0.0
'''


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_trainer(tmp: Path, records_off: bool, tag: str) -> float:
    """Steps/s of one 2-rank run after the warm-up steps (from the trainer's history)."""
    cfg_path = tmp / f"config-{tag}.json"
    cfg = json.loads(json.dumps(CONFIG))
    cfg["checkpoint"]["path"] = str(tmp / f"ckpt-{tag}")
    cfg_path.write_text(json.dumps(cfg))
    history = tmp / f"history-{tag}.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LOCO_BENCH_RECORDS_OFF": "1" if records_off else "0"}
    cmd = [sys.executable, "-m", "loco_trainer", "--config", str(cfg_path), "--nproc", "2",
           "--history", str(history), "--status-port", "-1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"trainer failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    steps = {r["step"]: r["wallS"] for r in rows if "wallS" in r}
    last = max(steps)
    return (last - WARMUP_STEPS) / (steps[last] - steps[WARMUP_STEPS])


def micro_costs() -> dict[str, float]:
    """ns per recorded call (group of one: ``_enter`` plus the exit stamp) and the export cost."""
    from loco_trainer.comm import Comm

    comm = Comm(history=4096)
    comm._world_size = 2  # open_record only: no collective is issued
    n = 200_000
    start = time.perf_counter_ns()
    for _ in range(n):
        rec = comm.open_record("all_reduce", 4096, 1.0, 1.0)
        rec.exit_ns = time.monotonic_ns()
    per_call_ns = (time.perf_counter_ns() - start) / n
    start = time.perf_counter()
    for _ in range(20):
        comm.export_records(-1, 512)
    export_ms = (time.perf_counter() - start) / 20 * 1e3
    return {"record_ns_per_call": per_call_ns, "export_512_ms": export_ms}


def probe_cost_ms(interval_s: float) -> float:
    """Wall time of ``Comm.probe`` on 2 gloo ranks: with ``interval_s`` 0 every call transfers (the
    timing point, the transfers and the closing barrier), with a long one only the first does (the
    timing point alone)."""
    script = r'''
import datetime, os, sys, time, torch, torch.distributed as dist
from loco_trainer.comm import Comm
rank, port, interval = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
comm = Comm(probe_interval_s=interval)
for _ in range(5):
    comm.probe()
comm.finish_probe()
t = time.perf_counter()
for _ in range(50):
    comm.probe()
comm.finish_probe()
if rank == 0:
    print((time.perf_counter() - t) / 50 * 1e3)
dist.destroy_process_group()
'''
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), port, str(interval_s)], stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    out = [p.communicate(timeout=300)[0] for p in procs]
    return float(out[0].strip().splitlines()[-1])


def wait_cost_us(interruptible: bool, calls: int = 2000) -> float:
    """Microseconds per blocking 8-byte all-reduce through ``Comm`` on 2 gloo ranks, with the Comm
    ``interruptible`` (live jobs: every wait in a helper thread, see docs/elastic.md) or not."""
    script = r'''
import datetime, os, sys, time, torch, torch.distributed as dist
from loco_trainer.comm import Comm
rank, port, interruptible, calls = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
comm, t = Comm(interruptible=interruptible), torch.ones(2)
for _ in range(200):
    comm.all_reduce(t, op="max")
best = float("inf")
for _ in range(5):  # the best of 5 blocks: the least disturbed by the rest of a shared machine
    start = time.perf_counter()
    for _ in range(calls // 5):
        comm.all_reduce(t, op="max")
    best = min(best, (time.perf_counter() - start) / (calls // 5))
if rank == 0:
    print(best * 1e6)
dist.destroy_process_group()
'''
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), port, "1" if interruptible else "0", str(calls)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    out = [p.communicate(timeout=300)[0] for p in procs]
    return float(out[0].strip().splitlines()[-1])


def waits() -> dict[str, float]:
    plain, interruptible = wait_cost_us(False), wait_cost_us(True)
    return {"plain_us": plain, "interruptible_us": interruptible, "extra_us": interruptible - plain}


#: faultDetection.probeIntervalSeconds as shipped (the trainer's default when no operator sets it).
PROBE_INTERVAL_S = 1.0


def implied_pct(step_s: float, record_ns: float, timing_ms: float, transfer_ms: float) -> float:
    """The overhead per step (in %) the direct costs imply for DDP at ``step_s`` per step: one
    recorded all-reduce per step, a timing point (one more record) every ``logEvery`` steps, and,
    every ``m``-th log interval, the transfers on top of it, where ``m`` makes the transfer probes
    at least ``PROBE_INTERVAL_S`` apart (the records of the transfers themselves are in their
    wall time)."""
    log_every = CONFIG["training"]["logEvery"]
    m = max(1, math.ceil(PROBE_INTERVAL_S / (log_every * step_s) - 1e-9))
    per_step_s = ((1 + 1 / log_every) * record_ns * 1e-9 + timing_ms * 1e-3 / log_every
                  + (transfer_ms - timing_ms) * 1e-3 / (log_every * m))
    return 100 * per_step_s / step_s


def goal_from_step_ms(record_ns: float, timing_ms: float, transfer_ms: float) -> float:
    """The shortest step time (ms, on a 0.1 ms grid) from which the implied overhead stays under 1 %."""
    ok = None
    for tenth in range(5000, 0, -1):
        if implied_pct(tenth / 1e4, record_ns, timing_ms, transfer_ms) >= 1.0:
            break
        ok = tenth / 10
    return ok if ok is not None else math.inf


def fault_to_running() -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from loco_local.scenario import small_job
    from loco_local.stack import LocalStack, default_nodes

    name = "bench-straggler"
    job = small_job(name, replicas=3, steps=40, algorithm="ddp", checkpoint__everySteps=5,
                    faultInjection=STRAGGLER, faultDetection=DETECTION)
    with tempfile.TemporaryDirectory() as state, LocalStack(Path(state), default_nodes(3)) as stack:
        pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "e2e-checkpoints"},
               "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}
        try:
            stack.apply(pvc)
        except Exception:  # noqa: BLE001 - the stack may already provide the claim
            pass
        stack.apply(job)
        marks: dict[str, float] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and "running_again" not in marks:
            status = (stack.get_job(name) or {}).get("status") or {}
            now = time.monotonic()
            if status.get("phase") == "Running" and status.get("membershipEpoch", 0) == 0:
                marks.setdefault("running", now)
            if status.get("faults"):
                marks.setdefault("fault_recorded", now)
            if status.get("phase") == "Running" and status.get("membershipEpoch", 0) >= 1:
                marks.setdefault("running_again", now)
            if status.get("phase") in ("Failed", "Succeeded") and "running_again" not in marks:
                raise SystemExit(f"job ended {status.get('phase')} before recovering: {status.get('message')}")
            time.sleep(0.2)
        if "running_again" not in marks:
            raise SystemExit(f"no recovery within 600 s: {marks}")
        return {"detect_s": marks["fault_recorded"] - marks["running"],
                "recover_s": marks["running_again"] - marks["fault_recorded"],
                "total_s": marks["running_again"] - marks["running"]}


def render(result: dict) -> str:
    o = result["overhead"]
    lines = [
        START,
        "## Fault detection: overhead and fault-to-running time (`bench/bench_fault_overhead.py`)",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`.",
        "",
        "**Overhead of the timing records and probes** (2 ranks, tiny GPT, DDP: one all-reduce per step,",
        f"a probe every {CONFIG['training']['logEvery']} steps, its transfers at most every {o['probe_interval_s']:g} s; "
        f"{o['repeats']} alternating runs per side, median):",
        "",
        "| | steps/s |",
        "|---|---|",
        f"| records + probes on (as shipped) | {o['on_steps_per_s']:.2f} |",
        f"| off (recording and probes patched out) | {o['off_steps_per_s']:.2f} |",
        f"| slowdown with records + probes (end to end; run-to-run noise {o['noise_pct']:.1f} %) | {o['end_to_end_pct']:+.2f} % |",
        "",
        f"Direct costs: {o['record_ns_per_call']:.0f} ns per recorded call; a probe {o['timing_point_ms']:.2f} ms as a "
        f"timing point alone (its 8-byte all-reduce) and {o['transfer_probe_ms']:.2f} ms with its transfers (helper threads, "
        f"a wait of up to 50 ms for them, a closing barrier); {o['export_512_ms']:.2f} ms to serve 512 records to a poll. "
        f"At {o['on_steps_per_s']:.1f} steps/s ({1e3 / o['on_steps_per_s']:.0f} ms per step), with a timing point every "
        f"{CONFIG['training']['logEvery']} steps and transfers at most every {o['probe_interval_s']:g} s, that is "
        f"**{o['implied_pct']:.3f} %** of the step time (goal: < 1 %: "
        f"{'met' if o['implied_pct'] < 1 else 'not met'} at this step time; it holds from about "
        f"{o['goal_from_step_ms']:.0f} ms per step). The transfers cost at most {o['transfer_probe_ms'] - o['timing_point_ms']:.1f} ms per "
        f"{o['probe_interval_s']:g} s whatever the step time; the timing point's share falls in proportion to the step time. "
        + ("The end-to-end difference is within the run-to-run noise." if abs(o["end_to_end_pct"]) <= o["noise_pct"]
           else "The end-to-end difference exceeds the run-to-run noise: at these ~10 ms steps the records, the probe's "
                "threads (GIL contention on 2 cores) and its barrier cost more than the direct figures suggest."),
        "",
    ]
    if result.get("cluster"):
        c = result["cluster"]
        lines += [
            f"**Fault to running** (embedded cluster, 3 nodes, 3-worker DDP job, {STRAGGLER['collectiveDelayS']} s "
            f"straggler on worker 1, `warmupCollectives: {DETECTION['warmupCollectives']}`, "
            f"`consecutive: {DETECTION['consecutive']}`, `minLatenessSeconds: {DETECTION['minLatenessSeconds']}`, "
            "operator poll every 2 s). Detection time is dominated by the warm-up, which this scenario sets to "
            "cover the first checkpoint; the straggler itself is blamed K collectives after it:",
            "",
            "| phase | seconds |",
            "|---|---|",
            f"| Running -> fault recorded (warm-up + K late collectives + poll) | {c['detect_s']:.1f} |",
            f"| fault recorded -> Running again, next epoch, away from the node | {c['recover_s']:.1f} |",
            f"| total | {c['total_s']:.1f} |",
            "",
        ]
    if result.get("waits"):
        w = result["waits"]
        lines += [
            "**Interruptible waits** (live jobs, docs/elastic.md: `Comm.interrupt()` can end every wait of the `Comm`; "
            f"a collective is waited on through its future, a point-to-point transfer in a helper thread): a blocking 8-byte all-reduce on 2 gloo ranks took {w['plain_us']:.0f} µs "
            f"plain and {w['interruptible_us']:.0f} µs interruptible, **{w['extra_us']:+.0f} µs per wait** (best of 5 "
            f"blocks; `{w['command']}`, {w['date']}). A live DiLoCo job waits a few times per log interval (the probe) "
            "and once per bucket at an outer step, so this stays far below the 1 % above. Single runs are noisy on "
            "this shared machine: three runs gave +40 to +107 µs.",
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def write_doc(section: str) -> None:
    from benchdoc import write_section  # bench/ is on sys.path when run as a script

    write_section(section, START, END, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating on/off trainer runs per side")
    parser.add_argument("--skip-cluster", action="store_true", help="skip the fault-to-running part")
    parser.add_argument("--render-only", action="store_true", help=f"re-render the doc section from {RESULTS.name}")
    parser.add_argument("--waits-only", action="store_true",
                        help=f"only measure the interruptible-wait cost; keep the rest of {RESULTS.name}")
    args = parser.parse_args()
    if args.render_only:
        write_doc(render(json.loads(RESULTS.read_text())))
        return
    if args.waits_only:
        result = json.loads(RESULTS.read_text())
        result["waits"] = {**waits(), "command": "python bench/bench_fault_overhead.py --waits-only",
                           "date": time.strftime("%Y-%m-%d")}
        RESULTS.write_text(json.dumps(result, indent=2))
        write_doc(render(result))
        print(result["waits"])
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
        on, off = [], []
        for i in range(args.repeats):
            on.append(run_trainer(tmp, False, f"on{i}"))
            off.append(run_trainer(tmp, True, f"off{i}"))
            print(f"run {i}: on {on[-1]:.2f} steps/s, off {off[-1]:.2f} steps/s", flush=True)
    micro = micro_costs()
    timing_ms, transfer_ms = probe_cost_ms(3600.0), probe_cost_ms(0.0)
    on_med, off_med = statistics.median(on), statistics.median(off)
    step_s = 1 / on_med
    implied = implied_pct(step_s, micro["record_ns_per_call"], timing_ms, transfer_ms)
    overhead = {
        "repeats": args.repeats, "on_steps_per_s": on_med, "off_steps_per_s": off_med,
        "end_to_end_pct": (off_med - on_med) / off_med * 100,
        "noise_pct": (max(off) - min(off)) / off_med * 100,
        "calls_per_step": 1 + 1 / CONFIG["training"]["logEvery"], "probe_interval_s": PROBE_INTERVAL_S,
        "timing_point_ms": timing_ms, "transfer_probe_ms": transfer_ms, "implied_pct": implied,
        "goal_from_step_ms": goal_from_step_ms(micro["record_ns_per_call"], timing_ms, transfer_ms), **micro,
        "runs": {"on": on, "off": off},
    }
    result = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "command": "python bench/bench_fault_overhead.py" + (" --skip-cluster" if args.skip_cluster else ""),
              "overhead": overhead}
    result["waits"] = {**waits(), "command": "python bench/bench_fault_overhead.py", "date": time.strftime("%Y-%m-%d")}
    if not args.skip_cluster:
        result["cluster"] = fault_to_running()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    section = render(result)
    write_doc(section)
    print(section)


if __name__ == "__main__":
    main()
