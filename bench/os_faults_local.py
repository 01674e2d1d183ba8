"""Faults made by the operating system, against the local launcher's detector (issue 29 #5, its local half).

No fault injection: ``python -m loco_trainer --nproc 2`` trains a small GPT with DDP and this script does to
rank 1 what a machine does to a process: ``SIGSTOP`` (a hang: the process stops answering and computing),
``SIGKILL`` (``kill -9``: it is gone). It measures how long until the launcher names the rank, and runs a clean
job for a while to count false verdicts. The detector runs with its defaults (hang floor 10 s) plus the
loaded-host thresholds of docs/fault-detection.md (the script shares 2 cores with the ranks).

    .venv/bin/python bench/os_faults_local.py --hang-trials 5 --kill-trials 3 --clean-minutes 10

Writes its section of docs/benchmarks.md (``--no-doc`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from loco_local.os_faults import stop_launcher

sys.path.insert(0, str(Path(__file__).resolve().parent))

DOC_NAME = "os_faults_local"
#: docs/fault-detection.md "Loaded hosts": the ranks, the launcher and this script share 2 cores
DETECTOR = {"minLatenessSeconds": 0.8, "minLinkExcessSeconds": 0.1}
VERDICT = re.compile(r"fault detector: (?P<message>.*) \[(?P<kind>[a-z-]+), ranks \[(?P<ranks>[0-9, ]*)\]")


def start(workdir: Path, on_fault: str, nproc: int = 2, algorithm: dict | None = None) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "jobName": "osfaults", "namespace": "bench",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 200_000},
        "training": {"steps": 10_000_000, "batchSize": 4, "seqLen": 32, "lr": 3e-3, "warmupSteps": 2, "logEvery": 4,
                     "evalEvery": 10_000_000, "evalBatches": 1},
        "algorithm": algorithm or {"name": "ddp"},
        "checkpoint": {"path": str(workdir / "ckpt"), "everySteps": 10_000_000},
    }))
    (workdir / "detector.yaml").write_text(yaml.safe_dump(DETECTOR))
    cmd = [sys.executable, "-m", "loco_trainer", "--config", str(workdir / "config.yaml"), "--nproc", str(nproc),
           "--history", str(workdir / "history.jsonl"), "--detector-config", str(workdir / "detector.yaml"),
           "--on-fault", on_fault, "--fault-trace", str(workdir / "trace.jsonl")]
    return subprocess.Popen(cmd, stdout=open(workdir / "launcher.log", "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})


def steps(workdir: Path) -> int:
    path = workdir / "history.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(x).get("step", 0) for x in lines if x.strip()), default=0)


def wait_running(launcher: subprocess.Popen, workdir: Path, min_steps: int = 40, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while steps(workdir) < min_steps:
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the run did not get going: {(workdir / 'launcher.log').read_text()[-2000:]}")
        time.sleep(0.2)
    time.sleep(5)  # a few polling rounds: the detector's warm-up (5 judged collectives) is behind it


def rank1(launcher: subprocess.Popen) -> psutil.Process:
    return next(c for c in psutil.Process(launcher.pid).children() if c.environ().get("LOCO_REPLICA_INDEX") == "1")


def verdicts(workdir: Path) -> list[dict]:
    found = []
    for line in (workdir / "launcher.log").read_text().splitlines():
        m = VERDICT.search(line)
        if m and "evidence" in line:
            found.append({"kind": m["kind"], "ranks": [int(r) for r in m["ranks"].split(",") if r.strip()]})
    return found


def hang_trial(workdir: Path) -> dict:
    launcher = start(workdir, "stop")
    try:
        wait_running(launcher, workdir)
        rank1(launcher).send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        while not verdicts(workdir) and time.monotonic() - frozen < 120:
            time.sleep(0.05)
        took = time.monotonic() - frozen
        code = launcher.wait(timeout=90)
    finally:
        stop_launcher(launcher)
    first = (verdicts(workdir) or [{}])[0]
    return {"seconds": round(took, 2), "kind": first.get("kind"), "ranks": first.get("ranks"), "exit": code,
            "right": first.get("kind", "").startswith("hang") and first.get("ranks") == [1] and code == 75}


def kill_trial(workdir: Path) -> dict:
    launcher = start(workdir, "stop")
    try:
        wait_running(launcher, workdir)
        rank1(launcher).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = launcher.wait(timeout=90)
        took = time.monotonic() - killed
    finally:
        stop_launcher(launcher)
    log = (workdir / "launcher.log").read_text()
    named = "local rank 1 exited with code 137" in log
    return {"seconds": round(took, 2), "exit": code, "right": code == 137 and named}


def slow_trial(workdir: Path, fault: str) -> dict:
    """Rank 1 of 3 DiLoCo ranks (an outer all-reduce every 10 steps) slowed by the operating system (``cycle``:
    stopped 1.5 s of every 2 s; ``cap``: a CPU quota of 2% of one core) until the first verdict: a straggler
    (slow-noncomm) of rank 1 alone is right. Three ranks: with two, lateness by MAD cannot say which one is late.
    DiLoCo, not DDP: under DDP a starved rank is slow inside each all-reduce's transfer too, and was once blamed
    as a slow connection (slow-comm-link) instead (docs/fault-detection.md, Limits)."""
    from loco_local.os_faults import StopCycler, cpu_cap

    launcher = start(workdir, "report", nproc=3, algorithm={"name": "diloco", "syncEvery": 10})
    try:
        wait_running(launcher, workdir)
        proc = rank1(launcher)
        with StopCycler([proc], 1.5, 0.5) if fault == "cycle" else cpu_cap([proc.pid], 0.02):
            began = time.monotonic()
            while not verdicts(workdir) and time.monotonic() - began < 120:
                time.sleep(0.05)
            took = time.monotonic() - began
    finally:
        stop_launcher(launcher)
    first = (verdicts(workdir) or [{}])[0]
    return {"seconds": round(took, 2) if first else None, "kind": first.get("kind"), "ranks": first.get("ranks"),
            "right": first.get("kind") == "slow-noncomm" and first.get("ranks") == [1]}


def clean_run(workdir: Path, minutes: float) -> dict:
    launcher = start(workdir, "report")
    try:
        wait_running(launcher, workdir)
        began, first_step = time.monotonic(), steps(workdir)
        while time.monotonic() - began < minutes * 60:
            if launcher.poll() is not None:
                raise SystemExit(f"the clean run ended early: {(workdir / 'launcher.log').read_text()[-2000:]}")
            time.sleep(1.0)
        done = steps(workdir) - first_step
    finally:
        stop_launcher(launcher)
    return {"minutes": minutes, "steps": done, "verdicts": verdicts(workdir)}


def render(result: dict) -> str:
    hang, kill, clean = result["hang"], result["kill"], result["clean"]
    hang_s = [t["seconds"] for t in hang]
    kill_s = [t["seconds"] for t in kill]
    lines = [
        "## OS faults against the local launcher's detector",
        "",
        f"`{result['command']}` on {result['machine']}, {result['date']}.",
        "",
        "`python -m loco_trainer --nproc 2` (DDP, a 1-layer GPT) with the detector's defaults (hang floor 10 s) and the "
        "loaded-host thresholds (`minLatenessSeconds` 0.8, `minLinkExcessSeconds` 0.1); the faults come from the "
        "operating system, not the trainer's fault injection: `SIGSTOP` of rank 1 (a hang) and `SIGKILL` of rank 1 "
        "(`kill -9`); with three DiLoCo ranks (an outer all-reduce every 10 steps), `SIGSTOP`/`SIGCONT` "
        "cycling (a straggler) and a cgroup CPU quota (a slow machine) of rank 1. Time is from the signal to the launcher's verdict, or to its exit naming the rank (kill).",
        "",
        "| fault | trials | right class and rank | time to verdict, median (min-max) |",
        "|---|---|---|---|",
        f"| `SIGSTOP` rank 1 (hang) | {len(hang)} | {sum(t['right'] for t in hang)} | "
        + (f"{statistics.median(hang_s):.1f} s ({min(hang_s):.1f}-{max(hang_s):.1f})" if hang_s else "-") + " |",
        f"| `kill -9` rank 1 | {len(kill)} | {sum(t['right'] for t in kill)} | "
        + (f"{statistics.median(kill_s):.1f} s ({min(kill_s):.1f}-{max(kill_s):.1f})" if kill_s else "-") + " |",
        *(slow_row(label, result.get(key) or [], result.get("skipped", {}).get(key))
          for key, label in (("cycle", "`SIGSTOP` 1.5 s / `SIGCONT` 0.5 s cycling rank 1 of 3 DiLoCo ranks (a straggler)"),
                             ("cap", "CPU quota of 2% of a core on rank 1 of 3 DiLoCo ranks (a slow machine)"))),
        "",
        f"Clean run: {clean['minutes']:g} min, {clean['steps']:,} steps, {len(clean['verdicts'])} verdicts"
        + (f" ({', '.join(v['kind'] + ' ' + str(v['ranks']) for v in clean['verdicts'])})" if clean["verdicts"] else "")
        + ".",
    ]
    return "\n".join(lines)


def slow_row(label: str, trials: list[dict], skipped: str | None) -> str:
    took = [t["seconds"] for t in trials if t["seconds"] is not None]
    if not trials:
        return f"| {label} | 0 | - | - ({skipped or 'not run'}) |"
    return (f"| {label} | {len(trials)} | {sum(t['right'] for t in trials)} | "
            + (f"{statistics.median(took):.1f} s ({min(took):.1f}-{max(took):.1f})" if took else "no verdict") + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hang-trials", type=int, default=5)
    parser.add_argument("--kill-trials", type=int, default=3)
    parser.add_argument("--slow-trials", type=int, default=3, help="Trials of each slowing fault (cycling, CPU cap).")
    parser.add_argument("--clean-minutes", type=float, default=10.0)
    parser.add_argument("--no-doc", action="store_true", help="Print the figures only.")
    args = parser.parse_args()
    from loco_local.os_faults import cpu_cap_unavailable

    cap_unavailable = cpu_cap_unavailable()
    with tempfile.TemporaryDirectory(prefix="loco-os-faults-") as tmp:
        root = Path(tmp)
        result = {
            "command": "python bench/os_faults_local.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": dt.date.today().isoformat(),
            "hang": [hang_trial(root / f"hang-{i}") for i in range(args.hang_trials)],
            "kill": [kill_trial(root / f"kill-{i}") for i in range(args.kill_trials)],
            "cycle": [slow_trial(root / f"cycle-{i}", "cycle") for i in range(args.slow_trials)],
            "cap": [slow_trial(root / f"cap-{i}", "cap") for i in range(args.slow_trials if not cap_unavailable else 0)],
            "skipped": {"cap": cap_unavailable} if cap_unavailable else {},
            "clean": clean_run(root / "clean", args.clean_minutes),
        }
    from benchdoc import cpu_model, markers, write_section

    result["machine"] = f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(json.dumps(result, indent=1))
    if not args.no_doc:
        write_section(render(result), *markers(DOC_NAME))


if __name__ == "__main__":
    main()
