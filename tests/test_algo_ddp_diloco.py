"""DDP and DiLoCo on real gloo ranks: equivalences, synchronisation points, checkpoints, membership."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_helpers import rank_pool, flat_params, run_loop, single_process_reference, tiny_batch, tiny_model
from loco_trainer.algorithms import ALGORITHMS, DDP, DiLoCo, make_strategy, num_parameters
from loco_trainer.comm import Comm
from loco_contract.config import AlgorithmSpec

STEPS = 6


def _ddp(rank: int, world_size: int, use_wrap: bool) -> dict:
    model = tiny_model(seed=rank)  # different on every rank: setup() must make them equal
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    comm = Comm()
    strategy = DDP(model, opt, comm)
    strategy.setup()
    if not use_wrap:
        strategy.wrap = lambda m: m  # the loop runs the bare model: after_backward averages
    run_loop(strategy, model, opt, rank, 0, STEPS)
    out = {"params": flat_params(model), "stats": comm.stats(), "hooked": strategy._hook_calls > 0}
    if rank == 0:  # single-process reference on the concatenated batch of all ranks
        def concatenated(step: int) -> tuple:
            xs, ys = zip(*(tiny_batch(step, r) for r in range(world_size)))
            return torch.cat(xs), torch.cat(ys)

        out["reference"] = single_process_reference(lambda ps: torch.optim.AdamW(ps, lr=1e-2), concatenated, STEPS)
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("use_wrap", [True, False], ids=["comm-hook", "flat-fallback"])
def test_ddp_matches_single_process_on_the_concatenated_batch(rank_pool, use_wrap: bool) -> None:
    results = rank_pool.run(_ddp, 2, args=(use_wrap,))
    assert results[0]["hooked"] is use_wrap and results[1]["hooked"] is use_wrap
    torch.testing.assert_close(results[0]["params"], results[1]["params"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["params"], results[0]["reference"], rtol=1e-5, atol=1e-6)
    n_params = num_parameters(tiny_model())
    expected = DDP(tiny_model(), None, Comm()).bytes_per_inner_step(n_params, 2) * STEPS
    assert results[0]["stats"]["by_kind"]["all_reduce"]["bytes_sent"] == expected
    # setup() broadcast the parameters through Comm: rank 0 sent them, rank 1 received them
    assert results[1]["stats"]["by_kind"]["broadcast"]["bytes_received"] == 4 * n_params


def _diloco_vs_ddp(rank: int, world_size: int) -> dict:
    comm = Comm()
    ddp_model = tiny_model(seed=0)
    ddp_opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    ddp = DDP(ddp_model, ddp_opt, comm)
    ddp.setup()
    run_loop(ddp, ddp_model, ddp_opt, rank, 0, STEPS)

    model = tiny_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # SGD: with AdamW the two are NOT equal
    dcomm = Comm()
    diloco = DiLoCo(model, opt, dcomm, sync_every=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    diloco.setup()
    run_loop(diloco, model, opt, rank, 0, STEPS)
    diloco.finish()
    return {"ddp": flat_params(ddp_model), "diloco": flat_params(model), "outer_steps": diloco.outer_steps,
            "bytes": dcomm.stats()["by_kind"]["all_reduce"]["bytes_sent"]}


@pytest.mark.multiproc
def test_diloco_with_h1_lr1_no_momentum_equals_ddp_with_inner_sgd(rank_pool) -> None:
    results = rank_pool.run(_diloco_vs_ddp, 2)
    for res in results:
        torch.testing.assert_close(res["diloco"], res["ddp"], rtol=1e-5, atol=1e-6)
        assert res["outer_steps"] == STEPS
    # a sanity check that training moved the parameters at all (so the equality is not vacuous)
    assert not torch.allclose(results[0]["ddp"], flat_params(tiny_model(seed=0)))
    n = num_parameters(tiny_model())
    assert results[0]["bytes"] == STEPS * 4 * n  # 2(n-1)/n * 4N per round, n = 2


def _diloco_rounds(rank: int, world_size: int, steps: int, h: int) -> dict:
    model = tiny_model(seed=rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    comm = Comm()
    spec = AlgorithmSpec(name="diloco", sync_every=h)  # outer lr 0.7, momentum 0.9, Nesterov (defaults)
    strategy = make_strategy(spec, model, opt, comm)
    strategy.setup()
    history = []
    run_loop(strategy, model, opt, rank, 0, steps, on_step=lambda s: history.append(flat_params(model)))
    strategy.finish()
    return {"history": history, "final": flat_params(model), "outer_steps": strategy.outer_steps,
            "global": torch.cat([g.reshape(-1) for g in strategy.global_params]), "stats": comm.stats()}


@pytest.mark.multiproc
def test_diloco_ranks_agree_right_after_each_sync_and_drift_between(rank_pool) -> None:
    steps, h = 8, 3  # syncs after steps 2 and 5; finish() syncs the partial round (steps 6, 7)
    results = rank_pool.run(_diloco_rounds, 3, args=(steps, h))
    for step in range(steps):
        same = all(torch.equal(results[0]["history"][step], r["history"][step]) for r in results[1:])
        assert same is ((step + 1) % h == 0), f"step {step}: ranks identical={same}"
    for r in results:
        assert r["outer_steps"] == 3
        torch.testing.assert_close(r["final"], results[0]["final"], rtol=0, atol=0)
        torch.testing.assert_close(r["final"], r["global"], rtol=0, atol=0)
        assert r["stats"]["by_kind"]["all_reduce"]["calls"] == 3  # one bucket per round


def _diloco_resume(rank: int, world_size: int) -> dict:
    h, cut, steps = 3, 4, 10  # checkpoint mid-round, with outer momentum already built up
    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    strategy = DiLoCo(model, opt, Comm(), sync_every=h, outer_lr=0.7, outer_momentum=0.9)
    strategy.setup()
    run_loop(strategy, model, opt, rank, 0, cut)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "algo": strategy.state_dict()})
    run_loop(strategy, model, opt, rank, cut, steps)
    strategy.finish()
    uninterrupted = flat_params(model)

    model2 = tiny_model(seed=123)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    strategy2 = DiLoCo(model2, opt2, Comm(), sync_every=h, outer_lr=0.7, outer_momentum=0.9)
    strategy2.load_state_dict(saved["algo"])
    strategy2.setup()
    run_loop(strategy2, model2, opt2, rank, cut, steps)
    strategy2.finish()
    return {"uninterrupted": uninterrupted, "resumed": flat_params(model2)}


@pytest.mark.multiproc
def test_diloco_state_dict_round_trip_reproduces_the_run(rank_pool) -> None:
    for res in rank_pool.run(_diloco_resume, 2):
        torch.testing.assert_close(res["resumed"], res["uninterrupted"], rtol=0, atol=0)


def _membership(rank: int, world_size: int) -> dict:
    old = Comm.from_ranks([0, 1])
    alone = Comm.from_ranks([2])  # the newcomer's group of one until it joins
    model = tiny_model(seed=rank if rank < 2 else 99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    strategy = DiLoCo(model, opt, old if rank < 2 else alone, sync_every=2, outer_lr=0.7, outer_momentum=0.9)
    strategy.setup()
    if rank < 2:
        run_loop(strategy, model, opt, rank, 0, 4)  # two rounds on two workers
    before = torch.cat([g.reshape(-1) for g in strategy.global_params])
    strategy.on_membership_change(Comm())  # all three, at a round boundary
    joined = flat_params(model)
    momentum = torch.cat([b.reshape(-1) for b in strategy._momentum_buffers()])
    run_loop(strategy, model, opt, rank, 4, 6)
    return {"before": before, "joined": joined, "momentum": momentum, "after": flat_params(model)}


@pytest.mark.multiproc
def test_diloco_accepts_a_new_member_at_a_round_boundary(rank_pool) -> None:
    results = rank_pool.run(_membership, 3)
    survivors_global = results[0]["before"]
    for r in results:
        torch.testing.assert_close(r["joined"], survivors_global, rtol=0, atol=0)
        torch.testing.assert_close(r["momentum"], results[0]["momentum"], rtol=0, atol=0)
        torch.testing.assert_close(r["after"], results[0]["after"], rtol=0, atol=0)
    assert results[0]["momentum"].abs().sum() > 0  # the survivors' momentum travelled, not zeros


# ------------------------------------------------------------------------ single process


def test_diloco_outer_step_sign_and_nesterov_match_the_formula() -> None:
    """One worker (a group of one): Δ = θ − θ₁, v ← μv + Δ, θ ← θ − η(Δ + μv)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    eta, mu = 0.5, 0.9
    strategy = DiLoCo(model, opt, Comm(), sync_every=1, outer_lr=eta, outer_momentum=mu, nesterov=True)
    strategy.setup()
    theta = model.weight.detach().clone()
    v = torch.zeros_like(theta)
    for step in range(3):
        grad = torch.full_like(theta, float(step + 1))
        model.weight.grad = grad.clone()
        opt.step()
        opt.zero_grad()
        strategy.after_inner_step(step)
        delta = theta - (theta - grad)  # the worker moved by -grad, so Δ = +grad
        v = mu * v + delta
        theta = theta - eta * (delta + mu * v)
        torch.testing.assert_close(model.weight.detach(), theta)
    # moving opposite to the local direction would be the sign bug: the local step was downhill
    assert (theta < model.weight.detach() + 1e-6).all()


def test_diloco_finish_syncs_only_a_partial_round() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = DiLoCo(model, opt, Comm(), sync_every=4, outer_lr=0.7, outer_momentum=0.9)
    strategy.setup()
    run_loop(strategy, model, opt, 0, 0, 8)
    strategy.finish()
    assert strategy.outer_steps == 2  # 8 steps = 2 full rounds: finish() adds nothing
    run_loop(strategy, model, opt, 0, 8, 9)
    strategy.finish()
    assert strategy.outer_steps == 3 and strategy.steps_since_sync == 0


def test_registry_builds_every_algorithm_from_its_resolved_spec() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    for name, cls in ALGORITHMS.items():
        strategy = make_strategy(AlgorithmSpec(name=name), model, opt, Comm())
        assert isinstance(strategy, cls) and strategy.name == name
    diloco = make_strategy(AlgorithmSpec(name="diloco", sync_every=7), model, opt, Comm())
    assert (diloco.sync_every, diloco.outer_lr, diloco.outer_momentum, diloco.nesterov) == (7, 0.7, 0.9, True)


def test_bad_settings_and_mismatched_checkpoints_are_refused() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="sync_every"):
        DiLoCo(model, opt, Comm(), sync_every=0, outer_lr=0.7, outer_momentum=0.9)
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCo(model, opt, Comm(), sync_every=2, outer_lr=0.7, outer_momentum=1.0)
    state = DiLoCo(model, opt, Comm(), sync_every=2, outer_lr=0.7, outer_momentum=0.9).state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    target = DiLoCo(other, torch.optim.AdamW(other.parameters()), Comm(), sync_every=2, outer_lr=0.7, outer_momentum=0.9)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(16, 8\).*\(32, 8\)"):
        target.load_state_dict(state)
    with pytest.raises(ValueError, match="algorithm state of 'ddp'"):
        target.load_state_dict({**state, "algorithm": "ddp"})
