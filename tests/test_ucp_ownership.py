"""A new job of a deleted job's name: the predecessor's checkpoints are set aside (default) or adopted, never
resumed from silently and never lost (loco_trainer.ucp.ownership; issue 30 #6)."""

from __future__ import annotations

import pytest
import torch

from loco_trainer.ucp import CheckpointEngine, Storage
from loco_trainer.ucp.ownership import PREVIOUS_PREFIX, PreviousJob, take_over


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def engine(root, uid: str, adopt: bool = False, epoch: int = 0) -> CheckpointEngine:
    return CheckpointEngine(str(root), keep=5, job_uid=uid, epoch=lambda: epoch, adopt_previous_job=adopt)


def weight(eng: CheckpointEngine, step: int) -> torch.Tensor:
    target = model(0)
    eng.load(next(c for c in eng.list() if c.step == step), target)
    return target.weight


def test_a_new_job_sets_the_previous_jobs_checkpoints_aside_and_starts_fresh(tmp_path):
    first = engine(tmp_path, "uid-1", epoch=3)
    first.save(100, model(1))
    first.save(200, model(2))
    second = engine(tmp_path, "uid-2")
    assert second.previous_job == PreviousJob("uid-1", (100, 200), adopted=False, kept_in=PREVIOUS_PREFIX + "uid-1")
    assert second.list() == [] and second.newest_valid().info is None  # nothing of the old job to resume from
    # kept whole, where a user (or checkpoint.adoptPreviousJob's absence) can still find them
    kept = CheckpointEngine(str(tmp_path / (PREVIOUS_PREFIX + "uid-1")), keep=5)
    assert [c.step for c in kept.list()] == [100, 200] and kept.newest_valid().info.step == 200
    assert torch.equal(weight(kept, 200), model(2).weight)
    # the new job writes step 100 again: no collision with the old one's step 100
    second.save(100, model(3))
    assert [c.step for c in second.list()] == [100] and torch.equal(weight(second, 100), model(3).weight)
    # its own restart finds its own checkpoints: nothing moved again
    again = engine(tmp_path, "uid-2", epoch=1)
    assert again.previous_job is None and [c.step for c in again.list()] == [100]


def test_adopting_the_previous_job_resumes_from_its_newest_checkpoint(tmp_path):
    engine(tmp_path, "uid-1").save(50, model(1))
    adopter = engine(tmp_path, "uid-2", adopt=True)
    assert adopter.previous_job == PreviousJob("uid-1", (50,), adopted=True, kept_in="")
    assert adopter.newest_valid().info.step == 50 and torch.equal(weight(adopter, 50), model(1).weight)


def test_nothing_to_take_over_for_the_first_job_the_same_job_or_an_empty_directory(tmp_path):
    first = engine(tmp_path, "uid-1")
    assert first.previous_job is None  # no fence yet
    assert engine(tmp_path, "uid-1", epoch=2).previous_job is None  # its own
    assert engine(tmp_path, "uid-2").previous_job is None  # another job, but no checkpoint to keep
    # tools and tests that do not fence (no epoch) never move anything
    engine(tmp_path, "uid-2").save(1, model(1))
    assert CheckpointEngine(str(tmp_path), keep=2).previous_job is None
    assert [c.step for c in CheckpointEngine(str(tmp_path), keep=2).list()] == [1]


def test_a_take_over_a_crash_interrupted_is_finished_by_the_next_start(tmp_path):
    old = engine(tmp_path, "uid-1")
    old.save(10, model(1))
    old.save(20, model(2))
    storage = Storage(str(tmp_path))
    storage.makedirs(PREVIOUS_PREFIX + "uid-1")
    storage.rename("step-00000010", f"{PREVIOUS_PREFIX}uid-1/step-00000010")  # the crash came after one rename
    new = engine(tmp_path, "uid-2")
    assert new.previous_job is not None and new.previous_job.steps == (20,)
    kept = sorted(p.name for p in (tmp_path / (PREVIOUS_PREFIX + "uid-1")).iterdir())
    assert kept == ["latest", "step-00000010", "step-00000020"] and new.list() == []


def test_a_fence_naming_no_real_uid_is_refused_rather_than_used_as_a_path(tmp_path):
    engine(tmp_path, "uid-1").save(1, model(1))
    (tmp_path / "fence").write_text('{"jobUid": "../../etc", "epoch": 0}')
    with pytest.raises(ValueError, match="not one"):
        take_over(Storage(str(tmp_path)), "uid-2", adopt=False)
    assert [c.step for c in CheckpointEngine(str(tmp_path), keep=2).list()] == [1]  # nothing moved


def test_rename_never_replaces(tmp_path):
    storage = Storage(str(tmp_path))
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        storage.rename("a", "b")
    assert (tmp_path / "b").read_text() == "b"
