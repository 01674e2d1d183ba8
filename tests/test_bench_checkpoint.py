"""The checkpoint benchmark's short mode, run for real: every save and load paired with a dd of the same size, the
goals judged from the pairs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_checkpoint as bc  # noqa: E402


def test_the_short_mode_pairs_each_save_and_load_with_dd(capsys, tmp_path) -> None:
    bc.main(["--params-m", "3", "--reshard-params-m", "1", "--repeats", "2", "--no-write", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    pairs = re.search(r"synchronous save .*pairs: (\d+)%, (\d+)% of dd", out)
    loads = re.search(r"load into the same layout .*pairs: (\d+)%, (\d+)% of dd, (\d+)%, (\d+)% of the raw read", out)
    assert re.search(r"raw read of the checkpoint's data files .* \| [\d,]+, [\d,]+ MB/s \|", out), out
    assert pairs and loads, out
    assert all(int(x) > 0 for x in pairs.groups() + loads.groups())
    for goal in ("sync save at least 80 % of the disk's write: **", "load at least 80 % of the disk's read: **",
                 "async stall under 1 % of the sync save: **"):
        assert re.search(re.escape(goal) + r"(met|missed)\*\*", out), goal
    assert "| load 2x2 -> 3x1 (unsharded) |" in out
