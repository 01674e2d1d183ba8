"""Convergence benchmark: eval loss and bytes of DDP vs DiLoCo, Streaming DiLoCo, NoLoCo and CO2.

Every run goes through the trainer's real code path, ``python -m loco_trainer --config FILE
--nproc 4 --history FILE``, on the built-in GPT and the built-in corpus.

Equal tokens. Every run has the same world size (4 ranks), the same per-rank batch
(``training.batchSize`` sequences of ``training.seqLen`` tokens), the same number of inner steps and
the same lr schedule, so every algorithm consumes exactly ``steps x 4 x batchSize x seqLen`` training
tokens. DDP averages the 4 ranks' gradients every step, so its optimizer step sees the workers'
batches together (global batch 4 x batchSize); the low-communication algorithms take their inner
steps on one rank's batch each and synchronise every H steps.

Measured per run, from the history rank 0 writes (one JSON line per step): ``evalLoss`` every
``evalEvery`` steps (a multiple of H, so a DiLoCo eval sees the just-synchronised model; NoLoCo's and
Streaming DiLoCo's workers never fully agree mid-run, so theirs is the mean over the ranks' own
models, which is what ``evaluate`` reports) and after the run (every algorithm's ``finish`` leaves the
model the job saves), and ``bytesSent``, the cumulative bytes rank 0 sent through the counting comm
layer (``loco_trainer.comm.Comm``). All algorithms are symmetric, so total bytes = 4 x rank 0's.

Results accumulate in ``bench/results/bench_convergence.json`` (one entry per run, written after
each run, so an interrupted benchmark keeps what finished) and are rendered into the
``## Convergence (CPU)`` section of ``docs/benchmarks.md``, into ``docs/convergence.png`` (the curves)
and into ``docs/convergence-gap.png`` (the final gap by H and run length).

    python bench/bench_convergence.py                  # the 2-core budget protocol (~30 min)
    python bench/bench_convergence.py --full           # >= 100 outer steps at every H
    python bench/bench_convergence.py --grid           # every H at 1,000 / 5,000 / 10,000 inner steps
    python bench/bench_convergence.py --render-only    # re-render the doc and plot from the results
    python bench/bench_convergence.py --h 50 --outer-steps 40 --algorithms diloco \\
        --set algorithm.outerLr=1.0 --tag lr1.0       # a tuning run, kept apart from the main rows
    python bench/bench_convergence.py --h 100 --outer-steps 100 --algorithms ddp,streaming-diloco \\
        --seed 2 --set algorithm.overlapSteps=0 --tag sd-tau0   # the same at another seed (vs its DDP)
    python bench/bench_convergence.py --h 100 --outer-steps 100 --algorithms ddp,diloco \\
        --set training.warmupSteps=20 --tag wu20   # a protocol change: DDP runs with it too (vs that DDP)
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
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_convergence.json"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "convergence.png"
GAP_PLOT = ROOT / "docs" / "convergence-gap.png"
START, END = "<!-- bench_convergence:start -->", "<!-- bench_convergence:end -->"

WORLD = 4
LOW_COMM = ("diloco", "streaming-diloco", "noloco", "co2")
ALGORITHMS = ("ddp",) + LOW_COMM
#: Fractions of a run at which the eval-loss gap is reported (gap vs run length).
FRACTIONS = (0.25, 0.5, 1.0)

#: The tiniest GPT that still learns the corpus in a few thousand steps on 2 cores.
BASE_CONFIG: dict[str, Any] = {
    "jobName": "bench-convergence",
    "model": {"gpt": {"nLayer": 2, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
    "data": {"maxBytes": 6_000_000},
    "training": {"batchSize": 8, "seqLen": 32, "lr": 3e-3, "logEvery": 500, "evalBatches": 8, "seed": 1337},
    "algorithm": {"name": "ddp"},
    "checkpoint": {"everySteps": 0},
}

#: Outer steps per H: the 2-core budget protocol, and --full (>= 100 outer steps everywhere).
BUDGET_PLAN = {10: 100, 50: 100, 100: 50}
FULL_PLAN = {10: 100, 50: 100, 100: 100}
#: --grid: every H at each token budget it reaches in >= 50 outer steps (1,000 / 5,000 / 10,000
#: inner steps), so that the gap reads as a function of H at equal tokens and of run length at equal
#: H. The budget plans confound the two: their H = 10 run is 5x shorter than the others.
GRID_PLAN = {10: (100, 500, 1000), 50: (100, 200), 100: (50, 100)}


# ------------------------------------------------------------------------------ pure pieces


def eval_every_for(h: int, outer_steps: int) -> int:
    """Eval interval of a low-communication run: a multiple of H, about 20 evals per run."""
    return h * max(1, outer_steps // 20)


def run_plan(hs: list[int] | None = None, outer_steps: int | None = None, *, full: bool = False,
             grid: bool = False) -> list[tuple[int, int]]:
    """The (H, outer steps) pairs to run: the budget plan, ``--full``'s or ``--grid``'s, kept to the
    ``--h`` values given (an H outside the plan gets 100 outer steps), each with ``--outer-steps``
    when given."""
    base = ({h: list(outers) for h, outers in GRID_PLAN.items()} if grid
            else {h: [outer] for h, outer in (FULL_PLAN if full else BUDGET_PLAN).items()})
    if hs:
        base = {h: base.get(h, [100]) for h in hs}
    if outer_steps:
        base = {h: [outer_steps] for h in base}
    return [(h, outer) for h, outers in base.items() for outer in outers]


def warmup_for(steps: int) -> int:
    """lr warm-up: 5 % of the run (the same for every algorithm of a given length)."""
    return max(10, steps // 20)


def build_config(algorithm: str, h: int | None, steps: int, eval_every: int, ckpt_path: str,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TrainerConfig (wire dict) of one run. ``h`` is None for DDP. ``overrides`` maps
    ``section.field`` (camelCase) to a value, applied last."""
    config = json.loads(json.dumps(BASE_CONFIG))
    tr = config["training"]
    tr.update({"steps": steps, "evalEvery": eval_every, "warmupSteps": warmup_for(steps)})
    config["algorithm"] = {"name": algorithm}
    if algorithm != "ddp":
        config["algorithm"]["syncEvery"] = h
    config["checkpoint"]["path"] = ckpt_path
    for key, value in (overrides or {}).items():
        section, _, field = key.partition(".")
        if not field:
            raise ValueError(f"override {key!r} must be SECTION.FIELD=VALUE")
        config.setdefault(section, {})[field] = value
    return config


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["algorithm.outerLr=1.0", ...]`` -> ``{"algorithm.outerLr": 1.0}`` (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def parse_history(lines: Iterable[str]) -> dict[str, Any]:
    """Reduce a trainer history (JSON lines) to ``{"evals": [[step, evalLoss, bytesSent], ...],
    "final_eval", "final_bytes", "steps", "wall_s"}``; the final (post-``finish``) eval is the last
    entry of ``evals``. Raises ValueError when the history has no final record."""
    evals: list[list[float]] = []
    final: dict[str, Any] | None = None
    last_step: dict[str, Any] = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        rec = json.loads(line)
        if rec.get("final"):
            final = rec
            continue
        last_step = rec
        if "evalLoss" in rec:
            evals.append([rec["step"], rec["evalLoss"], rec.get("bytesSent", 0)])
    if final is None:
        raise ValueError("history has no final record: the run did not finish")
    final_bytes = final.get("bytesSent", last_step.get("bytesSent", 0))
    evals.append([final["step"], final["evalLoss"], final_bytes])
    return {"evals": evals, "final_eval": final["evalLoss"], "final_bytes": final_bytes,
            "steps": final["step"], "wall_s": last_step.get("wallS")}


def run_key(algorithm: str, h: int | None, steps: int, tag: str = "", seed: int | None = None) -> str:
    return (f"{algorithm}|H={h if h else '-'}|steps={steps}" + (f"|{tag}" if tag else "")
            + (f"|seed={seed}" if seed is not None else ""))


def tokens_per_step(config: dict[str, Any]) -> int:
    tr = config["training"]
    return WORLD * tr["batchSize"] * tr["seqLen"]


def eval_at(evals: list[list[float]], step: int) -> tuple[int, float] | None:
    """The eval nearest to ``step`` (step, loss), or None for no evals."""
    if not evals:
        return None
    best = min(evals, key=lambda e: abs(e[0] - step))
    return int(best[0]), float(best[1])


def gap_pct(loss: float, ddp_loss: float) -> float:
    return 100.0 * (loss - ddp_loss) / ddp_loss


def protocol_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change the training protocol (every section but ``algorithm``: the lr
    schedule, the batch, ...). A tuning run with any also runs DDP with them, under its tag, so the
    low-communication rows compare with DDP trained the same way."""
    return {k: v for k, v in overrides.items() if not k.startswith("algorithm.")}


def summarize(runs: dict[str, dict[str, Any]], tag: str = "", seed: int | None = None) -> list[dict[str, Any]]:
    """One row per low-communication run (and its DDP reference) of the given tag and seed (None: the
    main seed): final eval loss, gap vs the DDP run of the same length and seed, bytes per step and
    total, reduction vs DDP, and the gap at 25/50/100 % of the run (at the algorithm's eval nearest
    that point; DDP is evaluated at the same step). Untagged runs at other seeds: see summarize_seeds.

    A tag that changed the training protocol has its own DDP run (see :func:`protocol_overrides`):
    its rows compare with that one, and its DDP row with the untagged DDP (what the change did to
    DDP itself)."""
    rows: list[dict[str, Any]] = []
    runs = {k: r for k, r in runs.items() if r.get("seed") == seed}
    default_ddp = {r["steps"]: r for r in runs.values() if r["algorithm"] == "ddp" and not r.get("tag")}
    tagged_ddp = {r["steps"]: r for r in runs.values() if r["algorithm"] == "ddp" and tag and r.get("tag") == tag}
    low = sorted((r for r in runs.values() if r["algorithm"] != "ddp" and r.get("tag", "") == tag),
                 key=lambda r: (r["steps"], r["h"], ALGORITHMS.index(r["algorithm"])))
    seen_ddp: set[int] = set()
    for steps in sorted(set(tagged_ddp) - {r["steps"] for r in low}):  # a tagged DDP run alone
        rows.append(_row(tagged_ddp[steps], default_ddp.get(steps)))
    for r in low:
        ddp = tagged_ddp.get(r["steps"], default_ddp.get(r["steps"]))
        if ddp is not None and r["steps"] not in seen_ddp:
            seen_ddp.add(r["steps"])
            rows.append(_row(ddp, default_ddp.get(r["steps"]) if ddp.get("tag") else None))
        rows.append(_row(r, ddp))
    return rows


def _row(r: dict[str, Any], ddp: dict[str, Any] | None) -> dict[str, Any]:
    steps = r["steps"]
    row = {
        "algorithm": r["algorithm"], "h": r.get("h"), "steps": steps,
        "outer_steps": steps // r["h"] if r.get("h") else None,
        "final_eval": r["final_eval"], "bytes_per_step": r["final_bytes"] / steps,
        "total_bytes": r["final_bytes"] * WORLD, "tokens": steps * r["tokens_per_step"], "params": r.get("params"),
        "gap_pct": None, "reduction": None, "gaps": {}, "tag": r.get("tag", ""), "overrides": r.get("overrides", {}),
        "seed": r.get("seed"),
    }
    if ddp is not None:
        row["gap_pct"] = gap_pct(r["final_eval"], ddp["final_eval"])
        if r["final_bytes"] > 0:
            row["reduction"] = ddp["final_bytes"] / r["final_bytes"]
        for f in FRACTIONS:
            mine = eval_at(r["evals"], round(f * steps))
            ref = eval_at(ddp["evals"], mine[0]) if mine else None
            if mine and ref and ref[0] == mine[0]:
                row["gaps"][str(f)] = {"step": mine[0], "gap_pct": gap_pct(mine[1], ref[1])}
    return row


def summarize_seeds(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed-to-seed variation: for every (algorithm, H, steps) with runs at other seeds
    (``--seed``), the gap vs the DDP run of the same seed and length, at the default seed (the main
    table's run) and at each other seed; DDP's own final eval loss per seed."""
    default = BASE_CONFIG["training"]["seed"]
    by_key = {(r["algorithm"], r.get("h"), r["steps"], r.get("seed", default)): r
              for r in runs.values() if not r.get("tag")}
    groups = sorted({(a, h, st) for (a, h, st, seed) in by_key if seed != default},
                    key=lambda g: (g[2], g[1] or 0, ALGORITHMS.index(g[0])))
    out = []
    for algorithm, h, steps in groups:
        seeds = sorted(seed for (a, hh, st, seed) in by_key if (a, hh, st) == (algorithm, h, steps))
        per_seed = []
        for seed in seeds:
            r = by_key[(algorithm, h, steps, seed)]
            ddp = by_key.get(("ddp", None, steps, seed))
            if algorithm == "ddp":
                per_seed.append({"seed": seed, "final_eval": r["final_eval"], "gap_pct": None})
            elif ddp is not None:
                per_seed.append({"seed": seed, "final_eval": r["final_eval"], "gap_pct": gap_pct(r["final_eval"], ddp["final_eval"])})
        out.append({"algorithm": algorithm, "h": h, "steps": steps, "per_seed": per_seed})
    return out


def render_seeds(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of :func:`summarize_seeds` rows (empty when there are none)."""
    if not rows:
        return []
    lines = ["", "Seed-to-seed variation (`--seed S`: every run of the row, DDP included, with `training.seed` S; "
                 f"{BASE_CONFIG['training']['seed']} is the main table's): final eval loss, and the gap vs DDP of the same seed.", "",
             "| algorithm | H | inner steps | per seed: final eval loss (gap vs DDP) | gap mean | gap range |",
             "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        cells = ", ".join(f"{p['seed']}: {p['final_eval']:.4f}" + (f" ({p['gap_pct']:+.2f} %)" if p["gap_pct"] is not None else "")
                          for p in r["per_seed"])
        gaps = [p["gap_pct"] for p in r["per_seed"] if p["gap_pct"] is not None]
        evals = [p["final_eval"] for p in r["per_seed"]]
        if gaps:
            mean, spread = f"{sum(gaps) / len(gaps):+.2f} %", f"{max(gaps) - min(gaps):.2f} points"
        else:  # DDP: the spread of its own loss, relative
            mean, spread = "-", f"{100 * (max(evals) - min(evals)) / min(evals):.2f} % of the loss"
        lines.append(f"| {r['algorithm']} | {r['h'] or '-'} | {r['steps']:,} | {cells} | {mean} | {spread} |")
    return lines


def gap_grid(runs: dict[str, dict[str, Any]]) -> tuple[list[int], list[dict[str, Any]]]:
    """The final gap vs DDP of the untagged main-seed runs, by H and run length: ``(lengths, rows)``
    with ``lengths`` the inner-step counts that have a DDP run and a low-communication one, and one
    row per (algorithm, H), in table order, as ``{"algorithm", "h", "reduction", "cells"}``;
    ``cells`` maps a length to ``{"gap_pct", "outer_steps", "best", "seeds"}`` (``best``: the smallest
    gap of that algorithm at that length at the main seed, when more than one H ran it; ``seeds``: the
    gap at every seed, main seed included, each against DDP of its seed, when the cell also ran at other
    seeds, else empty). ``reduction`` is the byte reduction vs DDP of the row's longest run (it depends
    on H, hardly on the length)."""
    main = {k: r for k, r in runs.items() if not r.get("tag") and r.get("seed") is None}
    ddp = {r["steps"]: r for r in main.values() if r["algorithm"] == "ddp"}
    seeded: dict[tuple[str, int, int], dict[int, float]] = {}
    for s in summarize_seeds(runs):
        if s["algorithm"] != "ddp" and len(s["per_seed"]) > 1:
            seeded[(s["algorithm"], s["h"], s["steps"])] = {p["seed"]: p["gap_pct"] for p in s["per_seed"]
                                                            if p["gap_pct"] is not None}
    low = [r for r in main.values() if r["algorithm"] != "ddp" and r["steps"] in ddp]
    lengths = sorted({r["steps"] for r in low})
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in sorted(low, key=lambda r: (ALGORITHMS.index(r["algorithm"]), r["h"], r["steps"])):
        row = rows.setdefault((r["algorithm"], r["h"]), {"algorithm": r["algorithm"], "h": r["h"], "cells": {}})
        ref = ddp[r["steps"]]
        row["cells"][r["steps"]] = {"gap_pct": gap_pct(r["final_eval"], ref["final_eval"]),
                                    "outer_steps": r["steps"] // r["h"], "best": False,
                                    "seeds": seeded.get((r["algorithm"], r["h"], r["steps"]), {})}
        row["reduction"] = ref["final_bytes"] / r["final_bytes"] if r["final_bytes"] > 0 else None
    for algorithm in LOW_COMM:
        for steps in lengths:
            cells = [row["cells"][steps] for (a, _), row in rows.items() if a == algorithm and steps in row["cells"]]
            if len(cells) > 1:
                min(cells, key=lambda c: c["gap_pct"])["best"] = True
    return lengths, list(rows.values())


def render_gap_grid(lengths: list[int], rows: list[dict[str, Any]], tokens_per_step: int) -> list[str]:
    """Markdown lines of :func:`gap_grid` (empty when there is nothing to show)."""
    if not rows:
        return []
    lines = ["", "**The gap as a function of H and of run length** (the rows above; final eval loss vs DDP of the "
                 "same length, outer steps in brackets, in bold the best H of each algorithm at that length; "
                 "where a cell also ran at other seeds, the range of the gap over all its seeds, each against DDP "
                 "of its seed; `--grid` runs them all):", "",
             "| algorithm | H | byte reduction | " + " | ".join(
                 f"{steps:,} inner steps ({steps * tokens_per_step / 1e6:.1f} M tokens)" for steps in lengths) + " |",
             "|---|---:|---:|" + "---:|" * len(lengths)]
    for row in rows:
        cells = []
        for steps in lengths:
            c = row["cells"].get(steps)
            text = "-" if c is None else f"{c['gap_pct']:+.2f} % ({c['outer_steps']:,})"
            text = f"**{text}**" if c and c["best"] else text
            if c and c["seeds"]:
                gaps = c["seeds"].values()
                text += f"; {len(c['seeds'])} seeds: {min(gaps):+.2f} to {max(gaps):+.2f} %"
            cells.append(text)
        reduction = "-" if row.get("reduction") is None else f"{row['reduction']:,.0f}x"
        lines.append(f"| {row['algorithm']} | {row['h']} | {reduction} | " + " | ".join(cells) + " |")
    return lines


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def render_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines of :func:`summarize` rows."""
    lines = [
        "| algorithm | H | outer steps | inner steps | final eval loss | gap vs DDP | gap at 25 % / 50 % / 100 % of the run "
        "| bytes/step (per rank) | total bytes (4 ranks) | byte reduction |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        gaps = " / ".join(
            f"{r['gaps'][str(f)]['gap_pct']:+.1f} %" if str(f) in r["gaps"] else "-" for f in FRACTIONS
        ) if r["gap_pct"] is not None else "-"
        gap = "-" if r["gap_pct"] is None else f"{r['gap_pct']:+.2f} %"
        reduction = "-" if r["reduction"] is None else f"{r['reduction']:,.0f}x"
        outer = f"{r['outer_steps']:,}" if r["outer_steps"] else "-"
        lines.append(
            f"| {r['algorithm']} | {r['h'] or '-'} | {outer} | {r['steps']:,} | {r['final_eval']:.4f} | "
            f"{gap} | {gaps} | {fmt_bytes(r['bytes_per_step'])} | {fmt_bytes(r['total_bytes'])} | {reduction} |"
        )
    return lines


def machine_line(what: str, meta: dict[str, Any], how: str) -> str:
    """Where and how a set of runs was made: the machine of the newest invocation and its command."""
    return (f"{what}: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, torch {meta.get('torch', '?')} "
            f"({meta.get('date', '?')}); last command `{meta.get('command', '?')}` ({how}).")


def render(results: dict[str, Any]) -> str:
    """The ``## Convergence (CPU)`` section of docs/benchmarks.md."""
    runs = results.get("runs", {})
    lines = [START, "## Convergence (CPU) (`bench/bench_convergence.py`)", ""]
    if not runs:
        return "\n".join(lines + ["No results yet: run `python bench/bench_convergence.py`.", "", END])
    meta = results.get("meta", {})
    cfg = BASE_CONFIG
    g, tr = cfg["model"]["gpt"], cfg["training"]
    any_run = next(iter(runs.values()))
    lines += [
        f"Built-in GPT (nLayer {g['nLayer']}, nHead {g['nHead']}, nEmbd {g['nEmbd']}, {any_run.get('params', 0):,} non-embedding parameters) on "
        f"the built-in byte-level corpus (first {cfg['data']['maxBytes'] / 1e6:.0f} MB of the standard library), "
        f"{WORLD} ranks, `python -m loco_trainer --nproc {WORLD}` (the real loop, gloo, one thread per rank). "
        f"**Equal tokens**: every run has {WORLD} ranks x batchSize {tr['batchSize']} x seqLen {tr['seqLen']} = "
        f"{WORLD * tr['batchSize'] * tr['seqLen']:,} tokens per inner step and the same steps, lr {tr['lr']} peak, cosine "
        f"schedule with 5 % warm-up; DDP's step averages the 4 ranks' gradients (its batch is the workers' batches "
        f"together). Eval loss: {tr['evalBatches']} held-out batches per rank, the same batches in every run, averaged "
        f"over ranks; mid-run evals fall on multiples of H; the final one follows the algorithm's `finish`. Bytes: what "
        f"rank 0 sent through the counting comm layer (all algorithms are symmetric, total = 4x). Algorithm "
        f"parameters are the defaults of `ALGORITHM_DEFAULTS` except H.",
        "",
    ]
    lines += render_table(summarize(runs))
    lines += render_gap_grid(*gap_grid(runs), tokens_per_step=any_run["tokens_per_step"])
    seed_rows = summarize_seeds(runs)
    lines += render_seeds(seed_rows)
    if seed_rows and results.get("meta_seeds"):
        lines += ["", machine_line("Seed runs", results["meta_seeds"], "one invocation per H and seed")]
    tags = sorted({r.get("tag", "") for r in runs.values()} - {""})
    if tags:
        lines += ["", "Tuning runs (the same protocol with the parameters shown changed; `--set ... --tag`), "
                      "against the DDP run of the same length (and seed) above. A change to the training protocol "
                      "(a `training.*` field) also ran DDP with it: that tag's rows compare with that DDP run, and "
                      "the DDP row with the default DDP run.", "",
                  "| tag | algorithm | H | inner steps | changed | final eval loss | gap vs DDP | gap at 25 % / 50 % / 100 % |",
                  "|---|---|---:|---:|---|---:|---:|---|"]
        seeds = sorted({r.get("seed") for r in runs.values() if r.get("tag")}, key=lambda s: (s is not None, s or 0))
        tuned = [r for tag in tags for seed in seeds for r in summarize(runs, tag, seed)
                 if r["algorithm"] != "ddp" or r["tag"]]
        for r in sorted(tuned, key=lambda r: (ALGORITHMS.index(r["algorithm"]), r["h"] or 0, r["tag"], r["steps"], r["seed"] or 0)):
            changed = ", ".join([f"`{k.split('.', 1)[-1]}={v}`" for k, v in r["overrides"].items()]
                                + ([f"seed {r['seed']}"] if r["seed"] is not None else []))
            gaps = " / ".join(f"{r['gaps'][str(f)]['gap_pct']:+.1f} %" if str(f) in r["gaps"] else "-" for f in FRACTIONS)
            gap = "-" if r["gap_pct"] is None else f"{r['gap_pct']:+.2f} %"
            lines.append(f"| `{r['tag']}` | {r['algorithm']} | {r['h'] or '-'} | {r['steps']:,} | {changed} | {r['final_eval']:.4f} | {gap} | {gaps} |")
        if results.get("meta_tuning"):
            lines += ["", machine_line("Tuning runs", results["meta_tuning"], "one invocation per tag, H and seed; the "
                                       "reading notes below date each set")]
    notes = results.get("notes")
    if notes:
        lines += ["", notes.strip()]
    lines += ["", "![eval loss vs tokens](convergence.png)", "", "![gap vs DDP by H and run length](convergence-gap.png)", ""]
    if meta:
        lines += [f"Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, torch {meta.get('torch', '?')}, "
                  f"Python {meta.get('python', '?')} ({meta.get('date', '?')}; 1-minute load {meta.get('load_1min', '?')} "
                  f"at the start, other work shared the machine). Command: `{meta.get('command', '?')}`; "
                  f"wall time {meta.get('wall_s', 0) / 60:.0f} min.", ""]
    lines.append(END)
    return "\n".join(lines)


def write_doc(section: str, doc: Path = DOC) -> None:
    """Replace the section between the markers (or append it)."""
    from benchdoc import write_section  # bench/ is on sys.path when run as a script

    write_section(section, START, END, doc)


def plot_panels(results: dict[str, Any]) -> list[tuple[int, int, list[dict[str, Any]]]]:
    """The plot's panels: one per H and run length of the untagged main-seed runs, as (H, inner
    steps, runs), the DDP run of that length first and then the algorithms in table order. Runs of
    one H but different lengths go to separate panels (in one, their lines would be alike)."""
    runs = [r for r in results.get("runs", {}).values() if not r.get("tag") and r.get("seed") is None]
    ddp = {r["steps"]: r for r in runs if r["algorithm"] == "ddp"}
    panels = []
    for h, steps in sorted({(r["h"], r["steps"]) for r in runs if r["algorithm"] != "ddp"}):
        mine = sorted((r for r in runs if r["algorithm"] != "ddp" and (r["h"], r["steps"]) == (h, steps)),
                      key=lambda r: ALGORITHMS.index(r["algorithm"]))
        panels.append((h, steps, ([ddp[steps]] if steps in ddp else []) + mine))
    return panels


def panel_layout(panels: list[tuple[int, int, list[dict[str, Any]]]]) -> tuple[int, int, list[tuple[int, int]]]:
    """Where :func:`plot_panels`' panels go: ``(nrows, ncols, [(row, col) per panel])``, a row per
    run length and a column per H, so that a column reads run length at one H and a row H at equal
    tokens; cells no run fills stay empty."""
    lengths = sorted({steps for _, steps, _ in panels})
    hs = sorted({h for h, _, _ in panels})
    return len(lengths), len(hs), [(lengths.index(steps), hs.index(h)) for h, steps, _ in panels]


STYLES = {"ddp": ("black", "-"), "diloco": ("tab:blue", "-"), "streaming-diloco": ("tab:orange", "--"),
          "noloco": ("tab:green", "-."), "co2": ("tab:red", ":")}


def plot(results: dict[str, Any], path: Path = PLOT) -> None:
    """Eval loss vs training tokens, one panel per H and run length (:func:`plot_panels`), laid out by
    :func:`panel_layout`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(results)
    if not panels:
        return
    nrows, ncols, cells = panel_layout(panels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.9 * nrows), squeeze=False)
    used = set(cells)
    for (h, steps, runs), (i, j) in zip(panels, cells):
        ax = axes[i][j]
        for r in runs:
            color, ls = STYLES.get(r["algorithm"], ("gray", "-"))
            xs = [e[0] * r["tokens_per_step"] / 1e6 for e in r["evals"]]
            label = r["algorithm"] + ("" if r["algorithm"] == "ddp" else f" ({fmt_bytes(r['final_bytes'] * WORLD)})")
            ax.plot(xs, [e[1] for e in r["evals"]], color=color, ls=ls, label=label, lw=1.6)
        ax.set_title(f"H = {h}: {steps // h} outer steps ({steps:,} inner)")
        ax.set_xlabel("training tokens (M, all ranks)")
        ax.set_ylabel("eval loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="algorithm (total bytes)", title_fontsize=8)
        finals = [e[1] for r in runs for e in r["evals"][len(r["evals"]) // 4:]]
        if finals:
            ax.set_ylim(min(finals) - 0.1, max(finals) + 0.4)
    for i in range(nrows):
        for j in range(ncols):
            if (i, j) not in used:
                axes[i][j].set_visible(False)
    fig.suptitle(f"Eval loss vs training tokens ({WORLD} ranks, equal tokens; a row per run length, a column per H)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gaps(results: dict[str, Any], path: Path = GAP_PLOT, goal_pct: float = 3.0) -> None:
    """The final gap vs DDP against run length, one panel per algorithm and one line per H
    (:func:`gap_grid`; the line at the main seed, a bar over the range of the seeds where a cell ran
    at several), with the goal as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, rows = gap_grid(results.get("runs", {}))
    algorithms = [a for a in LOW_COMM if any(r["algorithm"] == a for r in rows)]
    if not algorithms:
        return
    hs = sorted({r["h"] for r in rows})
    colors = dict(zip(hs, ("tab:purple", "tab:cyan", "tab:olive", "tab:brown", "tab:pink")))
    ncols = min(2, len(algorithms))
    nrows = -(-len(algorithms) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.6 * nrows), squeeze=False, sharex=True)
    for ax, algorithm in zip(axes.flat, algorithms):
        for r in (r for r in rows if r["algorithm"] == algorithm):
            steps = sorted(r["cells"])
            reduction = f", {r['reduction']:,.0f}x fewer bytes" if r.get("reduction") else ""
            color = colors.get(r["h"], "gray")
            ax.plot(steps, [r["cells"][s]["gap_pct"] for s in steps], marker="o", color=color,
                    label=f"H = {r['h']}{reduction}")
            for s in steps:  # the range over seeds, where the cell ran at several
                if r["cells"][s]["seeds"]:
                    gaps = r["cells"][s]["seeds"].values()
                    ax.vlines(s * (1 + 0.03 * (hs.index(r["h"]) - 1)), min(gaps), max(gaps), color=color, lw=3, alpha=0.35)
        ax.axhline(goal_pct, color="gray", ls="--", lw=1, label=f"goal: {goal_pct:g} %")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xscale("log")
        ax.set_xticks(lengths, [f"{s:,}" for s in lengths])
        ax.minorticks_off()
        ax.set_title(algorithm)
        ax.set_xlabel("run length (inner steps, equal tokens)")
        ax.set_ylabel("final eval loss gap vs DDP (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(algorithms):]:
        ax.set_visible(False)
    fig.suptitle(f"Gap to DDP by H and run length ({WORLD} ranks, equal tokens; bars: the range over seeds, where a point "
                 "ran at several)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ running


def machine() -> dict[str, Any]:
    import torch

    from benchdoc import cpu_model  # bench/ is on sys.path when run as a script

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_1min": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d")}


def num_params(config: dict[str, Any]) -> int:
    import torch

    from loco_contract.config import GPTSpec
    from loco_trainer.model import GPT

    with torch.device("meta"):
        return GPT(GPTSpec.model_validate(config["model"]["gpt"])).num_params()


def run_one(config: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """Run the trainer on ``config`` with 4 local ranks; return the parsed history."""
    from benchdoc import run_trainer  # bench/ is on sys.path when run as a script

    cfg_path, history = workdir / f"{name}.json", workdir / f"{name}.jsonl"
    cfg_path.write_text(json.dumps(config))
    run_trainer(cfg_path, history, nproc=WORLD, what=name)
    return parse_history(history.read_text().splitlines())


def save(results: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    plans = parser.add_mutually_exclusive_group()
    plans.add_argument("--full", action="store_true", help="100 outer steps at every H (needs a bigger machine)")
    plans.add_argument("--grid", action="store_true",
                        help="every H at every token budget of GRID_PLAN (1,000 / 5,000 / 10,000 inner steps; ~75 min on 2 cores)")
    parser.add_argument("--h", type=int, action="append", help="only this H (repeatable; default: 10, 50, 100)")
    parser.add_argument("--outer-steps", type=int, default=None, help="outer steps per run (default: the plan's)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated (default: all, ddp first)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override for the low-communication runs (tuning; use with --tag); one outside "
                             "`algorithm` (training.warmupSteps, ...) applies to DDP too, which must then be in --algorithms")
    parser.add_argument("--tag", default="", help="label kept with the runs (tuning runs are listed apart)")
    parser.add_argument("--seed", type=int, default=None,
                        help="training.seed for every run, DDP included (seed-to-seed variation, listed apart; "
                             "with --tag, a tuning run at that seed, compared with DDP of the same seed)")
    parser.add_argument("--render-only", action="store_true", help="only re-render docs from the results file")
    parser.add_argument("--force", action="store_true", help="re-run runs already in the results file")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md or the plots (docs/convergence*.png)")
    args = parser.parse_args(argv)
    if args.overrides and not args.tag:
        parser.error("--set makes a tuning run: name it with --tag (tuning runs are listed apart from the main rows)")
    if args.seed == BASE_CONFIG["training"]["seed"]:
        parser.error(f"--seed {args.seed} is the main table's seed: pick another")

    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    results.setdefault("runs", {})
    if not args.render_only:
        plan = run_plan(args.h, args.outer_steps, full=args.full, grid=args.grid)
        from benchdoc import parse_algorithms  # bench/ is on sys.path when run as a script

        algorithms = parse_algorithms(args.algorithms, ALGORITHMS)
        overrides = parse_overrides(args.overrides)
        started = time.perf_counter()
        # tuning and seed runs keep the main protocol's machine line
        meta_key = "meta_tuning" if args.tag else "meta_seeds" if args.seed is not None else "meta"
        protocol = protocol_overrides(overrides)
        ddp_tag = args.tag if protocol else ""
        if args.tag and (args.seed is not None or protocol) and "ddp" not in algorithms:
            missing = [h * outer for h, outer in plan
                       if run_key("ddp", None, h * outer, ddp_tag, args.seed) not in results["runs"]]
            if missing:
                what = (f"with {', '.join(sorted(protocol))} (a change to the training protocol: DDP needs it too)"
                        if protocol else f"at seed {args.seed}")
                parser.error(f"no DDP run {what} for {missing} steps to compare with: add ddp to --algorithms")
        results[meta_key] = {**machine(), "command": "python bench/bench_convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        with tempfile.TemporaryDirectory(prefix="bench-convergence-") as tmp:
            work = Path(tmp)
            for h, outer in plan:
                steps = h * outer
                for algorithm in algorithms:
                    is_ddp = algorithm == "ddp"
                    tag = ddp_tag if is_ddp else args.tag
                    run_overrides = protocol if is_ddp else overrides
                    key = run_key(algorithm, None if is_ddp else h, steps, tag, args.seed)
                    if key in results["runs"] and not args.force:
                        print(f"{key}: have it", flush=True)
                        continue
                    # DDP is evaluated every 50 steps so it has a point at every other run's eval step
                    eval_every = 50 if is_ddp else eval_every_for(h, outer)
                    config = build_config(algorithm, None if is_ddp else h, steps, eval_every,
                                          str(work / "ckpt" / key.replace("|", "_")), run_overrides)
                    if args.seed is not None:
                        config["training"]["seed"] = args.seed
                    t0 = time.perf_counter()
                    parsed = run_one(config, work, key.replace("|", "_").replace("=", ""))
                    results["runs"][key] = {"algorithm": algorithm, "h": None if is_ddp else h, "tag": tag,
                                            **({"seed": args.seed} if args.seed is not None else {}),
                                            "overrides": run_overrides, "params": num_params(config),
                                            "tokens_per_step": tokens_per_step(config), **parsed}
                    save(results, args.results)
                    print(f"{key}: eval {parsed['final_eval']:.4f}, {parsed['final_bytes'] / 1e6:.2f} MB sent by rank 0, "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)
        results[meta_key]["wall_s"] = time.perf_counter() - started
        save(results, args.results)
    if args.no_doc:
        print(render(results))
        return
    write_doc(render(results))
    plot(results)
    plot_gaps(results)
    print(f"updated {DOC.relative_to(ROOT)}, {PLOT.relative_to(ROOT)} and {GAP_PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
