"""NoLoCo (gossip, no collective) and CO2 (one-round-stale async outer step with clipping)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dist_helpers import rank_pool, flat_params, run_loop, tiny_batch, tiny_model
from loco_trainer.algorithms import CO2, DiLoCo, NoLoCo, num_parameters
from loco_trainer.algorithms.noloco import gossip_groups
from loco_trainer.comm import Comm

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier")


def _noloco(rank: int, world_size: int, nesterov: bool = False) -> dict:
    h, rounds = 2, 3
    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    comm = Comm()
    strategy = NoLoCo(model, opt, comm, sync_every=h, outer_lr=0.7, outer_momentum=0.5, mean_pull=0.3, seed=5,
                      nesterov=nesterov)
    strategy.setup()
    after_setup = comm.stats()["by_kind"]
    seen = []  # per round: inputs (φ, θ, m) and outputs (group, φ, θ, spread)
    for step in range(h * rounds):
        x, y = tiny_batch(step, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % h == 0:
            seen.append({"phi": torch.cat([o.reshape(-1) for o in strategy.outer_params]).clone(),
                         "theta": flat_params(model),
                         "m": torch.cat([m.reshape(-1) for m in strategy.momentum]).clone()})
        strategy.after_inner_step(step)
        if (step + 1) % h == 0:
            seen[-1].update(group=strategy.last_group, phi_after=torch.cat([o.reshape(-1) for o in strategy.outer_params]).clone(),
                            theta_after=flat_params(model), spread=strategy.last_spread)
    stats = comm.stats()["by_kind"]
    peers = [(r.kind, r.peer) for r in comm.records() if r.kind in ("send", "recv")]
    return {"seen": seen, "after_setup": after_setup, "stats": stats, "peers": peers,
            "formula": strategy.bytes_per_inner_step(num_parameters(model), world_size) * h * rounds}


def _noloco_merge(rank: int, world_size: int, merge: bool) -> dict:
    h, steps = 2, 5  # two full rounds and a partial one, which finish() gossips
    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    comm = Comm()
    strategy = NoLoCo(model, opt, comm, sync_every=h, outer_lr=0.7, outer_momentum=0.5, seed=5, final_merge=merge)
    strategy.setup()
    run_loop(strategy, model, opt, rank, 0, steps)
    before = comm.stats()["by_kind"]["all_reduce"]["bytes_sent"]
    merge_was = strategy.final_merge
    strategy.final_merge = False  # the replicas as they end without the merge
    strategy.finish()
    unmerged = flat_params(model)
    strategy.final_merge, strategy.steps_since_sync = merge_was, 0  # then the merge alone
    strategy.finish()
    return {"unmerged": unmerged, "final": flat_params(model),
            "phi": torch.cat([o.reshape(-1) for o in strategy.outer_params]),
            "merge_bytes": comm.stats()["by_kind"]["all_reduce"]["bytes_sent"] - before,
            "n_params": num_parameters(model)}


@pytest.mark.multiproc
@pytest.mark.parametrize("merge", [True, False])
def test_noloco_final_merge_averages_the_replicas_with_one_all_reduce(rank_pool, merge: bool) -> None:
    results = rank_pool.run(_noloco_merge, 4, args=(merge,))
    mean = torch.stack([r["unmerged"] for r in results]).mean(0)
    assert not torch.equal(results[0]["unmerged"], results[1]["unmerged"])  # NoLoCo replicas differ...
    for res in results:
        if merge:  # ... until the merge: every worker holds their average, as θ and as φ
            torch.testing.assert_close(res["final"], mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(res["final"], results[0]["final"], rtol=0, atol=0)
            torch.testing.assert_close(res["phi"], res["final"], rtol=0, atol=0)
            assert res["merge_bytes"] == 2 * 3 / 4 * 4 * res["n_params"]  # one ring all-reduce of fp32
        else:
            assert torch.equal(res["final"], res["unmerged"]) and res["merge_bytes"] == 0


@pytest.mark.multiproc
@pytest.mark.parametrize("nesterov", [False, True])
def test_noloco_gossips_in_seeded_pairs_without_any_collective(rank_pool, nesterov: bool) -> None:
    n, rounds = 4, 3
    results = rank_pool.run(_noloco, n, args=(nesterov,))
    expected_groups = [gossip_groups(n, 2, r, seed=5) for r in range(1, rounds + 1)]
    assert len({str(g) for g in expected_groups}) > 1, "the pairing must change between rounds"
    for rank, res in enumerate(results):
        # no collective after setup's one-time broadcast: only point-to-point traffic
        for kind in COLLECTIVES:
            assert res["stats"][kind]["calls"] == res["after_setup"][kind]["calls"], kind
        assert res["stats"]["send"]["bytes_sent"] == res["formula"]
        for r, seen in enumerate(res["seen"]):
            group = next(g for g in expected_groups[r] if rank in g)
            assert seen["group"] == group
            peer = next(x for x in group if x != rank)
            assert res["peers"][2 * r : 2 * r + 2] == [("send", peer), ("recv", peer)]
            # the step, recomputed from both members' inputs
            mine, other = seen, results[peer]["seen"][r]
            mean_phi = (mine["phi"] + other["phi"]) / 2
            mean_delta = (mine["theta"] - mine["phi"] + other["theta"] - other["phi"]) / 2
            if nesterov:  # DiLoCo's Nesterov step on the pair's mean outer gradient, the pull kept out of m
                m = 0.5 * mine["m"] + mean_delta
                step = 0.7 * (mean_delta + 0.5 * m) + 0.3 * (mean_phi - mine["phi"])
            else:  # the paper's modified Nesterov step: the pull goes through the momentum
                m = 0.5 * mine["m"] + 0.7 * mean_delta + 0.3 * (mean_phi - mine["phi"])
                step = m
            torch.testing.assert_close(seen["phi_after"], mine["phi"] + step, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(seen["theta_after"], seen["phi_after"], rtol=0, atol=0)
            expected_spread = (mine["phi"] - mean_phi).pow(2).mean().sqrt()  # both members are equally far
            assert seen["spread"] == pytest.approx(float(expected_spread), rel=1e-4, abs=1e-9)
    # the workers are not identical (that is NoLoCo), yet each pair moved towards its mean
    assert not torch.equal(results[0]["seen"][-1]["phi_after"], results[1]["seen"][-1]["phi_after"])
    assert results[0]["seen"][-1]["spread"] > 0


def _noloco_or_diloco(rank: int, world_size: int, algorithm: str) -> torch.Tensor:
    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = {"sync_every": 2, "outer_lr": 0.7, "outer_momentum": 0.9}
    if algorithm == "noloco":
        strategy = NoLoCo(model, opt, Comm(), group_size=world_size, nesterov=True, mean_pull=0.3, **outer)
    else:
        strategy = DiLoCo(model, opt, Comm(), nesterov=True, **outer)
    strategy.setup()
    run_loop(strategy, model, opt, rank, 0, 8)
    return flat_params(model)


@pytest.mark.multiproc
def test_noloco_nesterov_over_one_group_of_every_worker_is_diloco(rank_pool) -> None:
    """With every worker in the one group, the replicas never differ (so the pull has nothing to do) and the
    Nesterov form is DiLoCo's outer step, to rounding: what the option adds over DiLoCo is only the gossip."""
    noloco = rank_pool.run(_noloco_or_diloco, 3, args=("noloco",))
    diloco = rank_pool.run(_noloco_or_diloco, 3, args=("diloco",))
    assert not torch.equal(noloco[0], tiny_model_params())  # it trained
    for a, b in zip(noloco, diloco):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def tiny_model_params() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in tiny_model(seed=0).parameters()])


def test_gossip_groups_are_a_partition_and_odd_counts_make_a_triple() -> None:
    for n in (2, 4, 5, 8):
        for r in range(4):
            groups = gossip_groups(n, 2, r, seed=1)
            assert sorted(x for g in groups for x in g) == list(range(n))
            assert all(len(g) in (2, 3) for g in groups)
            assert groups == gossip_groups(n, 2, r, seed=1)  # pure: the same on every rank
    assert sorted(len(g) for g in gossip_groups(5, 2, 0)) == [2, 3]


# -------------------------------------------------------------------------------------- CO2


def _co2(rank: int, world_size: int, nesterov: bool = False) -> dict:
    h, rounds = 2, 4
    model = tiny_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    comm = Comm()
    strategy = CO2(model, opt, comm, sync_every=h, outer_lr=0.9, outer_momentum=0.5, staleness_penalty=2.0, clip_threshold=0.05,
                   nesterov=nesterov)
    strategy.setup()
    setup_bytes = comm.stats()["bytes_sent"]
    phi0 = strategy.outer_params.clone()
    thetas, phis, moms = [], [], []
    for step in range(h * rounds):
        x, y = tiny_batch(step, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % h == 0:
            thetas.append(flat_params(model))
        strategy.after_inner_step(step)
        if (step + 1) % h == 0:
            phis.append(strategy.outer_params.clone())
            moms.append(strategy.momentum.clone())
            assert torch.equal(flat_params(model), strategy.outer_params)
    pending = strategy._pending is not None
    stats_bytes = comm.stats()["bytes_sent"] - setup_bytes
    strategy.finish()
    return {"phi0": phi0, "thetas": thetas, "phis": phis, "moms": moms, "pending": pending, "final": flat_params(model),
            "phi_final": strategy.outer_params.clone(), "bytes": stats_bytes,
            "formula": strategy.bytes_per_inner_step(num_parameters(model), world_size) * h * rounds}


@pytest.mark.multiproc
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_co2_applies_each_round_exactly_one_round_late_with_clipped_momentum(rank_pool, nesterov: bool) -> None:
    results = rank_pool.run(_co2, 2, args=(nesterov,))
    eta, beta, lam, c = 0.9, 0.5, 2.0, 0.05

    def step(phi, m, g):  # the outer SGD step on the clipped momentum: plain, or Nesterov's g + beta * m
        return phi - eta * (g + beta * m) if nesterov else phi - eta * m

    phi = results[0]["phi0"].clone()
    m = torch.zeros_like(phi)
    previous = None
    expected_phis = []
    for r in range(4):
        mean = (results[0]["thetas"][r] + results[1]["thetas"][r]) / 2  # x̄ of round r: the mean parameters
        if previous is not None:  # round r applies round r-1's mean, measured from the current φ
            g = phi - previous
            m = (beta * m + g / lam).clamp(-c, c)
            phi = step(phi, m, g / lam)
        expected_phis.append(phi.clone())
        previous = mean
    for res in results:
        assert res["pending"]  # the last round's all-reduce was still outstanding at the end
        torch.testing.assert_close(res["phis"][0], res["phi0"], rtol=0, atol=0)  # round 1 changes nothing
        for got, want in zip(res["phis"], expected_phis):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert max(float(mm.abs().max()) for mm in res["moms"]) <= c + 1e-7
        assert res["bytes"] == res["formula"]
        torch.testing.assert_close(res["final"], results[0]["final"], rtol=0, atol=0)
    # finish() applied the last round too (its progress is not lost)
    g_last = phi - previous
    m_last = (beta * m + g_last / lam).clamp(-c, c)
    torch.testing.assert_close(results[0]["phi_final"], step(phi, m_last, g_last / lam), rtol=1e-5, atol=1e-6)


def test_co2_clipping_really_bounds_the_momentum() -> None:
    def run(clip: float) -> CO2:
        model = tiny_model(seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        strategy = CO2(model, opt, Comm(), sync_every=2, outer_lr=1.0, outer_momentum=0.9, clip_threshold=clip)
        strategy.setup()
        peaks = []
        run_loop(strategy, model, opt, 0, 0, 12, on_step=lambda s: peaks.append(float(strategy.momentum.abs().max())))
        strategy.peak = max(peaks)
        return strategy

    unclipped = run(clip=1e6)
    assert unclipped.peak > 0.01  # without clipping the momentum grows past the threshold below
    clipped = run(clip=0.01)
    assert clipped.peak <= 0.01 + 1e-7
    assert clipped.metrics()["outer_momentum_clipped_fraction"] > 0


def _co2_resume(rank: int, world_size: int) -> dict:
    def make(seed: int):
        model = tiny_model(seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, CO2(model, opt, Comm(), sync_every=2, outer_lr=1.0, outer_momentum=0.5)

    model, opt, strategy = make(0)
    strategy.setup()
    run_loop(strategy, model, opt, rank, 0, 5)  # after round 2: round 2's all-reduce is in flight
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "algo": strategy.state_dict()})
    run_loop(strategy, model, opt, rank, 5, 10)
    strategy.finish()
    model2, opt2, strategy2 = make(3)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    strategy2.load_state_dict(saved["algo"])
    strategy2.setup()
    run_loop(strategy2, model2, opt2, rank, 5, 10)
    strategy2.finish()
    return {"pending_saved": saved["algo"]["pending_mean"] is not None, "a": flat_params(model), "b": flat_params(model2)}


@pytest.mark.multiproc
def test_co2_state_dict_keeps_the_pending_round(rank_pool) -> None:
    for res in rank_pool.run(_co2_resume, 2):
        assert res["pending_saved"]
        torch.testing.assert_close(res["b"], res["a"], rtol=0, atol=0)


def _format1_state(n: int) -> dict:
    """What a version before the parameter-mean exchange saved after round 2: its pending result was
    the workers' mean Δ̄ from the round's start."""
    gen = torch.Generator().manual_seed(7)
    return {"format": 1, "algorithm": "co2", "outer_params": torch.randn(n, generator=gen),
            "momentum": 0.01 * torch.randn(n, generator=gen), "pending_average": 0.05 * torch.randn(n, generator=gen),
            "steps_since_sync": 0, "rounds": 2, "updates": 1}


def test_co2_reads_a_format_1_checkpoint_and_applies_its_pending_round_as_that_version_would() -> None:
    model = tiny_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = CO2(model, opt, Comm(), sync_every=2, outer_lr=0.5, outer_momentum=0.5, staleness_penalty=2.0)
    old = _format1_state(num_parameters(model))
    strategy.load_state_dict(copy.deepcopy(old))
    strategy.setup()
    assert strategy.state_dict()["format"] == 2 and "pending_average" not in strategy.state_dict()
    run_loop(strategy, model, opt, 0, 4, 6)  # round 3 ends: it applies round 2, saved as a Δ̄
    m = 0.5 * old["momentum"] + old["pending_average"] / 2.0  # that version's rule: g = Δ̄
    torch.testing.assert_close(strategy.momentum, m.clamp(-1.0, 1.0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(strategy.outer_params, old["outer_params"] - 0.5 * m, rtol=1e-6, atol=1e-7)
    assert (strategy.rounds, strategy.updates) == (3, 2)


def test_co2_refuses_a_state_format_it_does_not_know_and_keeps_its_own() -> None:
    model = tiny_model(seed=0)
    strategy = CO2(model, None, Comm(), sync_every=2, outer_lr=1.0, outer_momentum=0.5)
    before = strategy.outer_params.clone()
    state = {**_format1_state(num_parameters(model)), "format": 9}
    with pytest.raises(ValueError, match="co2 state format 9 is not supported"):
        strategy.load_state_dict(state)
    torch.testing.assert_close(strategy.outer_params, before, rtol=0, atol=0)


# ------------------------------------------------------------- NoLoCo parameters from the spec


def test_noloco_spec_passes_mean_pull_and_group_seed_to_the_strategy() -> None:
    from loco_trainer.algorithms import make_strategy
    from loco_contract.config import AlgorithmSpec

    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spec = AlgorithmSpec.model_validate({"name": "noloco", "meanPull": 0.25, "groupSeed": 7, "outerLr": 0.9})
    strategy = make_strategy(spec, model, opt, Comm())
    assert isinstance(strategy, NoLoCo)
    assert (strategy.mean_pull, strategy.seed, strategy.outer_lr) == (0.25, 7, 0.9)
    # unset: gamma follows the (resolved) outer lr, the group seed is 0
    follows = make_strategy(AlgorithmSpec.model_validate({"name": "noloco", "outerLr": 0.4}), model, opt, Comm())
    assert (follows.mean_pull, follows.seed) == (0.4, 0)
    assert AlgorithmSpec.model_validate({"name": "noloco"}).resolved().mean_pull == 0.7


@pytest.mark.parametrize("bad, words", [
    ({"name": "diloco", "meanPull": 0.5}, ["meanPull", "noloco", "remove"]),
    ({"name": "co2", "groupSeed": 3}, ["groupSeed", "noloco"]),
    ({"name": "noloco", "meanPull": -0.1}, ["meanPull", "greater than or equal to 0"]),
    ({"name": "noloco", "groupSeed": -1}, ["groupSeed", "greater than or equal to 0"]),
])
def test_noloco_parameters_are_refused_where_they_do_not_apply(bad, words) -> None:
    from pydantic import ValidationError

    from loco_contract.config import AlgorithmSpec

    with pytest.raises(ValidationError) as err:
        AlgorithmSpec.model_validate(bad)
    text = str(err.value)
    assert all(w in text for w in words), text


def _noloco_from_spec(rank: int, world_size: int, group_seed: int, mean_pull: float) -> dict:
    from loco_trainer.algorithms import make_strategy
    from loco_contract.config import AlgorithmSpec

    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spec = AlgorithmSpec.model_validate({"name": "noloco", "syncEvery": 1, "outerLr": 0.7, "outerMomentum": 0.5,
                                         "meanPull": mean_pull, "groupSeed": group_seed})
    strategy = make_strategy(spec, model, opt, Comm())
    strategy.setup()
    groups = []
    for step in range(3):
        x, y = tiny_batch(step, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        strategy.after_inner_step(step)
        groups.append(strategy.last_group)
    return {"groups": groups, "spread": strategy.last_spread, "phi": torch.cat([o.reshape(-1) for o in strategy.outer_params])}


@pytest.mark.multiproc
def test_noloco_group_seed_and_mean_pull_from_the_spec_drive_the_gossip(rank_pool) -> None:
    n = 4
    seeds = (0, 11)
    assert [gossip_groups(n, 2, r, seed=seeds[0]) for r in (1, 2, 3)] != [gossip_groups(n, 2, r, seed=seeds[1]) for r in (1, 2, 3)]
    for seed in seeds:
        for rank, res in enumerate(rank_pool.run(_noloco_from_spec, n, (seed, 0.7))):
            expected = [next(g for g in gossip_groups(n, 2, r, seed=seed) if rank in g) for r in (1, 2, 3)]
            assert res["groups"] == expected
    # gamma reaches the update: the same run without the pull towards the group mean ends elsewhere
    pulled = rank_pool.run(_noloco_from_spec, n, (0, 0.7))
    free = rank_pool.run(_noloco_from_spec, n, (0, 0.0))
    assert not torch.equal(pulled[0]["phi"], free[0]["phi"])
