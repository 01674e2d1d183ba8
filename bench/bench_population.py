"""Population benchmark: population-based training against the same four configurations trained without exploit.

A Population of 4 DiLoCo members (one worker each) searches ``training.lr`` (log-uniform in [1e-4, 3e-2]) and
``algorithm.outerLr`` (uniform in [0.3, 1.0]). Its decisions are the operator's own: each round the benchmark calls
:func:`loco_operator.population.reconcile.plan_population` with the member jobs' final eval losses, and runs the
member jobs it creates through the trainer's real code path (``python -m loco_trainer --config FILE --nproc 1
--history FILE``) with each job's config rendered by the operator (``render.config_json``) and its
``checkpoint.initFrom`` passed as the operator passes it (``LOCO_INIT_FROM``). The baseline trains the same four
first configurations (the Population's round-0 hyper-parameters) for the whole run, without exploit.

Measured: the final eval loss of the Population's best member, against the median (the goal, issue 26) and the best
of the four baseline runs, at three seeds. Also: how far a member that was never exploited ends from the same
configuration trained in one job (the cost of splitting a run into rounds through checkpoints: ideally none).

    python bench/bench_population.py                  # 3 seeds (~15 min on 2 cores), then the doc
    python bench/bench_population.py --render-only    # re-render docs/benchmarks.md from the results
    python bench/bench_population.py --steps 40 --every 20 --seeds 0 --no-doc   # the short mode (CI's test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convergence import BASE_CONFIG, parse_history  # noqa: E402
from benchdoc import cpu_model, markers, run_trainer, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_population.json"
NAME = "bench_population"
NAMESPACE = "bench"

SIZE = 4
STEPS = 1200
EVERY = 200
H = 20
SEEDS = (0, 1, 2)
#: trainers run side by side (2 cores)
PARALLEL = 2
SEARCH = [{"field": "training.lr", "min": 1e-4, "max": 3e-2},
          {"field": "algorithm.outerLr", "min": 0.3, "max": 1.0, "scale": "linear"}]


# ------------------------------------------------------------------------------ pure pieces


def population_body(seed: int, steps: int, every: int, ckpt: str) -> dict[str, Any]:
    """The Population the benchmark plays: the convergence benchmark's tiny GPT and corpus, one worker per member."""
    training = {**BASE_CONFIG["training"], "steps": steps, "evalEvery": every, "warmupSteps": max(2, steps // 20),
                "logEvery": every, "seed": 1000 + seed}
    template = {"replicas": 1, "algorithm": {"name": "diloco", "syncEvery": min(H, every)},
                "model": BASE_CONFIG["model"], "data": BASE_CONFIG["data"], "training": training,
                "checkpoint": {"path": ckpt, "everySteps": 0, "keep": 2}}
    return {"apiVersion": "loco.dev/v1alpha1", "kind": "Population",
            "metadata": {"name": f"pbt{seed}", "namespace": NAMESPACE, "uid": f"bench-{seed}"},
            "spec": {"size": SIZE, "template": template, "search": SEARCH, "exploitEverySteps": every, "seed": seed}}


def trainer_run(job: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A member job as the operator would start it: its trainer config and its ``LOCO_INIT_FROM`` (None: none)."""
    from loco_operator.render import JobRef, config_json
    from loco_operator.spec import TrainingJobSpec

    spec = TrainingJobSpec.model_validate(job["spec"])
    config = json.loads(config_json(JobRef(job["metadata"]["name"], NAMESPACE, "uid"), spec))
    source = spec.checkpoint.init_from
    init_from = (None if source is None else
                 f"{spec.checkpoint.path.rstrip('/')}/{NAMESPACE}/{source.job_name}/step-{source.step:08d}")
    return config, init_from


def baseline_job(body: dict[str, Any], member: int, values: dict[str, float]) -> dict[str, Any]:
    """Member ``member``'s first configuration trained for the whole run, without exploit."""
    spec = json.loads(json.dumps(body["spec"]["template"]))
    for dotted, value in values.items():
        section, field = dotted.split(".")
        spec[section][field] = value
    return {"metadata": {"name": f"{body['metadata']['name']}-base{member}"}, "spec": spec}


def summarize(pbt: dict[str, Any], baseline: list[float]) -> dict[str, Any]:
    """One seed's row: the Population's best final loss against the baseline's median and best."""
    best, median = pbt["best"], statistics.median(baseline)
    kept = [m for m in pbt["never_exploited"] if m is not None]
    return {"pbt_best": best, "baseline_median": median, "baseline_best": min(baseline),
            "vs_median_pct": 100 * (best - median) / median, "vs_best_pct": 100 * (best - min(baseline)) / min(baseline),
            "beats_median": best < median, "exploits": pbt["exploits"],
            "split_gap_pct": max((abs(d) for d in kept), default=None)}


def render(results: dict[str, Any]) -> str:
    meta, rows = results.get("meta", {}), results.get("rows", {})
    out = ["## Population-based training (CPU)", "",
           f"Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, torch {meta.get('torch', '?')}, "
           f"Python {meta.get('python', '?')}, {meta.get('date', '?')}. Command: `python bench/bench_population.py`.", "",
           f"{SIZE} DiLoCo members (1 worker each, H = {H}, the convergence benchmark's tiny GPT and corpus), "
           f"{meta.get('steps', STEPS)} inner steps, a round every {meta.get('every', EVERY)} steps (truncation 0.25: "
           "one exploit per round). Search: training.lr log-uniform in [1e-4, 3e-2], algorithm.outerLr uniform in "
           "[0.3, 1.0]. The decisions are the operator's (`plan_population`); every member job runs the real trainer "
           "with the config the operator renders and its `initFrom` checkpoint. The baseline trains the Population's "
           "four first configurations for the whole run without exploit. Lower is better.", "",
           "| Seed | PBT best | Baseline median | Baseline best | PBT vs median | PBT vs best | Exploits | "
           "Split-run gap |", "|---|---|---|---|---|---|---|---|"]
    for seed, r in sorted(rows.items()):
        gap = "–" if r["split_gap_pct"] is None else f"{r['split_gap_pct']:.2f} %"
        out.append(f"| {seed} | {r['pbt_best']:.4f} | {r['baseline_median']:.4f} | {r['baseline_best']:.4f} | "
                   f"{r['vs_median_pct']:+.2f} % | {r['vs_best_pct']:+.2f} % | {r['exploits']} | {gap} |")
    if rows:
        met = all(r["beats_median"] for r in rows.values())
        out += ["", f"**Goal (issue 26): the Population's best member below the median of the same four "
                f"configurations trained without exploit, at every seed: {'met' if met else 'missed'}** "
                f"({sum(r['beats_median'] for r in rows.values())} of {len(rows)} seeds).", "",
                "Split-run gap: the largest difference, over the members that were never exploited, between a "
                "member's final loss and the same configuration's loss trained in one job (the cost of ending a job "
                "at each round and starting the next from its checkpoint)."]
    out += [""] + [f"- {note}" for note in results.get("notes", [])] if results.get("notes") else []
    return "\n".join(out)


# ------------------------------------------------------------------------------------- runs


def master_port() -> int:
    """A free port below the ephemeral range for one trainer: two trainers run side by side, and the launcher's own
    choice (an ephemeral port, released before gloo listens on it) can be taken by the other's connections."""
    for _ in range(200):
        port = random.randrange(20000, 31000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31000")


def run_member(job: dict[str, Any], workdir: Path) -> float:
    """Run one member job with the trainer; its final eval loss."""
    config, init_from = trainer_run(job)
    name = job["metadata"]["name"]
    cfg, history = workdir / f"{name}.json", workdir / f"{name}.jsonl"
    cfg.write_text(json.dumps(config))
    env = {"MASTER_PORT": str(master_port()), **({"LOCO_INIT_FROM": init_from} if init_from else {})}
    run_trainer(cfg, history, nproc=1, env=env, what=name)
    return parse_history(history.read_text().splitlines())["final_eval"]


def run_population(body: dict[str, Any], workdir: Path, pool: ThreadPoolExecutor) -> dict[str, Any]:
    """Play the Population with the operator's decisions until it finishes."""
    from loco_operator.population.reconcile import plan_population

    jobs: dict[str, dict[str, Any]] = {}
    while True:
        plan = plan_population(body, list(jobs.values()))
        body = {**body, "status": plan.status}
        status = plan.status
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        for name in plan.delete:
            jobs.pop(name, None)
        losses = list(pool.map(lambda job: run_member(job, workdir), plan.create))
        for job, loss in zip(plan.create, losses):
            jobs[job["metadata"]["name"]] = {**job, "status": {"phase": "Succeeded", "evalLoss": loss}}
        print(f"  round {status['round'] + 1}/{status['rounds']}: "
              + ", ".join(f"{loss:.4f}" for loss in losses), flush=True)
    if status["phase"] != "Succeeded":
        raise RuntimeError(f"the population failed: {status.get('message')}")
    copied = {r["member"] for r in status["lineage"]} | {r["parent"] for r in status["lineage"]}
    return {"best": status["best"]["score"], "exploits": len(status["lineage"]), "lineage": status["lineage"],
            "final": [m["score"] for m in status["members"]], "copied": sorted(copied)}


def machine(steps: int, every: int) -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "steps": steps, "every": every}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--every", type=int, default=EVERY, help="exploitEverySteps")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    from loco_operator.population.plan import initial_hyperparameters
    from loco_operator.population.spec import PopulationSpec

    results = json.loads(args.results.read_text()) if args.results.exists() else {"rows": {}, "runs": {}}
    if not args.render_only:
        results["meta"] = machine(args.steps, args.every)
        with tempfile.TemporaryDirectory(prefix="bench-population-") as tmp, ThreadPoolExecutor(PARALLEL) as pool:
            for seed in (int(s) for s in args.seeds.split(",")):
                started = time.time()
                workdir = Path(tmp) / f"seed{seed}"
                workdir.mkdir()
                body = population_body(seed, args.steps, args.every, str(workdir / "ckpt"))
                first = initial_hyperparameters(PopulationSpec.model_validate(body["spec"]))
                print(f"seed {seed}: baseline", flush=True)
                baseline = list(pool.map(lambda mv: run_member(baseline_job(body, *mv), workdir), enumerate(first)))
                print(f"seed {seed}: population", flush=True)
                pbt = run_population(body, workdir, pool)
                # members never exploited and never copied kept their first values: compare them with the baseline
                pbt["never_exploited"] = [None if i in {r["member"] for r in pbt["lineage"]} else
                                          100 * (pbt["final"][i] - baseline[i]) / baseline[i] for i in range(SIZE)]
                results["runs"][f"seed{seed}"] = {"baseline": baseline, "first": first, **pbt,
                                                  "wall_s": round(time.time() - started, 1)}
                results["rows"][str(seed)] = row = summarize(pbt, baseline)
                print(f"seed {seed}: PBT best {row['pbt_best']:.4f}, baseline median {row['baseline_median']:.4f}, "
                      f"best {row['baseline_best']:.4f} ({time.time() - started:.0f} s)", flush=True)
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(results, indent=1) + "\n")
    section = render(results)
    print(section)
    if not args.no_doc:
        start, end = markers(NAME)
        write_section(section, start, end)


if __name__ == "__main__":
    main()
