"""Two writers on one checkpoint directory (security finding 5): a worker of an older membership epoch, or of
a job that was replaced, cannot commit once a newer writer began, however late its save arrives."""

from __future__ import annotations

import json

import pytest
import torch

from loco_trainer.ucp import CheckpointEngine, CheckpointSaveError, Reason, StaleWriterError, read_fence
from loco_trainer.ucp.fence import Fence, check_fence, raise_fence
from loco_trainer.ucp.storage import Storage


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def engine(tmp_path, uid: str, epoch: list[int], events: list | None = None) -> CheckpointEngine:
    """An engine whose membership epoch is ``epoch[0]`` (a list, so the test can move it as a resize does)."""
    return CheckpointEngine(str(tmp_path), keep=5, job_uid=uid, epoch=lambda: epoch[0],
                            on_event=(lambda r, m: events.append((r, m))) if events is not None else None)


def test_the_fence_orders_writers():
    fence = Fence("job-a", 3)
    assert fence.refuses("job-a", 3) is None and fence.refuses("job-a", 4) is None
    assert "epoch 3" in fence.refuses("job-a", 2) and "another job" in fence.refuses("job-b", 9)


def test_a_stale_epoch_cannot_commit_over_its_replacement(tmp_path):
    old_events: list = []
    old = engine(tmp_path, "job-a", [1], old_events)  # the worker on the partitioned node
    old.save(10, model(1))
    new = engine(tmp_path, "job-a", [2])  # its replacement starts: epoch 2 holds the directory now
    assert read_fence(Storage(str(tmp_path))) == Fence("job-a", 2)
    new.save(20, model(2))

    with pytest.raises(CheckpointSaveError, match="stale writer.*epoch 2"):
        old.save(30, model(3))  # the old writer's late save: refused, nothing written
    assert [c.step for c in new.list()] == [10, 20]
    assert (tmp_path / "latest").read_text().strip() == "step-00000020"
    assert old.metrics.fenced._value.get() == 1
    assert any(reason == Reason.FENCED and "step 30" in message for reason, message in old_events)
    with pytest.raises(CheckpointSaveError):  # nor may it replace a step the new epoch wrote
        old.save(20, model(4))
    assert torch.equal(_weight(new, 20), model(2).weight)  # the newer epoch's step 20, untouched
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _weight(engine: CheckpointEngine, step: int) -> torch.Tensor:
    target = model(0)
    engine.load(next(c for c in engine.list() if c.step == step), target)
    return target.weight


def test_a_live_resize_moves_the_fence_with_the_epoch(tmp_path):
    epoch = [0]
    survivor = engine(tmp_path, "job-a", epoch)
    left_behind = engine(tmp_path, "job-a", [0])  # a member the resize dropped, still alive in epoch 0
    survivor.save(5, model(1))
    epoch[0] = 1
    survivor.raise_fence()  # what the trainer does on entering epoch 1
    survivor.save(6, model(2))
    with pytest.raises(CheckpointSaveError, match="stale writer"):
        left_behind.save(7, model(3))


def test_a_new_job_of_the_same_name_takes_the_directory_over(tmp_path):
    first = engine(tmp_path, "uid-1", [4])
    first.save(1, model(1))
    second = engine(tmp_path, "uid-2", [0])  # deleted and created again: epoch 0, another uid
    second.save(2, model(2))
    with pytest.raises(CheckpointSaveError, match="another job"):
        first.save(3, model(3))
    assert json.loads((tmp_path / "fence").read_text())["jobUid"] == "uid-2"


def test_a_worker_that_starts_behind_the_fence_is_refused_at_once(tmp_path):
    engine(tmp_path, "job-a", [5])
    with pytest.raises(StaleWriterError, match="epoch 5"):
        engine(tmp_path, "job-a", [3])


def test_no_fence_without_an_epoch_and_an_unreadable_fence_is_rewritten(tmp_path):
    CheckpointEngine(str(tmp_path), keep=2).save(1, model(1))
    assert read_fence(Storage(str(tmp_path))) is None
    (tmp_path / "fence").write_text("{not json")
    storage = Storage(str(tmp_path))
    check_fence(storage, "job-a", 0)  # nothing to hold against anyone
    assert raise_fence(storage, "job-a", 2) == Fence("job-a", 2) == read_fence(storage)
