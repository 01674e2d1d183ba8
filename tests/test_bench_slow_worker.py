"""The slow-worker benchmark: its configs, its measures and its doc section; and its short mode, run for real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_slow_worker as bs  # noqa: E402
from loco_contract.config import TrainerConfig  # noqa: E402


def test_each_mode_is_a_valid_trainer_config_with_the_slow_worker_where_it_belongs() -> None:
    for mode in bs.MODES:
        config, world = bs.build_config(mode, 300, 1, "/tmp/x")
        parsed = TrainerConfig.model_validate(config)
        assert parsed.algorithm.sync_every == bs.H and parsed.training.seed == 1
        assert (parsed.algorithm.adaptive_steps is not None) is (mode == "adaptive")
        assert parsed.fault_injection.step_delay_s == bs.BASE_STEP_S
        slow = mode in ("fixed", "adaptive")
        assert parsed.fault_injection.slow_step_delay_s == (bs.SLOW_EXTRA_S if slow else 0.0)
        assert world == (3 if mode == "evict" else 4)
    with pytest.raises(ValueError, match="unknown mode 'x'"):
        bs.build_config("x", 300, 1, "/tmp/x")


def _run(curve: list[tuple[float, float]], wall: float) -> dict:
    evals = [[100 * (i + 1), loss, t] for i, (t, loss) in enumerate(curve)]
    return {"evals": evals, "final_eval": curve[-1][1], "wall_s": wall, "slowdown": None}


def test_time_to_target_loss_at_equal_wall_clock_and_the_goal() -> None:
    runs = {
        "fixed/seed1": _run([(10, 3.0), (20, 2.6), (30, 2.5)], 30),
        "adaptive/seed1": _run([(5, 3.0), (10, 2.6), (15, 2.52)], 15),
        "evict/seed1": _run([(5, 3.1), (10, 2.8), (14, 2.7)], 14),
    }
    row = bs.summarize(runs, 1)
    assert row["target"] == 2.7 and row["equal_wall_s"] == 14
    assert row["modes"]["fixed"]["time_to_target_s"] == 20  # the first eval at or below the target
    assert row["modes"]["adaptive"]["time_to_target_s"] == 10
    assert row["modes"]["fixed"]["loss_at_equal_wall"] == 3.0 and row["modes"]["adaptive"]["loss_at_equal_wall"] == 2.6
    v = bs.verdict([row])
    assert v["speedups"] == [2.0] and v["steps_gaps"] == [pytest.approx(0.8)]
    assert v["wall_gaps"] == [pytest.approx(100 * (2.6 - 3.0) / 3.0)]
    assert v["speed_met"] and v["steps_met"] and v["wall_met"]
    slower = {**runs, "adaptive/seed1": _run([(5, 3.0), (10, 2.8), (15, 2.7)], 15)}
    assert not bs.verdict([bs.summarize(slower, 1)])["steps_met"]  # 8 % worse at the end: missed
    doc = bs.render({"runs": runs, "meta": {"cpu": "CPU", "cores": 2, "steps": 300}})
    assert "| 1 | adaptive | 15.0 | 10.0 | 2.6000 | 2.5200 |" in doc
    assert "- speed-up to the target: 2.00x (median 2.00x): **met**;" in doc
    assert "- final loss at equal steps (fixed H given its longer time): +0.80 %: within 1 % at 1 of 1 seeds: **met**." in doc
    assert "the stricter reading): **met**." in doc
    assert "Goal: not measured yet" in bs.render({"runs": {"evict/seed1": runs["evict/seed1"]}})


@pytest.mark.multiproc
def test_the_short_mode_runs_and_the_slow_worker_gets_fewer_steps(tmp_path) -> None:
    results = tmp_path / "r.json"
    bs.main(["--steps", "200", "--seeds", "1337", "--modes", "adaptive", "--results", str(results), "--no-doc"])
    run = json.loads(results.read_text())["runs"]["adaptive/seed1337"]
    assert run["steps"] == 200 and run["evals"][-1][0] == 200
    shares = run["local_steps"]
    assert shares[:3] == [bs.H] * 3 and shares[3] < bs.H, shares  # worker 3 is the slow one
    assert run["slowdown"] > 1.1
