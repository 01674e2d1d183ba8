"""Elastic resizing on the embedded cluster: how long a job takes to train on after a node fails, how
long to grow back once the node returns, and the goodput over that window, per algorithm.

Scenario (the same shape as ``e2e/test_elastic.py``): three 4-CPU fake nodes, a 3-worker job whose
pods request 3 CPUs each (so no node can take a second worker), ``elastic: {minReplicas: 2,
maxReplicas: 3, scaleUpDelaySeconds: 3, placementTimeoutSeconds: 4}``, a checkpoint every 20 steps.
Once the job trains steadily, the node of worker 2 is marked NotReady; later it is marked Ready again.
Timed from the moment the node fails:

* **evicted**: the worker's pod is gone from the job's current epoch (the cluster's
  ``pod_eviction_timeout_s`` = 10 s here; Kubernetes' default is 300 s, set by the node lifecycle
  controller, not by Loco);
* **running at 2**: ``phase: Running`` with 2 ready workers (the operator's part: restart, the
  replacement fails to place for ``placementTimeoutSeconds``, shrink, the new pods start and join);
* **training on at 2**: ``status.step`` passes the last step the old membership reported (the
  work since the last checkpoint redone; the embedded cluster's NotReady node keeps its processes
  running until they are evicted, as a partitioned node would).

Then, from the moment the node is Ready again: **running at 3** and **training on at 3**.

**Goodput** over the window from the failure to 30 s after the job trains on at 3 workers:
useful tokens (each step counted once, the first time the job reaches it, at the size it ran at)
over the wall time, relative to the steady-state tokens/s before the failure.

DiLoCo, Streaming DiLoCo, NoLoCo and CO2 resize live (docs/elastic.md, "Live resizing": the survivors keep
running, a joiner takes the global state from them); DDP resizes by a coordinated
restart of all workers from the last universal checkpoint. ``diloco-restart`` is DiLoCo with
``elastic.liveResize: false``: the same algorithm through the restart path, for the comparison.

Writes its section of ``docs/benchmarks.md`` (between markers) and ``bench/results/bench_elastic.json``.

    python bench/bench_elastic.py                         # ddp, diloco, streaming-diloco, noloco, co2
    python bench/bench_elastic.py --algorithms ddp,diloco
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdoc import cpu_model, markers, parse_algorithms, write_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "bench_elastic.json"
START, END = markers("bench_elastic")
ALGORITHMS = ("ddp", "diloco", "streaming-diloco", "noloco", "co2", "diloco-restart")
BATCH, SEQ = 4, 32
STEADY_S = 20.0  # steady-state measurement before the failure
TAIL_S = 30.0  # goodput window continues this long after the job trains on at 3 workers
TIMEOUT_S = 300.0


def _job(name: str, algorithm: str) -> dict[str, Any]:
    from loco_local.scenario import small_job

    restart = algorithm.endswith("-restart")
    return small_job(
        name, replicas=3, steps=100_000, algorithm=algorithm.removesuffix("-restart"),
        elastic={"minReplicas": 2, "maxReplicas": 3, "scaleUpDelaySeconds": 3, "placementTimeoutSeconds": 4,
                 "liveResize": not restart},
        faultInjection={"stepDelayS": 0.05},
        runPolicy={"backoffLimit": 10},
        checkpoint__everySteps=20,
        training__evalEvery=0,
        training__batchSize=BATCH,
        training__seqLen=SEQ,
        template__resources={"requests": {"cpu": "3", "memory": "256Mi"}},
        # this bench times resizing, not detection: on a shared 2-core host the detector's default
        # thresholds blame CPU-starved ranks (docs/fault-detection.md, "Loaded hosts")
        faultDetection={"enabled": False},
    )


class Tracker:
    """Polls the job and keeps the useful-token tally (each step counted once, at its size)."""

    def __init__(self, stack: Any, name: str) -> None:
        self.stack, self.name = stack, name
        self.max_step = 0
        self.useful_tokens = 0.0
        self.status: dict[str, Any] = {}
        self.timeline: list[tuple[float, int, int, int, int]] = []  # (t, step, desired, ready, epoch)

    def poll(self) -> dict[str, Any]:
        st = (self.stack.get_job(self.name) or {}).get("status") or {}
        step = int(st.get("step") or 0)
        desired = int((st.get("workers") or {}).get("desired") or 0)
        if step > self.max_step:
            self.useful_tokens += (step - self.max_step) * desired * BATCH * SEQ
            self.max_step = step
        if st.get("phase") in ("Failed", "Succeeded"):
            raise SystemExit(f"{self.name}: job ended {st.get('phase')}: {st.get('message')}")
        self.status = st
        workers = st.get("workers") or {}
        self.timeline.append((round(time.monotonic(), 2), step, desired, int(workers.get("ready") or 0),
                              int(st.get("membershipEpoch") or 0)))
        return st

    def until(self, predicate, what: str) -> float:  # noqa: ANN001 - a status predicate
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if predicate(self.poll()):
                return time.monotonic()
            time.sleep(0.2)
        raise SystemExit(f"{self.name}: timed out after {TIMEOUT_S:.0f} s waiting for {what}; status {self.status}")


def _running(size: int):  # noqa: ANN202
    return lambda st: (st.get("phase") == "Running" and (st.get("workers") or {}).get("desired") == size
                       and (st.get("workers") or {}).get("ready") == size)


def scenario(algorithm: str) -> dict[str, float]:
    from loco_local.stack import LocalStack, default_nodes

    name = f"el-{algorithm}"
    with tempfile.TemporaryDirectory() as state, LocalStack(Path(state), default_nodes(3)) as stack:
        pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "e2e-checkpoints"},
               "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}
        stack.apply(pvc)
        stack.apply(_job(name, algorithm))
        t = Tracker(stack, name)
        t.until(lambda st: _running(3)(st) and (st.get("lastCheckpoint") or {}).get("step", 0) >= 20,
                "3 workers and a first checkpoint")
        t0, s0 = time.monotonic(), t.max_step
        time.sleep(STEADY_S)
        t.poll()
        steady_tps = (t.max_step - s0) * 3 * BATCH * SEQ / (time.monotonic() - t0)

        victim = next(p for p in stack.list_pods(name) if p["metadata"]["labels"]["loco.dev/rank"] == "2")
        node = victim["spec"]["nodeName"]
        tokens_before = t.useful_tokens
        t_fail = time.monotonic()
        stack.cluster.set_node_ready(node, False)
        epoch = int(t.status.get("membershipEpoch") or 0)
        t_evicted = t.until(lambda st: int(st.get("membershipEpoch") or 0) > epoch, "the failed worker to be noticed")
        # a NotReady node's processes may train on until they are evicted: "before the failure" is the
        # last step the old membership reported
        step_before = t.max_step
        t_run2 = t.until(_running(2), "running at 2 workers")
        t_train2 = t.until(lambda st: int(st.get("step") or 0) > step_before, "training past the pre-failure step")

        stack.cluster.set_node_ready(node, True)
        t_back, step_back = time.monotonic(), t.max_step
        t_run3 = t.until(_running(3), "running at 3 workers")
        t_train3 = t.until(lambda st: _running(3)(st) and int(st.get("step") or 0) > step_back,
                           "training on at 3 workers")
        time.sleep(TAIL_S)
        t.poll()
        t_end = time.monotonic()
        goodput = (t.useful_tokens - tokens_before) / (t_end - t_fail)
        if os.environ.get("LOCO_BENCH_TIMELINE"):  # (t since the failure, step, desired, ready, epoch) per poll
            Path(os.environ["LOCO_BENCH_TIMELINE"]).write_text(json.dumps(
                [(round(p[0] - t_fail, 2), *p[1:]) for p in t.timeline if p[0] >= t_fail - 5]))
        return {
            "steady_tokens_per_s": steady_tps,
            "failure_noticed_s": t_evicted - t_fail,
            "running_at_2_s": t_run2 - t_fail,
            "training_on_at_2_s": t_train2 - t_fail,
            "running_at_3_s": t_run3 - t_back,
            "training_on_at_3_s": t_train3 - t_back,
            "window_s": t_end - t_fail,
            "goodput_tokens_per_s": goodput,
            "goodput_ratio": goodput / steady_tps if steady_tps else 0.0,
            "resizes": int(t.status.get("resizes") or 0),
            "restarts": int(t.status.get("restarts") or 0),
            "live": int(t.status.get("restarts") or 0) == 0,
        }


def machine() -> str:
    cpu = cpu_model()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}, 1-minute load {load:.1f} at the end")


def render(result: dict[str, Any]) -> str:
    rows = result["runs"]
    lines = [
        "## Elastic resizing: failure to training on, capacity back, goodput (`bench/bench_elastic.py`)",
        "",
        f"Machine: {result['machine']}. Each row: `python bench/bench_elastic.py --algorithms <row>`, run on the "
        "date shown (`diloco-restart` on 2026-12-02 was measured as `diloco`, before live resizing existed: the same "
        "restart path).",
        "",
        "Embedded cluster, three 4-CPU fake nodes, a 3-worker job (tiny GPT, batch 4 x 32 tokens per worker, "
        "a 0.05 s injected step delay, a checkpoint every 20 steps, fault detection off), pods requesting 3 CPUs so a lost node's "
        "worker cannot be replaced; `elastic: {minReplicas: 2, scaleUpDelaySeconds: 3, placementTimeoutSeconds: 4}`. "
        "Seconds from the node failing (left) and from it coming back (right). The cluster evicts a lost node's "
        "pods after 10 s (Kubernetes' default is 300 s, a node-lifecycle setting, not Loco's).",
        "",
        "| algorithm | resizes | failure noticed | running at 2 | training on at 2 | running at 3 | training on at 3 | goodput / steady | date |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for algo, r in rows.items():
        how = "live" if r.get("live") else "restart"
        lines.append(
            f"| {algo} | {how} | {r['failure_noticed_s']:.1f} | {r['running_at_2_s']:.1f} | {r['training_on_at_2_s']:.1f} "
            f"| {r['running_at_3_s']:.1f} | {r['training_on_at_3_s']:.1f} | {100 * r['goodput_ratio']:.0f} % "
            f"over {r['window_s']:.0f} s | {r.get('date', '')} |"
        )
    lines += [
        "",
        "*Training on* = `status.step` passes the last step reported before the event (the steps since the last "
        "checkpoint are redone); times are read from the job's status, so their resolution is the operator's "
        "progress poll (about 2 s): *training on* equal to *running* means within one poll, and runs of the same code "
        "land on either side of a poll (live `diloco`'s grow: 8.5 and 10.5 s in two runs on 2026-12-03). After a loss, a "
        "survivor blocked in a wait that gloo does not end is interrupted 1 s after the operator's update "
        "(`ABORT_OLD_GROUP_AFTER_S`, docs/elastic.md), which the shrink columns include. *Goodput / steady*: useful tokens (each step once, at the size it ran at) "
        "per second over the window from the failure to 30 s after training on at 3, over the steady "
        "3-worker tokens/s before the failure. One window of about a minute is noisy: two runs of live `diloco` on the "
        "same code gave 60 % and 105 % (on 2 shared cores, 2 workers step faster than 3). "
        "`bench/bench_goodput.py` measures goodput properly: a 30-minute run with a failure every 5 minutes.",
        "",
        "**Reading it.** *live*: the survivors kept running through both resizes (`status.restarts` stayed 0); "
        "*restart*: every resize was a coordinated restart from the last universal checkpoint. The restart path "
        "spends its time noticing the failure (the eviction timeout), waiting `placementTimeoutSeconds` for a "
        "replacement that cannot be placed, starting the worker processes (Python and torch imports, rendezvous) "
        "and redoing the steps since the checkpoint, and the grow restarts everyone again. The live path only "
        "waits for the failure to be noticed (the same eviction timeout: the embedded cluster keeps a NotReady "
        "node's processes running until they are evicted, as a partitioned node would) and a regroup of well "
        "under a second; the grow costs the survivors one rendezvous at an outer-step boundary while the joiner "
        "starts. Compare `diloco` with `diloco-restart`: the same algorithm both ways.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated")
    parser.add_argument("--render-only", action="store_true", help=f"re-render the doc section from {RESULTS.name}")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    if args.render_only:
        write_section(render(json.loads(RESULTS.read_text())), START, END)
        return
    algorithms = parse_algorithms(args.algorithms, ALGORITHMS)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    runs = dict(previous.get("runs") or {})
    for algorithm in algorithms:
        print(f"[bench_elastic] {algorithm} ...", flush=True)
        runs[algorithm] = {**scenario(algorithm), "date": time.strftime("%Y-%m-%d"),
                           "command": f"python bench/bench_elastic.py --algorithms {algorithm}"}
        print(f"[bench_elastic] {algorithm}: {json.dumps(runs[algorithm])}", flush=True)
    result = {"machine": machine(), "command": "python bench/bench_elastic.py" + (
        f" --algorithms {args.algorithms}" if args.algorithms != ",".join(ALGORITHMS) else ""), "runs": runs}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_doc:
        write_section(render(result), START, END)


if __name__ == "__main__":
    main()
