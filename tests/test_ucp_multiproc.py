"""Universal checkpoint across processes: FSDP2/HSDP save at 2x2, reshard to 3x1 and 1x2; kill -9 mid-save."""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import time
import traceback

import pytest
import torch

from dist_helpers import free_port, run_ranks

pytestmark = pytest.mark.multiproc


class Net(torch.nn.Module):
    """Uneven shapes (7 rows over 2 shards) and a buffer that FSDP leaves unsharded."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(10, 7)
        self.b = torch.nn.Linear(7, 3)
        self.register_buffer("scale", torch.tensor([1.5, 0.5, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) * self.scale


def build(seed: int, nrep: int, nproc: int, sharded: bool):
    """Model + AdamW in the layout (nrep replicas x nproc processes); sharded: HSDP over a 2D mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Net()
    if sharded:
        mesh = init_device_mesh("cpu", (nrep, nproc), mesh_dim_names=("replicate", "shard"))
        fully_shard(model.a, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def steps(model, opt, n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randn(8, 10, generator=g)  # the same batch on every rank
        loss = model(x).pow(2).mean()
        loss.backward()
        if not any(hasattr(p, "device_mesh") for p in model.parameters()):  # plain replicas: average grads
            import torch.distributed as dist

            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def full_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return {"model": {k: v.clone() for k, v in msd.items()},
            "optim": {fqn: {k: v.clone() for k, v in st.items()} for fqn, st in osd["state"].items()},
            "groups": osd["param_groups"]}


def save_at(rank: int, world: int, root: str, nrep: int, nproc: int) -> dict:
    from loco_trainer.ucp import CheckpointEngine, WorldLayout

    model, opt = build(0, nrep, nproc, sharded=True)
    steps(model, opt, 2, seed=1)
    engine = CheckpointEngine(root, rank, world, layout=WorldLayout(nrep, nproc, "hsdp"), algorithm="ddp", staging="lazy")
    handle = engine.save_async(2, model, opt, algorithm_state={"round": 3}, rank_state={"rank": rank})
    truth = full_state(model, opt)  # collective on the training group while the save runs
    info = handle.wait(120)
    after = steps(model, opt, 2, seed=2)
    return {"truth": truth, "dir": info.dir, "after": after, "continued": full_state(model, opt)}


def load_at(rank: int, world: int, root: str, nrep: int, nproc: int, sharded: bool) -> dict:
    from loco_trainer.ucp import CheckpointEngine, WorldLayout

    model, opt = build(123, nrep, nproc, sharded=sharded)
    engine = CheckpointEngine(root, rank, world, layout=WorldLayout(nrep, nproc, "hsdp" if sharded else "ddp"), algorithm="diloco")
    loaded = engine.load(engine.latest(), model, opt)
    state = full_state(model, opt)
    after = steps(model, opt, 2, seed=2)
    return {"state": state, "rank_state": loaded.rank_state, "algo": loaded.algorithm_state, "notes": loaded.notes,
            "after": after, "continued": full_state(model, opt)}


@pytest.fixture(scope="module")
def saved_2x2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ucp") / "ckpt")
    results = run_ranks(save_at, 4, args=(root, 2, 2), timeout_s=240)
    return root, results[0]


def assert_bit_identical(state: dict, truth: dict) -> None:
    assert state["model"].keys() == truth["model"].keys()
    for k, v in truth["model"].items():
        assert torch.equal(state["model"][k], v), f"model/{k}"
    assert state["optim"].keys() == truth["optim"].keys()
    for fqn, st in truth["optim"].items():
        for name, v in st.items():
            assert torch.equal(state["optim"][fqn][name], v), f"optim/{fqn}/{name}"


def test_sharded_2x2_save_fragments_every_shard(saved_2x2):
    from loco_trainer.ucp import tools

    root, saved = saved_2x2
    (info,) = [c for c in tools.open_target(root)[1]]
    weight = info.manifest.atoms["model/a.weight"]
    assert weight.shape == (7, 10) and [f.shape for f in weight.fragments] == [(4, 10), (3, 10)]
    assert {f.rank for f in weight.fragments} == {0, 1}  # replica 1 (ranks 2, 3) holds copies and writes none
    assert info.manifest.layout.world_size == 4 and sorted(info.manifest.rank_states) == [0, 1, 2, 3]
    assert all(r.ok for r in tools.verify(root))


@pytest.mark.parametrize(("nrep", "nproc", "sharded"), [(3, 1, False), (1, 2, True)], ids=["3x1-unsharded", "1x2-fsdp"])
def test_reshard_load_is_bit_identical_and_resumes(saved_2x2, nrep, nproc, sharded):
    root, saved = saved_2x2
    results = run_ranks(load_at, nrep * nproc, args=(root, nrep, nproc, sharded), timeout_s=240)
    for rank, r in enumerate(results):
        assert_bit_identical(r["state"], saved["truth"])
        assert r["rank_state"] == {"rank": rank}
        assert r["algo"] is None and any("'ddp' to 'diloco'" in n for n in r["notes"])
        # the next steps follow the uninterrupted run (reduction order differs between layouts)
        assert r["after"] == pytest.approx(saved["after"], rel=1e-5, abs=1e-6)
        for k, v in saved["continued"]["model"].items():
            torch.testing.assert_close(r["continued"]["model"][k], v, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- kill -9 mid-save


def _kill_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    import torch.distributed as dist

    from loco_trainer.ucp import CheckpointEngine

    def hook(phase: str) -> None:
        if rank == 1 and phase == "after_data" and engine_step[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    engine_step = [0]
    result: dict = {}
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
        engine = CheckpointEngine(root, rank, world, fault_hook=hook, coordination_timeout_s=30)
        engine_step[0] = 1
        engine.save(1, model)
        engine_step[0] = 2
        handle = engine.save_async(2, model)
        try:
            handle.wait(120)
            result["second"] = "committed"
        except Exception as exc:  # noqa: BLE001
            result["second"] = f"failed: {exc}"
    except BaseException:  # noqa: BLE001
        result["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)
    os._exit(0)  # skip destroy_process_group: the peer is gone


def test_kill_9_mid_save_keeps_previous_checkpoint_and_cleans_partial(tmp_path):
    import torch.multiprocessing as mp

    from loco_trainer.ucp import CheckpointEngine

    root = str(tmp_path / "ckpt")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_kill_worker, args=(r, 2, port, root, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    assert procs[1].exitcode == -signal.SIGKILL
    with open(tmp_path / "rank0.pkl", "rb") as fh:
        rank0 = pickle.load(fh)
    assert "error" not in rank0, rank0.get("error")
    assert rank0["second"].startswith("failed"), rank0
    assert os.path.isdir(os.path.join(root, ".tmp-step-00000002"))  # the partial save is left behind ...
    assert not os.path.exists(os.path.join(root, "step-00000002"))

    restarted = CheckpointEngine(root)  # ... and the restart ignores and removes it
    assert restarted.latest().step == 1
    assert not os.path.exists(os.path.join(root, ".tmp-step-00000002"))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    restarted.load(restarted.latest(), model)
    torch.manual_seed(0)
    expected = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    for k, v in expected.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
