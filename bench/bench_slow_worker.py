"""Slow-worker benchmark: one of four workers is 2x slower; fixed H, adaptive local steps, or evicting it.

Every run goes through the trainer's real code path (``python -m loco_trainer --config FILE --nproc N
--history FILE``) with DiLoCo on the built-in GPT and corpus of the convergence benchmark, H = 50.

The slow worker. A GPU step is mostly device time; here every computed step sleeps ``BASE_STEP_S``
(``faultInjection.stepDelayS``) on top of its CPU work, and rank 3 sleeps ``SLOW_EXTRA_S`` more
(``faultInjection.slowStepDelayS`` on ``ranks: [3]``), which makes it about 2x slower than the others.
The sleeps dominate the step so that the four processes sharing this machine's 2 cores disturb the
comparison little (the CPU part is a few ms); the table gives the slow worker's measured slowdown.

Modes (each at three seeds):

* ``fixed-equal``: no slow worker, fixed H (the reference: what the job would do on equal hardware);
* ``fixed``: the slow worker, fixed H (everyone waits for it at every outer step and probe);
* ``adaptive``: the slow worker, ``algorithm.adaptiveSteps`` (it takes fewer steps per round);
* ``evict``: three workers from the start (the slow one evicted at once: the best case of evicting it).

Measured from rank 0's history (``wallS`` and ``evalLoss`` every ``EVAL_EVERY`` steps and at the end): the
time to the target loss (the highest final eval loss of the seed's modes, so that every mode reaches it),
the eval loss at equal wall-clock (the last eval each mode had when the quickest mode of the seed finished),
and the final eval loss at equal steps. Goal (issue 25 #3): adaptive at least 1.3x faster to the target than
fixed H, with its final loss within 1 % of fixed H's.

    python bench/bench_slow_worker.py                 # 4 modes x 3 seeds (~25 min), then the doc and plot
    python bench/bench_slow_worker.py --render-only   # re-render docs/benchmarks.md and the plot
    python bench/bench_slow_worker.py --steps 300 --seeds 1337 --no-doc   # the short mode (CI's test runs it)
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convergence import BASE_CONFIG, parse_history, warmup_for  # noqa: E402
from benchdoc import cpu_model, markers, run_trainer, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_slow_worker.json"
PLOT = ROOT / "docs" / "slow-worker.png"
NAME = "bench_slow_worker"

MODES = ("fixed-equal", "fixed", "adaptive", "evict")
H = 50
STEPS = 3000
EVAL_EVERY = 100
SEEDS = (1337, 1, 2)
#: seconds every computed step sleeps (device time), and the slow worker's extra seconds
BASE_STEP_S = 0.02
SLOW_EXTRA_S = 0.025
SLOW_RANK = 3
GOAL_SPEEDUP = 1.3
GOAL_FINAL_PCT = 1.0


def build_config(mode: str, steps: int, seed: int, ckpt_path: str) -> tuple[dict[str, Any], int]:
    """The trainer config (wire dict) and the number of workers of one run."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    config = json.loads(json.dumps(BASE_CONFIG))
    config["jobName"] = "bench-slow-worker"
    config["training"].update({"steps": steps, "evalEvery": EVAL_EVERY, "warmupSteps": warmup_for(steps), "seed": seed,
                               "logEvery": H})
    config["algorithm"] = {"name": "diloco", "syncEvery": H}
    if mode == "adaptive":
        config["algorithm"]["adaptiveSteps"] = {}
    config["checkpoint"]["path"] = ckpt_path
    faults: dict[str, Any] = {"stepDelayS": BASE_STEP_S}
    if mode in ("fixed", "adaptive"):
        faults.update({"slowStepDelayS": SLOW_EXTRA_S, "ranks": [SLOW_RANK]})
    config["faultInjection"] = faults
    return config, 3 if mode == "evict" else 4


def time_to(evals: list[list[float]], target: float) -> float | None:
    """Seconds (``wallS``) of the first eval at or below ``target``; None when never reached."""
    return next((wall for _step, loss, wall in evals if loss <= target), None)


def loss_at(evals: list[list[float]], wall_s: float) -> float:
    """The latest eval loss at or before ``wall_s`` (the first eval's when none was that early)."""
    seen = [loss for _step, loss, wall in evals if wall <= wall_s]
    return seen[-1] if seen else evals[0][1]


def summarize(runs: dict[str, dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """One seed's row: per mode the time to the target, the loss at equal wall-clock and the final loss."""
    have = {m: runs.get(f"{m}/seed{seed}") for m in MODES}
    have = {m: r for m, r in have.items() if r is not None}
    if not have:
        return None
    target = max(r["final_eval"] for r in have.values())
    quickest = min(r["wall_s"] for r in have.values())
    row: dict[str, Any] = {"seed": seed, "target": target, "equal_wall_s": quickest, "modes": {}}
    for mode, r in have.items():
        row["modes"][mode] = {"time_to_target_s": time_to(r["evals"], target), "loss_at_equal_wall": loss_at(r["evals"], quickest),
                              "final_eval": r["final_eval"], "wall_s": r["wall_s"], "slowdown": r.get("slowdown")}
    return row


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Adaptive against fixed H at every seed that ran both (None when none did): the speed-up to the target, the
    final-loss gap (%) at equal steps and at equal wall-clock, and whether each part of the goal held at every seed."""
    pairs = [(r["modes"]["fixed"], r["modes"]["adaptive"]) for r in rows
             if "fixed" in r["modes"] and "adaptive" in r["modes"]]
    if not pairs:
        return None
    speedups = [f["time_to_target_s"] / a["time_to_target_s"] for f, a in pairs]
    steps_gaps = [100 * (a["final_eval"] - f["final_eval"]) / f["final_eval"] for f, a in pairs]
    wall_gaps = [100 * (a["loss_at_equal_wall"] - f["loss_at_equal_wall"]) / f["loss_at_equal_wall"] for f, a in pairs]
    return {"speedups": speedups, "steps_gaps": steps_gaps, "wall_gaps": wall_gaps,
            "speed_met": all(s >= GOAL_SPEEDUP for s in speedups),
            "steps_met": all(g <= GOAL_FINAL_PCT for g in steps_gaps),
            "wall_met": all(g <= GOAL_FINAL_PCT for g in wall_gaps)}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def render(results: dict[str, Any]) -> str:
    """The ``docs/benchmarks.md`` section."""
    meta = results.get("meta", {})
    rows = [row for seed in SEEDS if (row := summarize(results.get("runs", {}), seed)) is not None]
    lines = ["## Slow worker: fixed H, adaptive local steps, eviction (CPU)", "",
             f"Command: `python bench/bench_slow_worker.py`. Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} "
             f"cores, torch {meta.get('torch', '?')}, Python {meta.get('python', '?')}, {meta.get('date', '?')}.", "",
             f"DiLoCo, H = {H}, {meta.get('steps', STEPS)} inner steps, the convergence benchmark's tiny GPT. Every computed "
             f"step sleeps {BASE_STEP_S * 1000:.0f} ms (device time); worker {SLOW_RANK} sleeps {SLOW_EXTRA_S * 1000:.0f} ms "
             f"more (its slowdown, measured by the adaptive run, is in the table). `evict` runs three workers from the "
             f"start (the best case of evicting the slow one). Target loss: the highest final eval loss among the seed's "
             f"modes; equal wall-clock: when the seed's quickest mode finished.", "",
             "| seed | mode | wall (s) | time to target (s) | eval loss at equal wall-clock | final eval loss |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        for mode in MODES:
            m = row["modes"].get(mode)
            if m is None:
                continue
            reached = "never" if m["time_to_target_s"] is None else f"{m['time_to_target_s']:.1f}"
            slow = f" (slow worker {m['slowdown']:.2f}x)" if m.get("slowdown") else ""
            lines.append(f"| {row['seed']} | {mode}{slow} | {m['wall_s']:.1f} | {reached} | {m['loss_at_equal_wall']:.4f} | "
                         f"{m['final_eval']:.4f} |")
    v = verdict(rows)
    lines.append("")
    if v is None:
        lines.append("Goal: not measured yet (no seed has both `fixed` and `adaptive`).")
    else:
        pct = lambda gaps: ", ".join(f"{g:+.2f} %" for g in gaps)  # noqa: E731
        held = lambda gaps: sum(g <= GOAL_FINAL_PCT for g in gaps)  # noqa: E731
        lines += [
            f"Goal (issue 25 #3): adaptive at least {GOAL_SPEEDUP}x faster to the target than fixed H, with its final "
            f"loss within {GOAL_FINAL_PCT:g} %, at every seed:",
            f"- speed-up to the target: {', '.join(f'{s:.2f}x' for s in v['speedups'])} (median "
            f"{_median(v['speedups']):.2f}x): **{'met' if v['speed_met'] else 'missed'}**;",
            f"- final loss at equal wall-clock, against fixed H: {pct(v['wall_gaps'])}: "
            f"**{'met' if v['wall_met'] else 'missed'}**;",
            f"- final loss at equal steps (fixed H given its longer time): {pct(v['steps_gaps'])}: within "
            f"{GOAL_FINAL_PCT:g} % at {held(v['steps_gaps'])} of {len(v['steps_gaps'])} seeds: "
            f"**{'met' if v['steps_met'] else 'missed'}**.",
            f"- Overall, reading the loss goal at equal steps (the stricter reading): "
            f"**{'met' if v['speed_met'] and v['steps_met'] else 'missed'}**."]
    lines += ["", f"![eval loss against wall-clock time]({PLOT.relative_to(ROOT / 'docs')})"]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results.get("runs", {})
    seeds = [s for s in SEEDS if any(f"{m}/seed{s}" in runs for m in MODES)]
    if not seeds:
        return
    fig, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 3.6), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for mode in MODES:
            r = runs.get(f"{mode}/seed{seed}")
            if r is None:
                continue
            ax.plot([e[2] for e in r["evals"]], [e[1] for e in r["evals"]], label=mode)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("eval loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def with_wall(history: list[str]) -> dict[str, Any]:
    """``parse_history`` plus each eval's ``wallS`` (the final eval at the run's last step time) and the slow
    worker's slowdown and the workers' steps per round the adaptive run last planned."""
    parsed = parse_history(history)
    walls, slowdown, shares = {}, None, None
    last_wall = 0.0
    for line in history:
        rec = json.loads(line) if line.strip() else {}
        if "wallS" in rec:
            last_wall = rec["wallS"]
        if "evalLoss" in rec and not rec.get("final"):
            walls[rec["step"]] = rec["wallS"]
        if rec.get("stepSeconds") and min(rec["stepSeconds"]) > 0:
            slowdown = max(rec["stepSeconds"]) / min(rec["stepSeconds"])
        if rec.get("localSteps"):
            shares = rec["localSteps"]
    evals = [[step, loss, walls.get(step, last_wall)] for step, loss, _bytes in parsed["evals"]]
    return {"evals": evals, "final_eval": parsed["final_eval"], "wall_s": last_wall, "steps": parsed["steps"],
            "slowdown": slowdown, "local_steps": shares}


def run_one(mode: str, steps: int, seed: int, workdir: Path) -> dict[str, Any]:
    config, world = build_config(mode, steps, seed, str(workdir / f"ckpt-{mode}-{seed}"))
    cfg_path, history = workdir / f"{mode}-{seed}.json", workdir / f"{mode}-{seed}.jsonl"
    cfg_path.write_text(json.dumps(config))
    run_trainer(cfg_path, history, nproc=world, what=mode)
    return with_wall(history.read_text().splitlines())


def machine(steps: int) -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "steps": steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md or the plot")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES):
        raise SystemExit(f"--modes: unknown {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}")
    results = json.loads(args.results.read_text()) if args.results.exists() else {"runs": {}}
    if not args.render_only:
        results["meta"] = machine(args.steps)
        with tempfile.TemporaryDirectory(prefix="slow-worker-") as tmp:
            for seed in (int(s) for s in args.seeds.split(",")):
                for mode in modes:
                    started = time.time()
                    results["runs"][f"{mode}/seed{seed}"] = run_one(mode, args.steps, seed, Path(tmp))
                    r = results["runs"][f"{mode}/seed{seed}"]
                    print(f"{mode:12s} seed {seed}: final eval {r['final_eval']:.4f}, trainer {r['wall_s']:.1f} s "
                          f"({time.time() - started:.0f} s in all)", flush=True)
                    args.results.parent.mkdir(parents=True, exist_ok=True)
                    args.results.write_text(json.dumps(results, indent=1) + "\n")
    section = render(results)
    print(section)
    if not args.no_doc:
        start, end = markers(NAME)
        write_section(section, start, end)
        plot(results)


if __name__ == "__main__":
    main()
