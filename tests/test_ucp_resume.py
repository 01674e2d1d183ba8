"""Resume through the universal checkpoint with the real loop (``python -m loco_trainer``).

A DDP run of 2 pods x 2 processes (FSDP2-sharded inside each pod: ``--nproc 4 --nproc-per-worker 2``)
saves every 2 steps. From its step-4 checkpoint we resume:

* at the same layout: the resumed run's losses and final state equal the uninterrupted run's, bit
  for bit (same world, same reduction order, restored RNG and data position);
* at 3 pods x 1 process (unsharded) and at 1 pod x 2 processes (sharded differently): the state the
  resumed run loaded (re-saved at step 4 by a run of 0 steps) equals the consolidated truth bit for
  bit, every parameter and AdamW tensor; the next steps' losses (the model at steps 6 and 8 on a
  fixed batch) match the uninterrupted run within ``LOSS_RTOL``;
* with another algorithm (DDP -> DiLoCo): parameters and inner optimizer state are kept, the
  algorithm state is reset with a logged reason.
* DiLoCo sharded at 2x2: its per-shard outer state (global parameters, momentum) is saved whole and
  a 2x1 run resumes with it.

Why a tolerance across world sizes: the global batch (``keepGlobalBatch``, 12 sequences) and the data
order are the same, and each rank's share is equal, so the averaged gradient is mathematically the
same; but it is summed in another order (reduce-scatter within a pod then all-reduce across pods vs
one all-reduce over 3 ranks), so fp32 rounding differs by ~1e-7 relative per step and AdamW carries
it on. Measured (2 loaded cores, torch CPU): parameters within 7.5e-9 of the reference after 4 more steps,
losses equal to fp32 print precision; ``LOSS_RTOL`` = 1e-5 leaves a wide margin for other BLAS builds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240)]

RUN_TIMEOUT_S = 180
LOSS_RTOL = 1e-5


def config(ckpt_root, steps: int, algorithm: dict | None = None) -> dict:
    return {
        "jobName": "tiny", "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 100_000},
        "training": {"steps": steps, "batchSize": 3, "seqLen": 32, "lr": 3e-3, "warmupSteps": 2, "logEvery": 2,
                     "evalEvery": 0, "evalBatches": 1, "batchRule": "keepGlobalBatch"},
        "algorithm": algorithm or {"name": "ddp"},
        "checkpoint": {"path": str(ckpt_root), "everySteps": 2, "keep": 10},
    }


def train(tmp_path, cfg: dict, nproc: int, per_worker: int = 1, history=None, resume_from: str | None = None):
    path = tmp_path / f"config-{len(os.listdir(tmp_path))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "loco_trainer", "--config", str(path), "--nproc", str(nproc),
           "--nproc-per-worker", str(per_worker)]
    if history:
        cmd += ["--history", str(history)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if resume_from:
        env["LOCO_RESUME_FROM"] = resume_from
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def job_dir(root) -> str:
    return os.path.join(str(root), "test", "tiny")


def consolidated(directory: str, step: int, tmp_path) -> dict:
    """The consolidated truth of checkpoint ``step``, through ``loco ckpt convert --to-torch``."""
    from loco_trainer.ckpt_cli import ckpt as ckpt_cli

    out = tmp_path / f"consolidated-{abs(hash((directory, step)))}.pt"
    result = CliRunner().invoke(ckpt_cli, ["convert", directory, str(out), "--to-torch", "--step", str(step)])
    assert result.exit_code == 0, result.output
    return torch.load(out, weights_only=False)


def assert_state_identical(state: dict, truth: dict) -> None:
    assert state["model"].keys() == truth["model"].keys()
    for k, v in truth["model"].items():
        assert torch.equal(state["model"][k], v), f"model/{k} differs"
    assert truth["optim"]["state"], "the truth has no optimizer state: no gradient reached the optimizer"
    assert any(bool(e["exp_avg"].abs().sum() > 0) for e in truth["optim"]["state"].values())
    assert state["optim"]["state"].keys() == truth["optim"]["state"].keys()
    for fqn, entry in truth["optim"]["state"].items():
        for name, v in entry.items():
            got = state["optim"]["state"][fqn][name]
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(v)), f"optim/{fqn}/{name} differs"


def fixed_batch_loss(model_state: dict) -> float:
    """Loss of a model state on one fixed batch (the same for every run compared)."""
    from loco_contract.config import ModelSpec
    from loco_trainer.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec.model_validate(config("/x", 1)["model"]))
    model.load_state_dict(model_state, strict=False)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (8, 32), generator=g)
    with torch.no_grad():
        _, loss = model(x, torch.roll(x, -1, dims=1))
    return float(loss)


def history(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 2 pods x 2 sharded processes, DDP, 8 steps, checkpoints at 2, 4, 6, 8."""
    tmp = tmp_path_factory.mktemp("reference")
    root = tmp / "ckpt"
    train(tmp, config(root, 8), 4, 2, history=tmp / "h.jsonl")
    directory = job_dir(root)
    manifest = json.loads(open(os.path.join(directory, "step-00000004", "manifest.json")).read())
    assert manifest["layout"]["numReplicas"] == 2 and manifest["layout"]["nprocPerWorker"] == 2
    return {"dir": directory, "history": history(tmp / "h.jsonl"), "tmp": tmp}


def test_resume_at_the_same_layout_reproduces_the_uninterrupted_run_exactly(reference, tmp_path):
    root = tmp_path / "ckpt"
    os.makedirs(job_dir(root))
    for name in ("step-00000002", "step-00000004"):  # a crash after step 5: steps 6 and 8 never committed
        shutil.copytree(os.path.join(reference["dir"], name), os.path.join(job_dir(root), name))
    result = train(tmp_path, config(root, 8), 4, 2, history=tmp_path / "h.jsonl")
    assert "step-00000004" in result.stdout and "resumed from" in result.stdout
    resumed = history(tmp_path / "h.jsonl")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in (5, 6, 7, 8)] == [reference["history"][s] for s in (5, 6, 7, 8)]
    assert_state_identical(consolidated(job_dir(root), 8, tmp_path), consolidated(reference["dir"], 8, tmp_path))


@pytest.mark.parametrize("nproc, per_worker", [(3, 1), (2, 2)], ids=["3x1-unsharded", "1x2-sharded"])
def test_resume_at_another_layout_loads_the_exact_state_and_continues_within_tolerance(reference, tmp_path, nproc, per_worker):
    root = tmp_path / "ckpt"
    hint = os.path.join(reference["dir"], "step-00000004")
    # 0 steps: the run loads step 4 into its layout and saves it again (its directory ends with its state)
    first = train(tmp_path, config(root, 4), nproc, per_worker, resume_from=hint)
    assert "RNG states reseeded" in first.stdout  # another world: per-rank RNG cannot carry over, and says so
    loaded = consolidated(job_dir(root), 4, tmp_path)
    assert loaded["layout"]["numReplicas"] == nproc // per_worker and loaded["layout"]["nprocPerWorker"] == per_worker
    truth = consolidated(reference["dir"], 4, tmp_path)
    assert_state_identical(loaded, truth)
    assert loaded["extra_state"]["data"] == truth["extra_state"]["data"]  # the data position carries over

    train(tmp_path, config(root, 8), nproc, per_worker)  # resumes from its own step 4 (same layout)
    for step in (6, 8):
        ours = fixed_batch_loss(consolidated(job_dir(root), step, tmp_path)["model"])
        theirs = fixed_batch_loss(consolidated(reference["dir"], step, tmp_path)["model"])
        assert ours == pytest.approx(theirs, rel=LOSS_RTOL), (step, ours, theirs)


def test_ddp_to_diloco_keeps_parameters_and_inner_optimizer_state(reference, tmp_path):
    root = tmp_path / "ckpt"
    hint = os.path.join(reference["dir"], "step-00000004")
    result = train(tmp_path, config(root, 4, {"name": "diloco", "syncEvery": 2}), 2, 1, resume_from=hint)
    assert "algorithm changed from 'ddp' to 'diloco'" in result.stdout
    loaded = consolidated(job_dir(root), 4, tmp_path)
    assert loaded["algorithm"] == "diloco"
    assert_state_identical(loaded, consolidated(reference["dir"], 4, tmp_path))
    # DiLoCo's own state starts fresh: its global parameters are the loaded parameters, no outer step yet
    algo = loaded["algorithm_state"]
    assert algo["outer_steps"] == 0 and algo["steps_since_sync"] == 0
    for name, g in algo["global_params"].items():
        assert torch.equal(g, loaded["model"][name])


def test_sharded_diloco_saves_its_outer_state_whole_and_resumes_unsharded(tmp_path):
    """DiLoCo at 2 pods x 2 sharded processes: its global parameters and outer momentum (kept per
    shard) are saved as whole tensors; at a round boundary they equal the model; a 2x1 run loads them."""
    root = tmp_path / "ckpt"
    train(tmp_path, config(root, 4, {"name": "diloco", "syncEvery": 2}), 4, 2)
    state = consolidated(job_dir(root), 4, tmp_path)
    algo = state["algorithm_state"]
    assert algo["outer_steps"] == 2 and algo["steps_since_sync"] == 0
    for name, g in algo["global_params"].items():
        assert g.shape == state["model"][name].shape and torch.equal(g, state["model"][name]), name
    momentum = algo["outer_optimizer"]["state"]
    assert len(momentum) == len(algo["global_params"])
    for index, name in enumerate(algo["global_params"]):
        assert momentum[index]["momentum_buffer"].shape == state["model"][name].shape

    result = train(tmp_path, config(root, 6, {"name": "diloco", "syncEvery": 2}), 2, 1)
    assert "algorithm changed" not in result.stdout  # the outer state was kept, not reset
    resumed = consolidated(job_dir(root), 6, tmp_path)["algorithm_state"]
    assert resumed["outer_steps"] == 3


# --------------------------------------------------------------- sharded DiLoCo saved mid-round
#
# syncEvery 2, checkpoints every 3 steps: step 3 lies mid-round (one local step after the sync at 2),
# so the two replicas' parameters and inner optimizer state differ there and each replica's own
# copy must be saved (``replica/1/*`` atoms besides the shared ones) for a resume to be exact. The
# loss of step 5 (rank 0's) follows the outer sync at 4, which averages both replicas' restored
# state: resuming replica 1 from replica 0's copy would change it.

MID_ROUND = {"name": "diloco", "syncEvery": 2}


def mid_round_config(ckpt_root, steps: int) -> dict:
    cfg = config(ckpt_root, steps, MID_ROUND)
    cfg["checkpoint"]["everySteps"] = 3
    return cfg


def replica_state(state: dict, k: int) -> dict:
    """Replica ``k``'s own model and inner optimizer state from a consolidated checkpoint."""
    return {"model": state["model"], "optim": state["optim"]} if k == 0 else state["replicas"][k]


@pytest.fixture(scope="module")
def diloco_reference(tmp_path_factory):
    """The uninterrupted sharded DiLoCo run: 2 pods x 2 processes, 6 steps, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("diloco-reference")
    root = tmp / "ckpt"
    train(tmp, mid_round_config(root, 6), 4, 2, history=tmp / "h.jsonl")
    return {"dir": job_dir(root), "history": history(tmp / "h.jsonl"), "tmp": tmp}


def test_sharded_diloco_saves_each_replicas_own_state_mid_round(diloco_reference, tmp_path):
    state = consolidated(diloco_reference["dir"], 3, tmp_path)
    assert state["algorithm_state"]["steps_since_sync"] == 1
    assert sorted(state["replicas"]) == [1]
    zero, one = replica_state(state, 0), replica_state(state, 1)
    assert zero["model"].keys() == one["model"].keys()
    assert any(not torch.equal(zero["model"][k], one["model"][k]) for k in zero["model"])  # they diverged
    for k, v in one["model"].items():
        assert v.shape == zero["model"][k].shape, k  # saved whole (every shard of pod 1), not one shard
    assert one["optim"]["state"].keys() == zero["optim"]["state"].keys()


def test_sharded_diloco_mid_round_resume_at_the_same_layout_is_exact(diloco_reference, tmp_path):
    root = tmp_path / "ckpt"
    os.makedirs(job_dir(root))
    shutil.copytree(os.path.join(diloco_reference["dir"], "step-00000003"), os.path.join(job_dir(root), "step-00000003"))
    result = train(tmp_path, mid_round_config(root, 6), 4, 2, history=tmp_path / "h.jsonl")
    assert "resumed from" in result.stdout and "RNG states reseeded" not in result.stdout
    resumed = history(tmp_path / "h.jsonl")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [diloco_reference["history"][s] for s in (4, 5, 6)]
    ours, truth = consolidated(job_dir(root), 6, tmp_path), consolidated(diloco_reference["dir"], 6, tmp_path)
    assert_state_identical(ours, truth)
    for name, g in truth["algorithm_state"]["global_params"].items():
        assert torch.equal(ours["algorithm_state"]["global_params"][name], g), name


def outer_step(truth: dict, sources: list[int]) -> dict[str, torch.Tensor]:
    """DiLoCo's final outer step (``finish()``) from checkpoint ``truth`` when the resumed replicas
    hold saved replicas ``sources``' parameters: average pseudo-gradient, then the saved outer SGD."""
    algo = truth["algorithm_state"]
    names = list(algo["global_params"])
    params = [algo["global_params"][n].clone() for n in names]
    opt = torch.optim.SGD(params, lr=1.0)
    opt.load_state_dict(algo["outer_optimizer"])
    for n, g in zip(names, params):
        g.grad = sum(g - replica_state(truth, k)["model"][n] for k in sources) / len(sources)
    opt.step()
    return dict(zip(names, params))


@pytest.mark.parametrize("nproc, per_worker", [(3, 1), (2, 2)], ids=["3x1-unsharded", "1x2-sharded"])
def test_sharded_diloco_mid_round_loads_at_another_layout_by_the_replica_rule(diloco_reference, tmp_path, nproc,
                                                                              per_worker):
    """New replica ``j`` of ``M`` takes saved replica ``j mod N``'s own state, resharded.

    A run of 0 steps loads step 3 and ends with DiLoCo's final outer step over the partial round, then
    re-saves step 3. Its inner optimizer state (untouched by the outer step) must equal, bit for bit
    and per replica, the saved replica it maps to; its parameters must be the outer step over the
    pseudo-gradients of the mapped replicas (equal up to the all-reduce's fp32 summation order), which
    for 3x1 is far from what "every replica starts from replica 0's" would give."""
    root = tmp_path / "ckpt"
    hint = os.path.join(diloco_reference["dir"], "step-00000003")
    result = train(tmp_path, mid_round_config(root, 3), nproc, per_worker, resume_from=hint)
    replicas = nproc // per_worker
    sources = [j % 2 for j in range(replicas)]
    for j, k in enumerate(sources):
        assert f"of replica {j} taken from saved replica {k}" in result.stdout
    truth = consolidated(diloco_reference["dir"], 3, tmp_path)
    loaded = consolidated(job_dir(root), 3, tmp_path)
    assert loaded["layout"]["numReplicas"] == replicas and loaded["layout"]["nprocPerWorker"] == per_worker
    assert sorted(loaded["replicas"]) == list(range(1, replicas))
    for j, k in enumerate(sources):
        got, want = replica_state(loaded, j)["optim"]["state"], replica_state(truth, k)["optim"]["state"]
        assert got.keys() == want.keys()
        for fqn, entry in want.items():
            for name, v in entry.items():
                assert torch.equal(torch.as_tensor(got[fqn][name]), torch.as_tensor(v)), (j, fqn, name)
    expected, from_replica_0 = outer_step(truth, sources), outer_step(truth, [0])
    for name, want in expected.items():
        for j in range(replicas):
            torch.testing.assert_close(replica_state(loaded, j)["model"][name], want, rtol=0, atol=1e-6)
    if len(set(sources)) > 1:  # the rule is observable: replica 0's state alone gives another model
        assert max(float((expected[n] - from_replica_0[n]).abs().max()) for n in expected) > 1e-4
