"""The convergence benchmark's pure pieces (config, history parsing, gaps, table, doc section), without a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_convergence as bc  # noqa: E402
from loco_contract.config import TrainerConfig  # noqa: E402


def _history(evals: list[tuple[int, float]], final: float, bytes_per_step: int, steps: int) -> list[str]:
    lines = []
    at = dict(evals)
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": 3.0, "lr": 1e-3, "wallS": s * 0.01, "bytesSent": s * bytes_per_step}
        if s in at:
            rec["evalLoss"] = at[s]
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"step": steps, "evalLoss": final, "final": True, "bytesSent": steps * bytes_per_step + 7}))
    return lines


def _run(algorithm: str, h: int | None, steps: int, evals, final: float, bps: int, tag: str = "") -> dict:
    parsed = bc.parse_history(_history(evals, final, bps, steps))
    return {"algorithm": algorithm, "h": h, "tag": tag, "overrides": {}, "params": 1000, "tokens_per_step": 1024, **parsed}


def test_build_config_is_a_valid_trainer_config_with_equal_tokens() -> None:
    ddp = bc.build_config("ddp", None, 1000, 50, "/tmp/ck")
    dil = bc.build_config("diloco", 10, 1000, 50, "/tmp/ck", {"algorithm.outerLr": 0.5})
    for cfg in (ddp, dil):
        TrainerConfig.model_validate(cfg)  # the trainer accepts it
    assert "syncEvery" not in ddp["algorithm"]
    assert dil["algorithm"] == {"name": "diloco", "syncEvery": 10, "outerLr": 0.5}
    assert bc.tokens_per_step(ddp) == bc.tokens_per_step(dil) == 4 * 8 * 32
    assert ddp["training"] == dil["training"]  # same steps, batch, schedule: equal tokens
    with pytest.raises(ValueError, match="SECTION.FIELD"):
        bc.build_config("diloco", 10, 100, 10, "/tmp/ck", {"outerLr": 1})


def test_eval_points_fall_on_outer_steps() -> None:
    for plan in (bc.run_plan(), bc.run_plan(full=True), bc.run_plan(grid=True)):
        for h, outer in plan:
            every = bc.eval_every_for(h, outer)
            # on an outer step, and DDP (evaluated every 50 steps) has the same point
            assert every % h == 0 and every % 50 == 0 and (h * outer) // every >= 10
    assert bc.parse_overrides(["algorithm.outerLr=0.5", "algorithm.nesterov=false", "x.y=abc"]) == {
        "algorithm.outerLr": 0.5, "algorithm.nesterov": False, "x.y": "abc"}
    with pytest.raises(ValueError, match="SECTION.FIELD=VALUE"):
        bc.parse_overrides(["algorithm.outerLr"])


def test_parse_history_keeps_evals_bytes_and_the_final_record() -> None:
    parsed = bc.parse_history(_history([(50, 3.0), (100, 2.5)], 2.4, 10, 100))
    assert parsed["evals"] == [[50, 3.0, 500], [100, 2.5, 1000], [100, 2.4, 1007]]
    assert (parsed["final_eval"], parsed["final_bytes"], parsed["steps"]) == (2.4, 1007, 100)
    with pytest.raises(ValueError, match="did not finish"):
        bc.parse_history(_history([(50, 3.0)], 2.4, 10, 100)[:-1])


def test_summary_gaps_and_byte_reduction_against_ddp_of_the_same_length() -> None:
    runs = {
        "ddp": _run("ddp", None, 200, [(50, 3.0), (100, 2.5), (150, 2.2)], 2.0, 1000),
        "diloco": _run("diloco", 10, 200, [(50, 3.3), (100, 2.6), (150, 2.3)], 2.1, 20),
        "ddp-other-length": _run("ddp", None, 400, [], 1.0, 1000),
        "tuned": _run("diloco", 10, 200, [(50, 3.0)], 2.02, 20, tag="t"),
    }
    rows = bc.summarize(runs)
    assert [r["algorithm"] for r in rows] == ["ddp", "diloco"]
    d = rows[1]
    assert d["gap_pct"] == pytest.approx(5.0)
    assert d["reduction"] == pytest.approx((200 * 1000 + 7) / (200 * 20 + 7))
    assert d["gaps"]["0.25"] == {"step": 50, "gap_pct": pytest.approx(10.0)}
    assert d["gaps"]["0.5"]["gap_pct"] == pytest.approx(4.0)
    assert d["total_bytes"] == 4 * (200 * 20 + 7) and d["outer_steps"] == 20
    assert [r["gap_pct"] for r in bc.summarize(runs, "t")][1] == pytest.approx(1.0)
    table = "\n".join(bc.render_table(rows))
    assert "| diloco | 10 | 20 | 200 | 2.1000 | +5.00 % | +10.0 % / +4.0 % / +5.0 % |" in table


def test_the_plot_has_one_panel_per_h_and_run_length_each_with_its_own_ddp(tmp_path) -> None:
    """Two run lengths at one H used to share a panel, their lines alike and the legend doubled."""
    runs = {
        "ddp-5k": _run("ddp", None, 500, [(250, 2.0)], 1.8, 1000),
        "ddp-10k": _run("ddp", None, 1000, [(500, 1.9)], 1.6, 1000),
        "co2-100-5k": _run("co2", 100, 500, [(250, 2.3)], 2.0, 20),
        "diloco-100-5k": _run("diloco", 100, 500, [(250, 2.1)], 1.9, 20),
        "diloco-100-10k": _run("diloco", 100, 1000, [(500, 2.0)], 1.7, 20),
        "diloco-10-5k": _run("diloco", 10, 500, [(250, 2.2)], 1.9, 200),
        "tuned": _run("diloco", 100, 1000, [(500, 2.0)], 1.65, 20, tag="t"),
        "seed": {**_run("diloco", 100, 1000, [(500, 2.0)], 1.66, 20), "seed": 2},
    }
    panels = bc.plot_panels({"runs": runs})
    assert [(h, steps) for h, steps, _ in panels] == [(10, 500), (100, 500), (100, 1000)]
    # a row per run length, a column per H: (100, 1000) sits under (100, 500), beside an empty cell
    assert bc.panel_layout(panels) == (2, 2, [(0, 0), (0, 1), (1, 1)])
    lines = {(h, steps): [(r["algorithm"], r["steps"], r["final_eval"]) for r in rs] for h, steps, rs in panels}
    assert lines[(100, 500)] == [("ddp", 500, 1.8), ("diloco", 500, 1.9), ("co2", 500, 2.0)]
    assert lines[(100, 1000)] == [("ddp", 1000, 1.6), ("diloco", 1000, 1.7)]  # no tagged or other-seed run
    assert lines[(10, 500)] == [("ddp", 500, 1.8), ("diloco", 500, 1.9)]
    png = tmp_path / "convergence.png"
    bc.plot({"runs": runs}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_plans() -> None:
    assert bc.run_plan() == [(10, 100), (50, 100), (100, 50)]
    assert bc.run_plan(full=True) == [(10, 100), (50, 100), (100, 100)]
    grid = bc.run_plan(grid=True)
    assert grid == [(10, 100), (10, 500), (10, 1000), (50, 100), (50, 200), (100, 50), (100, 100)]
    # every H at each budget it reaches in >= 50 outer steps, and every budget shared by two H or more
    budgets = {h * outer for h, outer in grid}
    assert budgets == {1000, 5000, 10000} and all(outer >= 50 for _, outer in grid)
    assert all(sum(h * outer == b for h, outer in grid) >= 2 for b in budgets - {1000})
    assert bc.run_plan([100], grid=True) == [(100, 50), (100, 100)]
    assert bc.run_plan([100, 25]) == [(100, 50), (25, 100)]  # an H outside the plan: 100 outer steps
    assert bc.run_plan([10, 50], 200, grid=True) == [(10, 200), (50, 200)]
    with pytest.raises(SystemExit):  # one plan at a time
        bc.main(["--full", "--grid", "--no-doc"])


def test_the_gap_grid_reads_h_at_equal_tokens_and_run_length_at_equal_h(tmp_path) -> None:
    """One row per (algorithm, H), one column per run length that has a DDP run; the best H of an
    algorithm at a length is marked; tagged, other-seed and DDP-less runs stay out."""
    runs = {
        "ddp-1k": _run("ddp", None, 1000, [], 2.0, 1000),
        "ddp-5k": _run("ddp", None, 5000, [], 1.6, 1000),
        "diloco-10-1k": _run("diloco", 10, 1000, [], 2.1, 100),
        "diloco-10-5k": _run("diloco", 10, 5000, [], 1.64, 100),
        "diloco-50-5k": _run("diloco", 50, 5000, [], 1.62, 20),
        "streaming-10-5k": _run("streaming-diloco", 10, 5000, [], 1.68, 25),
        "diloco-50-20k": _run("diloco", 50, 20000, [], 1.0, 20),  # no DDP of that length
        "tuned": _run("diloco", 50, 5000, [], 1.5, 20, tag="t"),
        "seed": {**_run("diloco", 50, 5000, [], 1.5, 20), "seed": 2},
        "ddp-seed": {**_run("ddp", None, 5000, [], 1.4, 1000), "seed": 2},
        "seed-10-1k": {**_run("diloco", 10, 1000, [], 1.5, 100), "seed": 2},  # no DDP at seed 2, 1k: no range
    }
    lengths, rows = bc.gap_grid(runs)
    assert lengths == [1000, 5000]
    by = {(r["algorithm"], r["h"]): r for r in rows}
    assert list(by) == [("diloco", 10), ("diloco", 50), ("streaming-diloco", 10)]
    assert by[("diloco", 10)]["cells"][1000] == {"gap_pct": pytest.approx(5.0), "outer_steps": 100, "best": False,
                                                 "seeds": {}}
    assert by[("diloco", 10)]["cells"][5000]["gap_pct"] == pytest.approx(2.5)
    # seed 2 against DDP of seed 2 (1.5 vs 1.4), the main seed against the main DDP
    seeds = {2: pytest.approx(100 * 0.1 / 1.4), bc.BASE_CONFIG["training"]["seed"]: pytest.approx(1.25)}
    assert by[("diloco", 50)]["cells"] == {5000: {"gap_pct": pytest.approx(1.25), "outer_steps": 100, "best": True,
                                                  "seeds": seeds}}
    assert not by[("streaming-diloco", 10)]["cells"][5000]["best"]  # the only H of its algorithm there
    assert by[("diloco", 50)]["reduction"] == pytest.approx((5000 * 1000 + 7) / (5000 * 20 + 7))
    table = "\n".join(bc.render_gap_grid(lengths, rows, tokens_per_step=1024))
    assert "| algorithm | H | byte reduction | 1,000 inner steps (1.0 M tokens) | 5,000 inner steps (5.1 M tokens) |" in table
    assert "| diloco | 10 | 10x | +5.00 % (100) | +2.50 % (500) |" in table
    assert "| diloco | 50 | 50x | - | **+1.25 % (100)**; 2 seeds: +1.25 to +7.14 % |" in table
    assert bc.render_gap_grid([], [], 1024) == []
    png = tmp_path / "gap.png"
    bc.plot_gaps({"runs": runs}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_runs_are_compared_with_ddp_of_their_own_seed_and_kept_out_of_the_main_rows() -> None:
    """--seed S runs (DDP included) form the seed-variation table: each algorithm's gap is taken
    against DDP of the same seed and length; the main and tuning rows, and the plot, ignore them."""
    default = bc.BASE_CONFIG["training"]["seed"]
    runs = {
        "ddp": _run("ddp", None, 200, [], 2.0, 1000),
        "diloco": _run("diloco", 10, 200, [], 2.1, 20),
        "ddp|seed=7": {**_run("ddp", None, 200, [], 2.2, 1000), "seed": 7},
        "diloco|seed=7": {**_run("diloco", 10, 200, [], 2.2, 20), "seed": 7},
    }
    main = bc.summarize(runs)
    assert [(r["algorithm"], r["final_eval"]) for r in main] == [("ddp", 2.0), ("diloco", 2.1)]
    seeds = {r["algorithm"]: r for r in bc.summarize_seeds(runs)}
    assert [p["seed"] for p in seeds["diloco"]["per_seed"]] == sorted([7, default])
    gaps = {p["seed"]: p["gap_pct"] for p in seeds["diloco"]["per_seed"]}
    assert gaps[default] == pytest.approx(5.0) and gaps[7] == pytest.approx(0.0)  # vs DDP of seed 7, not 1337
    table = "\n".join(bc.render_seeds(bc.summarize_seeds(runs)))
    assert "| diloco | 10 | 200 | 7: 2.2000 (+0.00 %), 1337: 2.1000 (+5.00 %) | +2.50 % | 5.00 points |" in table
    assert "| ddp | - | 200 | 7: 2.2000, 1337: 2.0000 | - | 10.00 % of the loss |" in table
    assert bc.run_key("diloco", 10, 200, seed=7) == "diloco|H=10|steps=200|seed=7"
    with pytest.raises(SystemExit):
        bc.main(["--seed", str(default), "--no-doc"])


def test_tuning_runs_at_another_seed_are_compared_with_ddp_of_that_seed(tmp_path) -> None:
    """--seed S --set ... --tag T: a tuning row at seed S, its gap taken against DDP of seed S; the
    main table and the seed-variation table leave it out."""
    runs = {
        "ddp": _run("ddp", None, 200, [], 2.0, 1000),
        "diloco": _run("diloco", 10, 200, [], 2.1, 20),
        "ddp|seed=7": {**_run("ddp", None, 200, [], 2.2, 1000), "seed": 7},
        "diloco|lr|seed=7": {**_run("diloco", 10, 200, [], 2.31, 20, tag="lr"), "seed": 7,
                             "overrides": {"algorithm.outerLr": 0.5}},
        "diloco|lr": {**_run("diloco", 10, 200, [], 2.05, 20, tag="lr"), "overrides": {"algorithm.outerLr": 0.5}},
        "ddp-long": _run("ddp", None, 400, [], 1.6, 1000),
        "diloco|lr|long": {**_run("diloco", 10, 400, [], 1.68, 20, tag="lr"), "overrides": {"algorithm.outerLr": 0.5}},
    }
    assert [(r["algorithm"], r["final_eval"]) for r in bc.summarize(runs)] == [("ddp", 2.0), ("diloco", 2.1)]
    at7 = bc.summarize(runs, "lr", 7)
    assert [(r["algorithm"], r["final_eval"]) for r in at7] == [("ddp", 2.2), ("diloco", 2.31)]
    assert at7[1]["gap_pct"] == pytest.approx(5.0)  # against DDP of seed 7 (2.2), not of the main seed (2.0)
    assert [r["algorithm"] for r in bc.summarize_seeds(runs)] == ["ddp"]  # the tagged run stays out of it
    doc = bc.render({"runs": runs})
    assert "| `lr` | diloco | 10 | 200 | `outerLr=0.5` | 2.0500 | +2.50 % |" in doc
    assert "| `lr` | diloco | 10 | 200 | `outerLr=0.5`, seed 7 | 2.3100 | +5.00 % |" in doc
    # the same tag at another run length: its own row, told apart by its inner steps, against DDP of that length
    assert "| `lr` | diloco | 10 | 400 | `outerLr=0.5` | 1.6800 | +5.00 % |" in doc
    assert "Tuning runs: " not in doc  # nothing on record says where they ran
    meta = {"cpu": "Some CPU", "cores": 2, "torch": "2.13.0+cpu", "date": "2026-12-04",
            "command": "python bench/bench_convergence.py --tag lr --set algorithm.outerLr=0.5"}
    assert ("Tuning runs: Some CPU, 2 cores, torch 2.13.0+cpu (2026-12-04); last command "
            "`python bench/bench_convergence.py --tag lr --set algorithm.outerLr=0.5`") in bc.render(
                {"runs": runs, "meta_tuning": meta})
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"runs": runs}))
    with pytest.raises(SystemExit):  # no DDP at seed 9 to compare with, and ddp not asked for
        bc.main(["--seed", "9", "--tag", "x", "--algorithms", "diloco", "--h", "10", "--outer-steps", "20",
                 "--results", str(results), "--no-doc"])
    with pytest.raises(SystemExit):  # a --set run needs a --tag, or it would land in the main rows
        bc.main(["--set", "algorithm.outerLr=0.5", "--results", str(results), "--no-doc"])
    assert json.loads(results.read_text()) == {"runs": runs}  # refused before anything ran or was written


def test_a_training_protocol_change_runs_ddp_with_it_and_compares_with_that_run(tmp_path) -> None:
    """--set training.X=V changes what DDP trains too: the tag's own DDP run is the reference of its
    rows (not the default DDP), and its DDP row shows what the change did to DDP against the default."""
    wu = {"training.warmupSteps": 20}
    runs = {
        "ddp": _run("ddp", None, 200, [(100, 2.5)], 2.0, 1000),
        "diloco": _run("diloco", 10, 200, [(100, 2.6)], 2.1, 20),
        "ddp|wu": {**_run("ddp", None, 200, [(100, 2.4)], 2.2, 1000, tag="wu"), "overrides": wu},
        "diloco|wu": {**_run("diloco", 10, 200, [(100, 2.52)], 2.31, 20, tag="wu"), "overrides": wu},
        "diloco|lr": {**_run("diloco", 10, 200, [], 2.05, 20, tag="lr"), "overrides": {"algorithm.outerLr": 0.5}},
    }
    assert bc.protocol_overrides({"algorithm.outerLr": 0.5, **wu}) == wu
    assert [(r["algorithm"], r["final_eval"]) for r in bc.summarize(runs)] == [("ddp", 2.0), ("diloco", 2.1)]
    ddp_row, diloco_row = bc.summarize(runs, "wu")
    assert (ddp_row["tag"], ddp_row["gap_pct"]) == ("wu", pytest.approx(10.0))  # DDP itself vs the default DDP
    assert diloco_row["gap_pct"] == pytest.approx(5.0)  # vs DDP with the same warm-up (2.2), not 2.0
    assert diloco_row["gaps"]["0.5"]["gap_pct"] == pytest.approx(5.0)
    assert bc.summarize(runs, "lr")[1]["gap_pct"] == pytest.approx(2.5)  # an algorithm-only tag: the default DDP
    doc = bc.render({"runs": runs})
    assert "| `wu` | ddp | - | 200 | `warmupSteps=20` | 2.2000 | +10.00 % |" in doc
    assert "| `wu` | diloco | 10 | 200 | `warmupSteps=20` | 2.3100 | +5.00 % |" in doc
    assert "| `lr` | ddp |" not in doc
    cfg = bc.build_config("ddp", None, 200, 50, "/tmp/ck", bc.protocol_overrides({"algorithm.outerLr": 0.5, **wu}))
    assert cfg["training"]["warmupSteps"] == 20 and cfg["algorithm"] == {"name": "ddp"}
    TrainerConfig.model_validate(cfg)
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"runs": runs}))
    with pytest.raises(SystemExit):  # a protocol change without DDP under it to compare with
        bc.main(["--set", "training.warmupSteps=50", "--tag", "wu50", "--algorithms", "diloco", "--h", "10",
                 "--outer-steps", "20", "--results", str(results), "--no-doc"])
    assert json.loads(results.read_text()) == {"runs": runs}
