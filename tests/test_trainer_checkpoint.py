"""The simple checkpoint format: atomic commit, latest, keep, cleaning, ``loco ckpt ls``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from loco_trainer import checkpoint as ckpt
from loco_trainer.cli import ckpt as ckpt_cli


def _save(directory, step, world_size=1, keep=3):
    result = None
    # Simulate the ranks in one process: each "rank" writes, the barrier is a no-op, rank 0 commits last.
    for rank in reversed(range(world_size)):
        if rank == 0:
            result = ckpt.save(str(directory), step, {"w": torch.full((2,), float(step)), "rank": rank},
                               rank=0, world_size=world_size, barrier=lambda: None, meta={"algorithm": "ddp"}, keep=keep)
        else:
            tmp = directory / (".tmp-" + ckpt.step_dir_name(step))
            tmp.mkdir(parents=True, exist_ok=True)
            torch.save({"rank": rank}, tmp / ckpt.rank_file_name(rank))
    return result


def test_save_commits_a_complete_directory_and_latest(tmp_path):
    info = _save(tmp_path, 40, world_size=2)
    assert info.step == 40 and info.world_size == 2
    assert sorted(os.listdir(info.path)) == ["meta.json", "rank-00000.pt", "rank-00001.pt"]
    meta = json.loads((tmp_path / "step-00000040" / "meta.json").read_text())
    assert meta["files"] == ["rank-00000.pt", "rank-00001.pt"] and meta["algorithm"] == "ddp"
    assert (tmp_path / "latest").read_text().strip() == "step-00000040"
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path))
    assert ckpt.load(info.path, 1)["rank"] == 1
    assert torch.equal(ckpt.load(info.path, 0)["w"], torch.full((2,), 40.0))


def test_latest_ignores_incomplete_saves_and_cleaning_removes_them(tmp_path):
    _save(tmp_path, 10)
    (tmp_path / ".tmp-step-00000020").mkdir()
    (tmp_path / ".tmp-step-00000020" / "rank-00000.pt").write_bytes(b"partial")
    (tmp_path / "step-00000030").mkdir()  # no meta.json: never committed
    assert ckpt.latest(str(tmp_path)).step == 10
    removed = ckpt.clean_incomplete(str(tmp_path))
    assert [os.path.basename(p) for p in removed] == [".tmp-step-00000020"]
    assert ckpt.latest(str(tmp_path)).step == 10


def test_only_the_newest_keep_checkpoints_survive(tmp_path):
    for step in (5, 10, 15, 20):
        _save(tmp_path, step, keep=2)
    assert [c.step for c in ckpt.list_checkpoints(str(tmp_path))] == [15, 20]


def test_commit_refuses_when_a_rank_file_is_missing(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="rank-00001.pt missing"):
        ckpt.save(str(tmp_path), 5, {}, rank=0, world_size=2, barrier=lambda: None)
    assert ckpt.latest(str(tmp_path)) is None


def test_load_of_a_rank_the_checkpoint_lacks_explains(tmp_path):
    info = _save(tmp_path, 5)
    with pytest.raises(ckpt.CheckpointError, match="no rank-00003.pt"):
        ckpt.load(info.path, 3)


def test_ckpt_ls_lists_committed_and_incomplete(tmp_path):
    _save(tmp_path, 10, world_size=2)
    (tmp_path / ".tmp-step-00000020").mkdir()
    out = CliRunner().invoke(ckpt_cli, ["ls", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert [c["step"] for c in doc["checkpoints"]] == [10] and doc["checkpoints"][0]["worldSize"] == 2
    assert doc["incomplete"] == [".tmp-step-00000020"]
    table = CliRunner().invoke(ckpt_cli, ["ls", str(tmp_path)])
    assert "step-00000010" in table.output and "incomplete" in table.output


def test_async_save_writes_a_snapshot_and_commits_on_finish(tmp_path):
    weights = torch.zeros(3)
    saver = ckpt.AsyncSaver()
    saver.start(str(tmp_path), 7, {"w": weights, "nested": [weights]}, rank=0,
                commit_kwargs=dict(rank=0, world_size=1, barrier=lambda: None))
    weights += 1  # training goes on while the file is written
    assert saver.pending_step == 7 and ckpt.latest(str(tmp_path)) is None
    with pytest.raises(ckpt.CheckpointError, match="still pending"):
        saver.start(str(tmp_path), 8, {}, rank=0, commit_kwargs={})
    info = saver.finish()
    assert info.step == 7 and saver.pending_step is None and saver.finish() is None
    state = ckpt.load(info.path, 0)
    assert torch.equal(state["w"], torch.zeros(3)) and torch.equal(state["nested"][0], torch.zeros(3))
