"""The batch rule across resizes (docs/elastic.md "The batch rule and the data"): the peak learning
rate follows the batch the inner optimizer sees (``training.lrScaling``), and an uneven split of the
global batch still gives DDP the full-batch mean gradient (``train.gradient_weight``)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from dist_helpers import flat_params, rank_pool, single_process_reference, tiny_batch, tiny_model  # noqa: F401 - rank_pool is a fixture
from loco_trainer.algorithms import DDP
from loco_trainer.comm import Comm
from loco_contract.config import AlgorithmName, LrScaling, TrainerConfig, TrainingSpec
from loco_trainer.data import rank_slice
from loco_trainer.train import Trainer, effective_lr, gradient_weight, inner_batch_ranks, lr_at

DILOCO_FAMILY = [a.value for a in AlgorithmName if a is not AlgorithmName.ddp]


# ------------------------------------------------------------------------------- the lr rule


@pytest.mark.parametrize(("scaling", "factor"), [("sqrt", math.sqrt(2.0)), ("linear", 2.0), ("none", 1.0)])
def test_ddp_keep_worker_batch_scales_lr_with_the_world_size(scaling: str, factor: float) -> None:
    training = TrainingSpec(lr=0.01, lr_scaling=scaling)
    assert effective_lr(training, "ddp", world_size=4, reference_world_size=2) == pytest.approx(0.01 * factor)
    shrunk = {"sqrt": math.sqrt(0.5), "linear": 0.5, "none": 1.0}[scaling]
    assert effective_lr(training, "ddp", world_size=1, reference_world_size=2) == pytest.approx(0.01 * shrunk)


@pytest.mark.parametrize("scaling", list(LrScaling))
def test_lr_is_unchanged_at_the_start_world_size(scaling: LrScaling) -> None:
    training = TrainingSpec(lr=0.01, lr_scaling=scaling)
    assert effective_lr(training, "ddp", world_size=3, reference_world_size=3) == 0.01


@pytest.mark.parametrize("algorithm", DILOCO_FAMILY)
@pytest.mark.parametrize("scaling", ["sqrt", "linear"])
def test_diloco_family_keeps_the_inner_lr_under_keep_worker_batch(algorithm: str, scaling: str) -> None:
    """Each replica's inner optimizer sees batchSize x nprocPerWorker whatever the replica count."""
    training = TrainingSpec(lr=0.01, lr_scaling=scaling)
    for world in (1, 2, 5):
        assert effective_lr(training, algorithm, world_size=world, reference_world_size=3) == 0.01
    assert inner_batch_ranks(algorithm, world_size=6, nproc_per_worker=2) == 2


@pytest.mark.parametrize("algorithm", ["ddp", *DILOCO_FAMILY])
def test_keep_global_batch_keeps_the_lr(algorithm: str) -> None:
    training = TrainingSpec(lr=0.01, lr_scaling="linear", batch_rule="keepGlobalBatch")
    assert effective_lr(training, algorithm, world_size=2, reference_world_size=3) == 0.01


def test_schedule_follows_the_effective_peak_lr() -> None:
    training = TrainingSpec(lr=0.01, steps=50, warmup_steps=5, min_lr_ratio=0.1)
    peak = effective_lr(training.model_copy(update={"lr_scaling": LrScaling.linear}), "ddp", 3, 2)
    assert peak == pytest.approx(0.015)
    for step in (0, 4, 5, 20, 49, 60):  # warm-up, peak, cosine, floor
        assert lr_at(step, training, peak) == pytest.approx(1.5 * lr_at(step, training))
    assert lr_at(5, training, peak) == pytest.approx(0.015)
    assert lr_at(60, training, peak) == pytest.approx(0.0015)
    assert lr_at(5, training) == pytest.approx(0.01)  # without a peak: training.lr


def test_lr_scaling_defaults_to_sqrt_and_refuses_unknown_values() -> None:
    assert TrainingSpec().lr_scaling is LrScaling.sqrt
    assert TrainerConfig().to_wire()["training"]["lrScaling"] == "sqrt"
    assert TrainerConfig.model_validate({"training": {"lrScaling": "none"}}).training.lr_scaling is LrScaling.none
    with pytest.raises(ValidationError) as err:
        TrainerConfig.model_validate({"training": {"lrScaling": "cubic"}})
    assert "lrScaling" in str(err.value) and "'sqrt', 'linear' or 'none'" in str(err.value)


def _tiny_job(tmp_path, steps: int) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "jobName": "tiny", "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 50_000},
        "training": {"steps": steps, "batchSize": 2, "seqLen": 32, "lr": 0.01, "warmupSteps": 1, "logEvery": 2,
                     "evalEvery": 0, "evalBatches": 1, "lrScaling": "linear"},
        "algorithm": {"name": "ddp"},
        "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 2, "keep": 3, "asyncSave": False},
    })


def test_loop_resumed_at_another_world_size_schedules_the_scaled_lr_and_logs_it(tmp_path, monkeypatch, caplog):
    """A DDP job that started with 4 ranks (the checkpoint's reference world) resumes on 1: linear
    scaling gives a peak lr of lr/4, logged once, and every scheduled lr follows it."""
    from loco_contract.config import RuntimeEnv
    from loco_trainer.checkpointer import Checkpointer
    from loco_trainer.rendezvous import RankInfo

    env = RuntimeEnv.from_environ({}).model_copy(update={"job_name": "tiny", "namespace": "test"})
    info, cpu = RankInfo(0, 0, 1, 0, 1), torch.device("cpu")
    Trainer(_tiny_job(tmp_path, steps=2), env, info, cpu).run()  # a committed checkpoint at step 2

    real_restore = Checkpointer.restore

    def restore_started_with_4_ranks(self, *args, **kwargs):
        step, position, _ = real_restore(self, *args, **kwargs)
        return step, position, 4

    monkeypatch.setattr(Checkpointer, "restore", restore_started_with_4_ranks)
    history = tmp_path / "history.jsonl"
    config = _tiny_job(tmp_path, steps=5)
    with caplog.at_level(logging.INFO, logger="loco_trainer"):
        result = Trainer(config, env, info, cpu, history_path=str(history)).run()
    assert result.resumed_from is not None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lr ")]
    assert lines == ["lr 0.01 -> 0.0025: training.lrScaling linear for ddp at 1 ranks "
                     "(the job started with 4, batchRule keepWorkerBatch)"]
    lrs = {r["step"]: r["lr"] for r in map(json.loads, history.read_text().splitlines()) if "lr" in r}
    assert sorted(lrs) == [3, 4, 5]
    for completed, lr in lrs.items():
        assert lr == pytest.approx(lr_at(completed - 1, config.training, 0.0025))
        assert lr < 0.0025 + 1e-12


# ------------------------------------------------------------------------------ uneven splits


def test_gradient_weight_is_each_ranks_share_of_its_group() -> None:
    # 7 sequences over 3 ranks: 3, 2, 2
    weights = [gradient_weight(7, r, 3, group_ranks=3) for r in range(3)]
    assert weights == pytest.approx([9 / 7, 6 / 7, 6 / 7])
    assert sum(weights) == pytest.approx(3.0)  # a uniform average of the weighted means = the batch mean
    assert [gradient_weight(8, r, 4, group_ranks=4) for r in range(4)] == [1.0] * 4  # even: untouched
    assert [gradient_weight(5, r, 4, group_ranks=1) for r in range(4)] == [1.0] * 4  # one-rank groups
    # two pods of two (DiLoCo, FSDP inside the pod): 7 over 4 ranks is 2, 2, 2, 1; pod 1 holds 3
    assert [gradient_weight(7, r, 4, group_ranks=2) for r in range(4)] == pytest.approx([1.0, 1.0, 4 / 3, 2 / 3])


GLOBAL_BATCH = 5  # over 2 ranks: 3 and 2 sequences
STEPS = 3


def _ddp_uneven(rank: int, world_size: int, use_wrap: bool, weighted: bool) -> dict:
    model = tiny_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    strategy = DDP(model, opt, Comm())
    strategy.setup()
    net = strategy.wrap(model) if use_wrap else model  # bare model: after_backward averages (flat fallback)
    offset, count = rank_slice(GLOBAL_BATCH, rank, world_size)
    weight = gradient_weight(GLOBAL_BATCH, rank, world_size, inner_batch_ranks("ddp", world_size, 1)) if weighted else 1.0
    for step in range(STEPS):
        x, y = tiny_batch(step, 0, batch_size=GLOBAL_BATCH)  # the global batch, identical on every rank
        loss = F.mse_loss(net(x[offset:offset + count]), y[offset:offset + count])
        (loss * weight).backward()
        strategy.after_backward(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {"params": flat_params(model), "count": count}
    if rank == 0:  # one process on the whole global batch
        out["reference"] = single_process_reference(lambda ps: torch.optim.SGD(ps, lr=0.5),
                                                    lambda step: tiny_batch(step, 0, batch_size=GLOBAL_BATCH), STEPS)
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("use_wrap", [True, False], ids=["comm-hook", "flat-fallback"])
def test_ddp_uneven_split_matches_one_process_on_the_global_batch(rank_pool, use_wrap: bool) -> None:
    results = rank_pool.run(_ddp_uneven, 2, args=(use_wrap, True))
    assert [r["count"] for r in results] == [3, 2]
    torch.testing.assert_close(results[0]["params"], results[1]["params"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["params"], results[0]["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.multiproc
def test_ddp_uneven_split_without_the_weight_differs_from_one_process(rank_pool) -> None:
    """The mean of per-rank means weights rank 1's 2 sequences as much as rank 0's 3: not the batch mean."""
    results = rank_pool.run(_ddp_uneven, 2, args=(True, False))
    assert (results[0]["params"] - results[0]["reference"]).abs().max() > 1e-4

