"""The fault-overhead benchmark's pure pieces: the overhead a per-call cost implies per step, and the
doc section (with and without the interruptible-wait figure)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_fault_overhead as bfo  # noqa: E402


def test_the_implied_overhead_falls_with_the_step_time_and_the_goal_is_where_it_crosses_one_percent() -> None:
    costs = (500.0, 0.5, 2.5)  # ns per record, ms per timing point, ms per transfer probe
    assert bfo.implied_pct(0.005, *costs) > bfo.implied_pct(0.05, *costs) > bfo.implied_pct(0.5, *costs)
    goal_ms = bfo.goal_from_step_ms(*costs)
    assert bfo.implied_pct(goal_ms / 1e3, *costs) < 1.0 <= bfo.implied_pct((goal_ms - 0.1) / 1e3, *costs)


def test_the_doc_section_adds_the_wait_cost_when_measured() -> None:
    shipped = json.loads(bfo.RESULTS.read_text())  # the figures docs/benchmarks.md shows
    without = dict(shipped)
    without.pop("waits", None)
    assert "Interruptible waits" not in bfo.render(without)
    waits = {"plain_us": 400.0, "interruptible_us": 460.0, "extra_us": 60.0, "command": "python bench/x.py --waits-only",
             "date": "2026-12-03"}
    section = bfo.render({**without, "waits": waits})
    assert section.startswith(bfo.START) and section.endswith(bfo.END)
    assert "400 µs plain and 460 µs interruptible, **+60 µs per wait**" in section
