"""Faults made by the operating system, against a TrainingJob on the embedded cluster (issue 29 #5, its cluster
half; the launcher's half is bench/os_faults_local.py).

Three DDP workers train a small GPT; this script does to worker 1 what a machine does to a process (see
loco_local/os_faults.py): a long ``SIGSTOP`` (a hang), ``SIGSTOP``/``SIGCONT`` cycling (a straggler), a cgroup
CPU quota (a slow machine, where cgroups are writable), ``kill -9`` (a crash). Each trial is a fresh job; the
time is from the signal to the operator's record in the job's status. A clean job then runs for a while and
every fault the operator records in it is a false verdict.

    .venv/bin/python bench/os_faults_cluster.py --trials 3 --clean-minutes 10

Writes its section of docs/benchmarks.md (``--no-doc`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loco_local.fault_trials import (  # noqa: E402
    CAP_FRACTION, DETECTION, FAULTS, STOP_S, RUN_S, VICTIM, os_fault_job, run_fault, status, wait_training,
)
from loco_local.os_faults import cpu_cap_unavailable  # noqa: E402
from loco_local.scenario import CHECKPOINT_CLAIM  # noqa: E402
from loco_local.stack import LocalStack, default_nodes  # noqa: E402

DOC_NAME = "os_faults_cluster"
EXPECTED = {"stop": "hang", "cycle": "slow-noncomm", "cap": "slow-noncomm", "kill": "WorkerFailed"}
STARTUP_S = 300


def trial(stack: LocalStack, name: str, fault: str) -> dict:
    stack.apply(os_fault_job(name, steps=1_000_000))
    try:
        wait_training(stack, name, 20, STARTUP_S)
        result = run_fault(stack, name, fault, timeout_s=120)
    finally:
        stack.kubectl("delete", "tj", name, "--wait=false", check=False)
    right = bool(result.kind and result.kind.startswith(EXPECTED[fault]) and result.blames_only(name))
    timeout = (result.record.get("evidence") or {}).get("timeout_s")
    return {"fault": fault, "seconds": result.seconds, "kind": result.kind, "right": right,
            "ranks": result.record.get("ranks"), "pods": result.record.get("pods"), "hang_timeout_s": timeout}


def clean_run(stack: LocalStack, minutes: float) -> dict:
    name = "os-clean"
    stack.apply(os_fault_job(name, steps=1_000_000))
    try:
        wait_training(stack, name, 20, STARTUP_S)
        first = status(stack, name).get("step") or 0
        time.sleep(minutes * 60)
        st = status(stack, name)
    finally:
        stack.kubectl("delete", "tj", name, "--wait=false", check=False)
    return {"minutes": minutes, "steps": (st.get("step") or 0) - first, "phase": st.get("phase"),
            "verdicts": [{"kind": f["kind"], "ranks": f["ranks"]} for f in st.get("faults") or []],
            "restarts": st.get("restarts", 0)}


def _wait_gone(stack: LocalStack) -> None:
    """Trials one after another: the next starts when the last one's workers are gone (2 cores)."""
    stack.wait_for(lambda: not [p for p in stack.list_pods() if "loco.dev/job" in p["metadata"].get("labels", {})],
                   timeout_s=180, what="the previous trial's pods gone")


def render(result: dict) -> str:
    rows = []
    for fault in FAULTS:
        trials = [t for t in result["trials"] if t["fault"] == fault]
        if not trials:
            rows.append(f"| {LABELS[fault]} | 0 | - | - ({result['skipped'].get(fault, 'not run')}) |")
            continue
        took = [t["seconds"] for t in trials if t["seconds"] is not None]
        rows.append(f"| {LABELS[fault]} | {len(trials)} | {sum(t['right'] for t in trials)} | "
                    + (f"{statistics.median(took):.1f} s ({min(took):.1f}-{max(took):.1f})" if took else "no record")
                    + " |")
    clean = result["clean"]
    return "\n".join([
        "## OS faults against a job on the embedded cluster",
        "",
        f"`{result['command']}` on {result['machine']}, {result['date']}.",
        "",
        f"A TrainingJob of three DDP workers (a 1-layer GPT) on the embedded cluster, judged by the operator's live "
        f"detector with the loaded-host thresholds (`{json.dumps(DETECTION)}`, hang floor = the default). The faults "
        f"come from the operating system, done to worker {VICTIM}'s process; each trial is a fresh job, faulted "
        "past step 20. Time is from the signal to the operator's record in the job's status (`status.faults`; "
        "for `kill -9`, `status.lastFailure`), as a user polling the job sees it. Right: the expected class "
        f"and worker {VICTIM} alone.",
        "",
        "| fault | trials | right class and worker | time to the record, median (min-max) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Clean job: {clean['minutes']:g} min, {clean['steps']:,} steps, {len(clean['verdicts'])} verdicts"
        + (f" ({', '.join(v['kind'] + ' ' + str(v['ranks']) for v in clean['verdicts'])})" if clean["verdicts"] else "")
        + f", {clean['restarts']} restarts.",
    ])


LABELS = {"stop": "`SIGSTOP` (a hang)", "cycle": f"`SIGSTOP` {STOP_S:g} s / `SIGCONT` {RUN_S:g} s cycling (a straggler)",
          "cap": f"CPU quota of {CAP_FRACTION:.0%} of a core (a slow machine)", "kill": "`kill -9`"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="Trials of each fault.")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"Which, of {','.join(FAULTS)}.")
    parser.add_argument("--clean-minutes", type=float, default=10.0)
    parser.add_argument("--no-doc", action="store_true", help="Print the figures only.")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    skipped = {}
    if "cap" in faults and (why := cpu_cap_unavailable()):
        faults.remove("cap")
        skipped["cap"] = why
    from benchdoc import cpu_model, markers, write_section

    result = {"command": "python bench/os_faults_cluster.py " + " ".join(sys.argv[1:]),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "date": dt.date.today().isoformat(), "trials": [], "skipped": skipped}
    with tempfile.TemporaryDirectory(prefix="loco-os-faults-") as state, LocalStack(Path(state), default_nodes(3)) as stack:
        stack.apply(dict(CHECKPOINT_CLAIM))
        for i in range(args.trials):
            for fault in faults:
                result["trials"].append(trial(stack, f"os-{fault}-{i}", fault))
                print(json.dumps(result["trials"][-1]), flush=True)
                _wait_gone(stack)
        result["clean"] = clean_run(stack, args.clean_minutes)
    print(json.dumps(result, indent=1))
    if not args.no_doc:
        write_section(render(result), *markers(DOC_NAME))


if __name__ == "__main__":
    main()
