"""The GPU benchmark's code paths on CPU, so the first run on a lent GPU does not spend device time on
a bug: the doc section before and after a run, and ``--dry-run-cpu`` (the trainer, the bare loop and
the comm-overhead measurement on a tiny GPT, gloo instead of NCCL)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_gpu as bg  # noqa: E402


def test_the_doc_section_says_owed_until_a_run_then_gives_the_ratio_and_the_overhead() -> None:
    owed = bg.render({})
    assert owed.startswith(bg.START) and owed.endswith(bg.END)
    assert owed.count("**owed**") == 2 and bg.COMMAND in owed
    run = {
        "trainer": {"tokens_per_s": 970_000.0, "mfu": 0.485}, "bare": {"tokens_per_s": 1_000_000.0, "mfu": 0.5},
        "comm": {"step_s_raw": 0.100, "step_s_comm": 0.1004, "overhead_pct": 0.4, "buckets": 12, "blocks": 5,
                 "steps_per_block": 10},
        "machine": {"gpu": "NVIDIA H200", "torch": "2.13.0"}, "params": 150e6,
        "config": {"training": {"batchSize": 16, "seqLen": 1024}}, "date": "2026-12-03",
        "command": "python bench/bench_gpu.py",
    }
    done = bg.render({"run": run})
    assert "owed" not in done
    assert "**0.970x** (goal >= 0.97x)" in done and "**+0.40 %** per step" in done
    assert "NVIDIA H200" in done and "150 M-parameter" in done and "48.5 %" in done


def test_the_dry_run_exercises_every_measurement_on_cpu(capsys) -> None:
    bg.main(["--dry-run-cpu"])
    out = capsys.readouterr().out
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if line.split(" ", 1)[0] in ("trainer", "bare", "comm")}
    assert set(lines) == {"trainer", "bare", "comm"}, out
    assert "'tokens_per_s'" in lines["trainer"] and "'tokens_per_s'" in lines["bare"]
    # the counted all-reduces went through Comm: one per bucket and step of the counted blocks
    assert "'calls_counted': " in lines["comm"] and "'calls_counted': 0" not in lines["comm"], lines["comm"]
