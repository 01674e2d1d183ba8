"""The population benchmark: the member jobs it runs are the operator's, its measures, and its short mode run for real
(a Population of 4 over 2 rounds, the baseline, and the split-run check)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_population as bp  # noqa: E402
from loco_contract.config import TrainerConfig  # noqa: E402
from loco_operator.population.reconcile import plan_population  # noqa: E402


def test_member_jobs_run_with_the_operators_config_and_init_from() -> None:
    body = bp.population_body(1, 400, 100, "/tmp/ckpt")
    first = plan_population(body, [])
    config, init_from = bp.trainer_run(first.create[2])
    parsed = TrainerConfig.model_validate(config)
    assert init_from is None and parsed.job_name == "pbt1-m2-g0" and parsed.training.steps == 100
    assert parsed.training.schedule_steps == 400 and parsed.training.seed == 1001
    assert parsed.training.lr == first.status["members"][2]["hyperparameters"]["training.lr"]
    jobs = [{**j, "status": {"phase": "Succeeded", "evalLoss": float(i)}} for i, j in enumerate(first.create)]
    nxt = plan_population({**body, "status": first.status}, jobs)
    copied = next(j for j in nxt.create if j["metadata"]["name"] == "pbt1-m3-g1")  # the worst copies the best (m0)
    _, init_from = bp.trainer_run(copied)
    assert init_from == "/tmp/ckpt/bench/pbt1-m0-g0/step-00000100"
    base = bp.baseline_job(body, 2, first.status["members"][2]["hyperparameters"])
    config, init_from = bp.trainer_run(base)
    assert init_from is None and config["training"]["steps"] == 400
    assert config["training"]["lr"] == first.status["members"][2]["hyperparameters"]["training.lr"]


def test_the_goal_is_the_best_member_below_the_baseline_median() -> None:
    pbt = {"best": 2.0, "exploits": 3, "never_exploited": [None, 0.1, -0.3, None]}
    row = bp.summarize(pbt, [2.5, 2.1, 1.9, 3.0])
    assert row["beats_median"] and row["baseline_median"] == 2.3 and row["baseline_best"] == 1.9
    assert round(row["vs_best_pct"], 2) == 5.26 and row["split_gap_pct"] == 0.3
    assert not bp.summarize({**pbt, "best": 2.4}, [2.5, 2.1, 1.9, 3.0])["beats_median"]
    text = bp.render({"meta": {}, "rows": {"0": row, "1": bp.summarize({**pbt, "best": 2.4}, [2.5, 2.1, 1.9, 3.0])}})
    assert "missed** (1 of 2 seeds)" in text


def test_the_short_mode_runs_for_real(tmp_path: Path) -> None:
    results = tmp_path / "r.json"
    bp.main(["--steps", "40", "--every", "20", "--seeds", "3", "--no-doc", "--results", str(results)])
    run = json.loads(results.read_text())["runs"]["seed3"]
    assert len(run["baseline"]) == 4 and len(run["final"]) == 4 and run["exploits"] == 1
    # a member that was never exploited trained the same as its configuration in one job: the split is exact
    kept = [gap for gap in run["never_exploited"] if gap is not None]
    assert len(kept) == 3 and max(abs(g) for g in kept) < 1e-6, run
    assert run["best"] == min(run["final"])
