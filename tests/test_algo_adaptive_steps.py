"""Heterogeneity-aware local steps (algorithm.adaptiveSteps): the pure rule, and DiLoCo with it on real gloo ranks."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dist_helpers import flat_params, rank_pool, tiny_batch, tiny_model  # noqa: F401 (fixture)
from loco_trainer.algorithms import DiLoCo, make_strategy
from loco_trainer.algorithms.adaptive_steps import (StepClock, computes, outer_weights, plan_local_steps,
                                                    steady_step_seconds, steps_taken)
from loco_trainer.comm import Comm
from loco_contract.config import AlgorithmSpec

# ------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize("h,local", [(10, 10), (10, 5), (10, 3), (10, 1), (7, 4), (50, 25), (50, 17)])
def test_a_worker_computes_its_share_spread_over_the_round_and_the_last_position(h: int, local: int) -> None:
    computed = [j for j in range(h) if computes(j, local, h)]
    assert len(computed) == local
    assert computed[-1] == h - 1  # the position the outer step follows is always a computed one
    for j in range(h + 1):  # by every point of the round it has done its share so far, never more
        assert steps_taken(j, local, h) == sum(1 for c in computed if c < j)
        assert abs(steps_taken(j, local, h) - j * local / h) < 1
    if local < h:
        assert 0 not in computed  # spread out: not bunched at the round's start


def test_outer_weights_make_the_average_step_weighted_and_are_exactly_one_when_equal() -> None:
    assert outer_weights([10, 10, 10]) == [1.0, 1.0, 1.0]
    w = outer_weights([10, 10, 5])
    assert w == pytest.approx([1.2, 1.2, 0.6])
    assert sum(w) == pytest.approx(3)  # the average of the weighted terms is sum(T_i d_i) / sum(T)
    assert outer_weights([0, 0]) == [1.0, 1.0]


def test_plan_gives_a_slower_worker_proportionally_fewer_steps_within_bounds() -> None:
    plan = lambda times, now=(50, 50, 50, 50), **kw: plan_local_steps(  # noqa: E731
        times, list(now), sync_every=50, min_steps=kw.get("min_steps", 12), tolerance=kw.get("tolerance", 0.1))
    assert plan([1.0, 1.0, 1.0, 2.0]) == [50, 50, 50, 25]
    assert plan([1.0, 1.05, 0.98, 1.08]) == [50, 50, 50, 50]  # within the tolerance of the fastest: full rounds
    assert plan([1.0, 1.0, 1.0, 10.0]) == [50, 50, 50, 12]  # never below minSteps
    assert plan([1.0, 1.0, 1.0, 10.0], min_steps=1) == [50, 50, 50, 5]
    assert plan([0.5, 1.0, 1.0, 1.0]) == [50, 25, 25, 25]  # the fastest sets the pace
    # hysteresis: a change within tolerance*H of the current count is noise; a return to H always applies
    assert plan([1.0, 1.0, 1.0, 2.1], now=(50, 50, 50, 25)) == [50, 50, 50, 25]
    assert plan([1.0, 1.0, 1.0, 3.0], now=(50, 50, 50, 25)) == [50, 50, 50, 16]
    assert plan([1.0, 1.0, 1.0, 1.0], now=(50, 50, 50, 25)) == [50, 50, 50, 50]
    # a worker without a measurement leaves the plan as it is (every rank decides from the same numbers)
    assert plan([1.0, 0.0, 1.0, 2.0], now=(50, 40, 50, 50)) == [50, 40, 50, 50]
    with pytest.raises(ValueError, match="3 step times for 4 workers"):
        plan([1.0, 1.0, 1.0])


def test_a_worker_s_step_time_is_its_median_over_the_last_rounds() -> None:
    assert steady_step_seconds([]) == []
    assert steady_step_seconds([[1.0, 2.0]]) == [1.0, 2.0]  # the first round counts at once
    # worker 1 slow for one round only (a passing neighbour): no change; worker 0 slow for two of three: it is
    assert steady_step_seconds([[1.0, 1.0], [1.0, 1.8], [1.0, 1.0]]) == [1.0, 1.0]
    assert steady_step_seconds([[1.0, 1.0], [2.0, 1.0], [2.0, 1.0]]) == [2.0, 1.0]
    assert steady_step_seconds([[0.0, 1.0], [0.0, 1.0]]) == [0.0, 1.0]  # never measured: unknown


def test_step_clock_measures_computed_steps_only_and_never_across_a_round() -> None:
    clock = StepClock()
    clock.restart(0.0)  # end of the outer step
    for now, computed in [(2.0, True), (2.01, False), (4.0, True), (4.02, False), (6.1, True)]:
        clock.note(now, computed)
    assert clock.samples == pytest.approx([2.0, 1.99, 2.08])
    assert clock.median() == pytest.approx(2.0)
    clock.restart(None)  # a new group: the first interval is not known
    clock.note(9.0, True)
    assert clock.samples == [] and clock.median() == 0.0


def test_adaptive_steps_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="'adaptiveSteps' does not apply to algorithm 'noloco'"):
        AlgorithmSpec.model_validate({"name": "noloco", "adaptiveSteps": {}})
    with pytest.raises(ValueError, match=r"'adaptiveSteps.minSteps' \(60\) must be <= syncEvery \(50\)"):
        AlgorithmSpec.model_validate({"name": "diloco", "adaptiveSteps": {"minSteps": 60}})
    with pytest.raises(ValueError, match="tolerance"):
        AlgorithmSpec.model_validate({"name": "diloco", "adaptiveSteps": {"tolerance": 2}})
    resolved = AlgorithmSpec.model_validate({"name": "diloco", "syncEvery": 40, "adaptiveSteps": {}}).resolved()
    assert (resolved.adaptive_steps.min_steps, resolved.adaptive_steps.tolerance) == (10, 0.2)
    with pytest.raises(ValueError, match=r"min_steps must be in \[1, sync_every=4\]"):
        DiLoCo(tiny_model(), None, SimpleNamespace(world_size=1, rank=0), sync_every=4, outer_lr=0.7, outer_momentum=0.9,
               adaptive_steps=(5, 0.1))


# ------------------------------------------------------------------------------ DiLoCo on ranks


class _FakeClock:
    """Seconds that pass only while a step is computed: ``dt`` per computed step (a worker's speed)."""

    def __init__(self, dt: float) -> None:
        self.dt, self.now = dt, 0.0

    def __call__(self) -> float:
        return self.now


class _Spy(DiLoCo):
    """DiLoCo that keeps each rank's parameters right before every outer step."""

    def sync(self) -> None:
        self.before_sync.append(flat_params(self.model))
        super().sync()


def _loop(strategy, model, opt, clock: _FakeClock, rank: int, start: int, stop: int) -> list[bool]:
    computed = []
    for step in range(start, stop):
        took = strategy.takes_step(step)
        computed.append(took)
        if took:
            clock.now += clock.dt
            x, y = tiny_batch(step, rank)
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        strategy.after_inner_step(step)
    return computed


def _run(rank: int, world_size: int, adaptive: bool, speeds: list[float], steps: int, h: int) -> dict:
    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    clock = _FakeClock(speeds[rank])
    kwargs = {"adaptive_steps": (2, 0.1), "clock": clock} if adaptive else {}
    strategy = _Spy(model, opt, Comm(), sync_every=h, outer_lr=0.7, outer_momentum=0.9, **kwargs)
    strategy.before_sync = []
    strategy.setup()
    computed = _loop(strategy, model, opt, clock, rank, 0, steps)
    strategy.finish()
    return {"final": flat_params(model), "computed": computed, "local_steps": list(strategy.local_steps),
            "before_sync": strategy.before_sync, "state": strategy.state_dict(), "metrics": strategy.metrics()}


@pytest.mark.multiproc
def test_adaptive_steps_at_equal_speeds_is_diloco_bit_for_bit(rank_pool) -> None:
    plain = rank_pool.run(_run, 3, args=(False, [1.0, 1.0, 1.0], 12, 4))
    adaptive = rank_pool.run(_run, 3, args=(True, [1.0, 1.0, 1.0], 12, 4))
    for a, p in zip(adaptive, plain):
        assert all(a["computed"]) and a["local_steps"] == [4, 4, 4]
        torch.testing.assert_close(a["final"], p["final"], rtol=0, atol=0)


@pytest.mark.multiproc
def test_a_slow_worker_takes_fewer_steps_and_the_outer_step_weights_by_steps_taken(rank_pool) -> None:
    h = 8
    results = rank_pool.run(_run, 3, args=(True, [1.0, 1.0, 2.0], 3 * h, h))
    for r in results:  # every rank planned the same from the exchanged step times
        assert r["local_steps"] == [8, 8, 4]
        assert r["state"]["local_steps"] == [8, 8, 4]
        assert r["state"]["step_seconds"] == pytest.approx([1.0, 1.0, 2.0])
    assert results[2]["metrics"]["local_steps"] == 4.0 and results[0]["metrics"]["local_steps"] == 8.0
    # round 1 is measured at full length; from round 2 on the slow worker computes half the positions
    assert results[2]["computed"][:h] == [True] * h
    assert results[2]["computed"][h:2 * h] == [False, True] * (h // 2)
    assert all(results[0]["computed"])
    # outer lr 0.7 with momentum: check round 2's average through the recorded parameters. With the same global
    # start on every rank, the weighted mean outer gradient is g - sum(T_i theta_i) / sum(T).
    taken = [8, 8, 4]
    weighted = sum(t * r["before_sync"][1] for t, r in zip(taken, results)) / sum(taken)
    plain = sum(r["before_sync"][1] for r in results) / 3
    got = _replay_round_two(results, weighted)
    torch.testing.assert_close(results[0]["final"], got, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_replay_round_two(results, plain), got, rtol=1e-5, atol=1e-6)


def _replay_round_two(results: list[dict], mean_after_round_two: torch.Tensor) -> torch.Tensor:
    """The global parameters after round 3, recomputed with SGD(0.7, momentum 0.9, Nesterov) from the recorded
    local parameters, given round 2's averaged parameters ``mean_after_round_two`` (weights for round 3 known)."""
    g = tiny_model(seed=0)
    g = flat_params(g)
    opt_param = torch.nn.Parameter(g.clone())
    opt = torch.optim.SGD([opt_param], lr=0.7, momentum=0.9, nesterov=True)
    means = [sum(r["before_sync"][0] for r in results) / 3, mean_after_round_two,
             sum(t * r["before_sync"][2] for t, r in zip([8, 8, 4], results)) / 20]
    for mean in means:
        opt_param.grad = opt_param.detach() - mean
        opt.step()
    return opt_param.detach()


def _resume(rank: int, world_size: int) -> dict:
    first = _run(rank, world_size, True, [1.0, 2.0], 8, 4)
    model = tiny_model(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    same = DiLoCo(model, opt, Comm(), sync_every=4, outer_lr=0.7, outer_momentum=0.9, adaptive_steps=(1, 0.1))
    same.load_state_dict(copy.deepcopy(first["state"]))
    alone = DiLoCo(model, opt, Comm.from_ranks([rank]), sync_every=4, outer_lr=0.7, outer_momentum=0.9,
                   adaptive_steps=(1, 0.1))
    alone.load_state_dict(copy.deepcopy(first["state"]))
    return {"same": same.local_steps, "alone": alone.local_steps}


@pytest.mark.multiproc
def test_the_plan_survives_a_checkpoint_at_the_same_world_size_only(rank_pool) -> None:
    for r in rank_pool.run(_resume, 2):
        assert r["same"] == [4, 2]
        assert r["alone"] == [4]  # another world size: every worker takes H until measured again


def test_the_registry_passes_adaptive_steps_from_the_spec() -> None:
    spec = AlgorithmSpec.model_validate({"name": "diloco", "syncEvery": 20, "adaptiveSteps": {"tolerance": 0.2}})
    comm = SimpleNamespace(world_size=1, rank=0)  # one worker: the strategy sends nothing here
    strategy = make_strategy(spec, tiny_model(), torch.optim.SGD(tiny_model().parameters(), lr=0.1), comm)
    assert strategy.adaptive == (5, 0.2) and strategy.local_steps == [20]
