"""DiLoCo, Streaming DiLoCo, NoLoCo and CO2 accept a new membership at a sync boundary without
restarting the survivors.

Real gloo ranks (4 per scenario): 3 workers train a few rounds, then a 4th joins, or 4 train and one
leaves. Checked: the survivors' parameters are continuous across the switch (NoLoCo: untouched; CO2:
exactly the drained pending round, by the formula), a joiner holds what the documented rule says at
its first outer step, training goes on over the new group, and no call involves the departed rank.
"""

from __future__ import annotations

import pytest
import torch

from dist_helpers import rank_pool, flat_params, run_loop, tiny_model
from loco_trainer.algorithms import CO2, DDP, DiLoCo, NoLoCo, StreamingDiLoCo
from loco_trainer.algorithms.base import membership_roles
from loco_trainer.algorithms.noloco import gossip_groups
from loco_trainer.comm import Comm, flatten

H = 2
ALPHA, BETA, GAMMA = 0.7, 0.5, 0.7  # NoLoCo α, β, γ
ETA, MU, LAMBDA, CLIP = 0.5, 0.5, 1.0, 1.0  # CO2 η, β, λ, c


def _noloco(model, comm, init_sync: bool = True) -> NoLoCo:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return NoLoCo(model, opt, comm, sync_every=H, outer_lr=ALPHA, outer_momentum=BETA, mean_pull=GAMMA, seed=3,
                  init_sync=init_sync, nesterov=False), opt


def _noloco_state(s: NoLoCo) -> dict:
    return {"phi": flatten(s.outer_params).clone(), "m": flatten(s.momentum).clone(), "theta": flat_params(s.model)}


def _spy_gossip(strategy: NoLoCo, log: list) -> None:
    """Record (θ, φ, m) right before each gossip round and the group it used."""
    original = strategy.gossip

    def spy(round_index: int) -> None:
        before = _noloco_state(strategy)
        original(round_index)
        log.append({**before, "round": round_index, "group": list(strategy.last_group), "after": flat_params(strategy.model)})

    strategy.gossip = spy


def _expected_noloco(results: list[dict], rank: int, entry: int) -> torch.Tensor:
    """θᵢ after the logged gossip round ``entry``, by the paper's rule (``nesterov=False``, module docstring)."""
    me = results[rank]["log"][entry]
    group = me["group"]
    phis = torch.stack([results[j]["log"][entry]["phi"] for j in group])
    deltas = torch.stack([results[j]["log"][entry]["theta"] - results[j]["log"][entry]["phi"] for j in group])
    m = BETA * me["m"] + ALPHA * deltas.mean(0) + GAMMA * (phis.mean(0) - me["phi"])
    return me["phi"] + m


def _noloco_join(rank: int, world_size: int) -> dict:
    old = Comm.from_ranks([0, 1, 2])
    alone = Comm.from_ranks([3])  # the newcomer's group of one until it joins
    model = tiny_model(seed=rank if rank < 3 else 99)
    # no initial broadcast: the replicas start apart and stay apart (three ranks gossip as one group,
    # which would otherwise keep them identical), so "the joiner holds rank 0's state" is a real check
    strategy, opt = _noloco(model, old if rank < 3 else alone, init_sync=False)
    strategy.setup()
    if rank < 3:
        run_loop(strategy, model, opt, rank, 0, 2 * H)  # two gossip rounds on three workers
    before = _noloco_state(strategy)
    new = Comm()
    strategy.on_membership_change(new, src=0)  # all four, at a round boundary; rank 3 joins
    joined = _noloco_state(strategy)
    log: list = []
    _spy_gossip(strategy, log)
    run_loop(strategy, model, opt, rank, strategy.t, strategy.t + 2 * H)  # two more rounds, four workers
    return {"before": before, "joined": joined, "log": log, "t": strategy.t, "rounds": strategy.rounds,
            "records": [(r.kind, r.peer) for r in new.records()]}


@pytest.mark.multiproc
def test_noloco_accepts_a_joiner_at_a_round_boundary(rank_pool) -> None:
    results = rank_pool.run(_noloco_join, 4, timeout_s=120)
    survivors = results[:3]
    # NoLoCo replicas differ (so "equals rank 0" below is not vacuous)
    assert not torch.equal(survivors[0]["before"]["theta"], survivors[1]["before"]["theta"])
    for r in survivors:  # continuous: nothing reset or replaced
        for key in ("phi", "m", "theta"):
            torch.testing.assert_close(r["joined"][key], r["before"][key], rtol=0, atol=0)
    joiner = results[3]
    assert not torch.equal(joiner["before"]["theta"], survivors[0]["before"]["theta"])
    for key in ("phi", "m", "theta"):  # the joiner adopted src's (rank 0's) φ and m, θ = φ
        torch.testing.assert_close(joiner["joined"][key], survivors[0]["before"]["phi" if key == "theta" else key],
                                   rtol=0, atol=0)
    assert joiner["t"] == survivors[0]["t"] == 4 * H and joiner["rounds"] == survivors[0]["rounds"] == 4
    # the next rounds gossip over the four new ranks with the (seed, round) rule, by the formula
    for entry in range(2):
        round_index = results[0]["log"][entry]["round"]
        groups = gossip_groups(4, 2, round_index, seed=3)
        for rank, r in enumerate(results):
            assert r["log"][entry]["round"] == round_index
            assert r["log"][entry]["group"] == next(g for g in groups if rank in g)
            torch.testing.assert_close(r["log"][entry]["after"], _expected_noloco(results, rank, entry),
                                       rtol=1e-5, atol=1e-6)
    # only src sent the state, only to the joiner; the other survivors just took part in the roles' all_gather
    assert results[0]["records"][:2] == [("all_gather", None), ("send", 3)]
    assert joiner["records"][:2] == [("all_gather", None), ("recv", 0)]
    assert results[1]["records"][0] == ("all_gather", None) and results[1]["records"][1][0] != "recv"


def _noloco_leave(rank: int, world_size: int) -> dict:
    old = Comm()
    new = Comm.from_ranks([0, 1, 2])  # every rank takes part in creating the group (a torch rule)
    model = tiny_model(seed=rank)
    strategy, opt = _noloco(model, old)
    strategy.setup()
    run_loop(strategy, model, opt, rank, 0, 2 * H)
    if rank == 3:
        return {"left": True}  # the departing worker just stops: NoLoCo has nothing in flight
    before = _noloco_state(strategy)
    old_calls = len(old.records())
    strategy.on_membership_change(new)
    joined = _noloco_state(strategy)
    log: list = []
    _spy_gossip(strategy, log)
    run_loop(strategy, model, opt, rank, 2 * H, 4 * H)
    return {"before": before, "joined": joined, "log": log, "old_calls": (old_calls, len(old.records())),
            "peers": [r.peer for r in new.records() if r.peer is not None], "world": new.world_size}


@pytest.mark.multiproc
def test_noloco_survivors_go_on_without_a_departed_worker(rank_pool) -> None:
    results = rank_pool.run(_noloco_leave, 4, timeout_s=120)[:3]
    for rank, r in enumerate(results):
        for key in ("phi", "m", "theta"):
            torch.testing.assert_close(r["joined"][key], r["before"][key], rtol=0, atol=0)
        assert r["world"] == 3 and r["old_calls"][0] == r["old_calls"][1]  # the old group is never used again
        assert set(r["peers"]) <= {0, 1, 2}
        for entry in range(2):
            assert r["log"][entry]["group"] == [0, 1, 2]  # three ranks, G = 2: one group of three
            torch.testing.assert_close(r["log"][entry]["after"], _expected_noloco(results, rank, entry),
                                       rtol=1e-5, atol=1e-6)
        assert not torch.equal(r["log"][-1]["after"], r["joined"]["theta"])  # training went on


# --------------------------------------------------------------------------------- CO2


def _co2(model, comm) -> CO2:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return CO2(model, opt, comm, sync_every=H, outer_lr=ETA, outer_momentum=MU, staleness_penalty=LAMBDA,
               clip_threshold=CLIP), opt


def _co2_drained(phi: torch.Tensor, m: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """φ, m after applying the pending mean parameters x̄, by the module docstring's rule (g = φ − x̄)."""
    m = (MU * m + (phi - mean) / LAMBDA).clamp(-CLIP, CLIP)
    return phi - ETA * m, m


def _co2_members(rank: int, world_size: int, mode: str) -> dict:
    """mode "join": ranks 0-2 train, rank 3 joins; mode "leave": 0-3 train, rank 3 leaves."""
    if mode == "join":
        old = Comm.from_ranks([0, 1, 2])
        alone = Comm.from_ranks([3])
        new = Comm()
        comm = old if rank < 3 else alone
        model = tiny_model(seed=rank if rank < 3 else 99)
    else:
        old = comm = Comm()
        new = Comm.from_ranks([0, 1, 2])
        model = tiny_model(seed=0)
    strategy, opt = _co2(model, comm)
    strategy.setup()
    trains = mode == "leave" or rank < 3
    if trains:
        run_loop(strategy, model, opt, rank, 0, 2 * H)  # two rounds: one update applied, round 2 in flight
    out: dict = {}
    if trains:
        saved = strategy.state_dict()  # waits for the round in flight; on_membership_change then applies it
        out["phi"], out["m"], out["pending"] = saved["outer_params"], saved["momentum"], saved["pending_mean"]
    if mode == "leave" and rank == 3:
        strategy.finish()  # the departing worker drains the all-reduce it issued, then stops
        return {**out, "left": flat_params(model)}
    old_calls = len(comm.records())
    strategy.on_membership_change(new)
    out.update(joined=flat_params(model), rounds=strategy.rounds, updates=strategy.updates,
               momentum=strategy.momentum.clone(), old_calls=(old_calls, len(comm.records())))
    first_round: list = []
    run_loop(strategy, model, opt, rank, 2 * H, 4 * H,
             on_step=lambda s: first_round.append(flat_params(model)) if s == 3 * H - 1 else None)
    strategy.finish()
    out.update(first_round=first_round[0], final=flat_params(model), world=new.world_size,
               all_reduces=new.stats()["by_kind"]["all_reduce"]["calls"],
               peers=[r.peer for r in new.records() if r.peer is not None])
    return out


@pytest.mark.multiproc
def test_co2_completes_the_pending_round_and_a_joiner_adopts_phi_and_momentum(rank_pool) -> None:
    results = rank_pool.run(_co2_members, 4, args=("join",), timeout_s=120)
    src = results[0]
    assert src["pending"] is not None and src["pending"].abs().sum() > 0
    phi, m = _co2_drained(src["phi"], src["m"], src["pending"])
    assert m.abs().sum() > 0  # the momentum that travels is not zeros
    for r in results[:3]:  # survivors: continuous, the pending round applied rather than dropped
        torch.testing.assert_close(r["joined"], phi, rtol=1e-6, atol=1e-7)
        assert (r["rounds"], r["updates"]) == (2, 2)
    for r in results:  # everyone, the joiner included, holds src's φ and m
        torch.testing.assert_close(r["joined"], src["joined"], rtol=0, atol=0)
        torch.testing.assert_close(r["momentum"], src["momentum"], rtol=0, atol=0)
        # first outer step of the new membership: nothing pending, so θ = φ unchanged
        torch.testing.assert_close(r["first_round"], src["joined"], rtol=0, atol=0)
        torch.testing.assert_close(r["final"], src["final"], rtol=0, atol=0)
        assert r["world"] == 4 and r["all_reduces"] == 2 and r["old_calls"][0] == r["old_calls"][1]
    assert (results[3]["rounds"], results[3]["updates"]) == (2, 2)  # adopted src's counters
    assert not torch.equal(src["final"], src["joined"])  # training went on over four workers


@pytest.mark.multiproc
def test_co2_survivors_go_on_without_a_departed_worker(rank_pool) -> None:
    results = rank_pool.run(_co2_members, 4, args=("leave",), timeout_s=120)
    phi, _ = _co2_drained(results[0]["phi"], results[0]["m"], results[0]["pending"])
    torch.testing.assert_close(results[3]["left"], phi, rtol=1e-6, atol=1e-7)  # drained the same average
    for r in results[:3]:
        torch.testing.assert_close(r["joined"], phi, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r["final"], results[0]["final"], rtol=0, atol=0)
        assert r["world"] == 3 and r["all_reduces"] == 2 and set(r["peers"]) <= {0, 1, 2}
        assert r["old_calls"][0] == r["old_calls"][1]  # nothing more on the group that held rank 3
    assert not torch.equal(results[0]["final"], results[0]["joined"])


class _PairComm:
    """A group of two seen from rank 0: the other worker's contribution (CO2: its parameters) is always ``peer``. Once ``lost`` is set
    (the peer died), every collective not completed yet fails, as gloo's do when a peer is gone."""

    def __init__(self, peer: torch.Tensor) -> None:
        self.peer, self.lost, self.calls = peer, False, 0
        self.world_size, self.rank = 2, 0

    def all_reduce(self, t: torch.Tensor, op: str = "avg", *, async_op: bool = False):
        assert op == "avg"
        self.calls += 1
        work = _PairWork(self, t)
        return work if async_op else work.wait()


class _PairWork:
    def __init__(self, comm: _PairComm, t: torch.Tensor) -> None:
        self.comm, self.t, self.done = comm, t, False

    def wait(self) -> torch.Tensor:
        if not self.done:
            if self.comm.lost:
                raise RuntimeError("[gloo] Connection closed by peer")
            self.t.add_(self.comm.peer).div_(2)
            self.done = True
        return self.t


def _co2_two_rounds(peer: torch.Tensor):
    """Rank 0 of a two-worker CO2 after two rounds: round 1 applied, round 2's all-reduce started."""
    model = tiny_model(seed=0)
    comm = _PairComm(peer)
    strategy, opt = _co2(model, comm)
    run_loop(strategy, model, opt, 0, 0, 2 * H)
    return model, comm, strategy, opt


def test_co2_redoes_an_interrupted_round_end_over_the_survivors() -> None:
    """The peer dies before round 3 ends: waiting there for round 2's average fails. Nothing is applied;
    the survivors redo round 2's all-reduce from the kept parameters (the lost worker's dropped, the other
    survivor's taken), then round 3 ends over the new group, applying round 2 one round late."""
    n = sum(p.numel() for p in tiny_model().parameters())
    lost_params, survivor_params = torch.full((n,), 0.3), torch.full((n,), -0.1)
    model, old, strategy, opt = _co2_two_rounds(lost_params)
    phi2, m2, rounds = strategy.outer_params.clone(), strategy.momentum.clone(), strategy.rounds
    own_params2 = strategy._pending_local.clone()  # this worker's θ at the end of round 2 (white box)
    run_loop(strategy, model, opt, 0, 2 * H, 3 * H - 1)
    old.lost = True
    with pytest.raises(RuntimeError, match="Connection closed"):
        run_loop(strategy, model, opt, 0, 3 * H - 1, 3 * H)  # the round end fails waiting for round 2
    torch.testing.assert_close(strategy.outer_params, phi2, rtol=0, atol=0)  # nothing applied
    torch.testing.assert_close(strategy.momentum, m2, rtol=0, atol=0)
    assert (strategy.rounds, strategy.steps_since_sync) == (rounds, H)

    survivors = _PairComm(survivor_params)
    calls_on_old = old.calls
    strategy.continue_after_peer_loss(survivors, interrupted=True)
    assert old.calls == calls_on_old and survivors.calls == 2  # round 2 redone, round 3 started: the new group
    m3 = (MU * m2 + (phi2 - (own_params2 + survivor_params) / 2) / LAMBDA).clamp(-CLIP, CLIP)
    torch.testing.assert_close(strategy.momentum, m3, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(strategy.outer_params, phi2 - ETA * m3, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat_params(model), phi2 - ETA * m3, rtol=1e-6, atol=1e-7)  # θ = φ
    assert (strategy.rounds, strategy.steps_since_sync) == (rounds + 1, 0)
    with_lost = (MU * m2 + (phi2 - (own_params2 + lost_params) / 2) / LAMBDA).clamp(-CLIP, CLIP)
    assert not torch.allclose(strategy.momentum, with_lost)  # the lost worker's parameters are not in it


def test_co2_redoes_a_resolved_round_after_a_peer_loss_so_survivors_agree() -> None:
    """A checkpoint waited for round 2's average on the old group (it includes the lost worker's parameters);
    then the peer is lost. Whether a survivor got that average depends on timing, so every survivor
    redoes round 2 over the survivors; it is applied at the next round end, not now."""
    n = sum(p.numel() for p in tiny_model().parameters())
    lost_params, survivor_params = torch.full((n,), 0.3), torch.full((n,), -0.1)
    model, old, strategy, opt = _co2_two_rounds(lost_params)
    with_lost = strategy.state_dict()["pending_mean"].clone()  # (own θ₂ + lost θ₂) / 2
    phi2, m2 = strategy.outer_params.clone(), strategy.momentum.clone()
    old.lost = True
    survivors = _PairComm(survivor_params)
    strategy.continue_after_peer_loss(survivors, interrupted=False)
    redone = strategy.state_dict()["pending_mean"]
    torch.testing.assert_close(redone, with_lost + (survivor_params - lost_params) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(strategy.outer_params, phi2, rtol=0, atol=0)  # not applied yet
    torch.testing.assert_close(strategy.momentum, m2, rtol=0, atol=0)
    run_loop(strategy, model, opt, 0, 2 * H, 3 * H)  # the next round end applies it
    expected_m = (MU * m2 + (phi2 - redone) / LAMBDA).clamp(-CLIP, CLIP)
    torch.testing.assert_close(strategy.outer_params, phi2 - ETA * expected_m, rtol=1e-6, atol=1e-7)
    assert survivors.calls == 2 and old.calls == 2  # the redo and round 3, all on the new group


class _LostPartnerComm:
    """Two workers seen from rank 0 whose partner is gone: every gossip transfer fails."""

    world_size, rank = 2, 0

    def batch_isend_irecv(self, ops):
        return [_FailedTransfer() for _ in ops]


class _FailedTransfer:
    def wait(self):
        raise RuntimeError("[gloo] Connection closed by peer")


def test_noloco_survivor_whose_gossip_was_interrupted_skips_that_update_and_goes_on() -> None:
    """The partner dies: the gossip at the round end fails. Nothing was changed (φ, m, θ as before),
    the round counts as taken, and the next round, over the survivors (here one worker alone),
    applies the ordinary update with the outer gradient of both rounds' local progress."""
    model = tiny_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    strategy = NoLoCo(model, opt, _LostPartnerComm(), sync_every=H, outer_lr=ALPHA, outer_momentum=BETA,
                      mean_pull=GAMMA, init_sync=False, nesterov=False)  # the paper's rule, spelled out below
    strategy.setup()
    phi0 = flatten(strategy.outer_params).clone()
    with pytest.raises(RuntimeError, match="Connection closed"):
        run_loop(strategy, model, opt, 0, 0, H)  # the round end's gossip fails
    theta = flat_params(model)
    assert not torch.equal(theta, phi0)  # local progress, kept
    torch.testing.assert_close(flatten(strategy.outer_params), phi0, rtol=0, atol=0)
    assert float(flatten(strategy.momentum).abs().sum()) == 0.0 and strategy.rounds == 0

    strategy.continue_after_peer_loss(Comm(), interrupted=True)
    assert (strategy.rounds, strategy.steps_since_sync, strategy.at_membership_boundary()) == (1, 0, True)
    torch.testing.assert_close(flat_params(model), theta, rtol=0, atol=0)
    before_gossip = []
    gossip = strategy.gossip
    strategy.gossip = lambda r: (before_gossip.append(flat_params(model)), gossip(r))[1]
    run_loop(strategy, model, opt, 0, H, 2 * H)  # a round alone: its group is itself (mean φ = φ)
    # m = β·0 + α·(θ − φ0) + γ·0, θ = the local weights after both rounds' inner steps; φ = φ0 + m
    [theta2] = before_gossip
    m = flatten(strategy.momentum)
    torch.testing.assert_close(m, ALPHA * (theta2 - phi0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flatten(strategy.outer_params), phi0 + m, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat_params(model), phi0 + m, rtol=1e-6, atol=1e-7)
    assert strategy.rounds == 2 and strategy.comm.world_size == 1
    # a survivor, not a joiner: a later membership change keeps its own state
    assert strategy._active


# ------------------------------------------------------------------- DiLoCo, Streaming DiLoCo


def _outer_leave(rank: int, world_size: int, algorithm: str) -> dict:
    """Four workers train; at a boundary with nothing in flight, rank 3 stops (no collective on its
    way out) and ranks 0-2 switch to a group of three and train on."""
    old = comm = Comm()
    new = Comm.from_ranks([0, 1, 2])  # every rank takes part in creating a group, members or not
    model = tiny_model(seed=rank)  # different starts: setup() broadcasts rank 0's weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if algorithm == "diloco":
        strategy = DiLoCo(model, opt, comm, sync_every=H, outer_lr=0.7, outer_momentum=0.9)
    else:
        strategy = StreamingDiLoCo(model, opt, comm, sync_every=2 * H, outer_lr=0.7, outer_momentum=0.9,
                                   fragments=2, overlap_steps=1, mixing_factor=0.5, quantization="e3m0")
    strategy.setup()
    step = 0
    # two full rounds, then on to the first step with nothing in flight (Streaming DiLoCo staggers its
    # fragments; on_membership_change refuses an exchange in flight)
    while step < 4 * H or getattr(strategy, "_pending", None):  # DiLoCo: 4H is a round boundary
        run_loop(strategy, model, opt, rank, step, step + 1)
        step += 1
    if rank == 3:
        return {"left_at": step}
    before = torch.cat([g.reshape(-1) for g in strategy.global_params])
    old_calls = len(old.records())
    strategy.on_membership_change(new)
    joined = flat_params(model)
    run_loop(strategy, model, opt, rank, step, step + 4 * H)
    strategy.finish()
    return {"left_at": step, "before": before, "joined": joined, "final": flat_params(model), "world": new.world_size,
            "old_calls": (old_calls, len(old.records())), "new_calls": len(new.records()),
            "peers": [r.peer for r in new.records() if r.peer is not None]}


@pytest.mark.multiproc
@pytest.mark.parametrize("algorithm", ["diloco", "streaming-diloco"])
def test_survivors_go_on_at_three_after_a_fourth_worker_leaves(rank_pool, algorithm: str) -> None:
    """DiLoCo and Streaming DiLoCo at 4 workers lose one between outer steps and continue at 3
    without restarting: each survivor's model is the global model it held (nothing reset, nothing
    re-initialised), the old group is never used again, and the three train on together."""
    results = rank_pool.run(_outer_leave, 4, args=(algorithm,), timeout_s=120)
    assert len({r["left_at"] for r in results}) == 1  # one boundary, agreed by the schedule alone
    survivors = results[:3]
    for r in survivors:
        torch.testing.assert_close(r["before"], survivors[0]["before"], rtol=0, atol=0)  # one global model
        torch.testing.assert_close(r["joined"], r["before"], rtol=0, atol=0)  # continuous: adopted, not reset
        torch.testing.assert_close(r["final"], survivors[0]["final"], rtol=0, atol=0)  # in step after finish()
        assert r["world"] == 3 and r["new_calls"] > 1 and set(r["peers"]) <= {0, 1, 2}
        assert r["old_calls"][0] == r["old_calls"][1]  # nothing more on the group that held rank 3
    assert not torch.equal(survivors[0]["final"], survivors[0]["joined"])  # training went on over three


class _DeadGroupComm:
    """The old group seen by a survivor whose exchange failed: every collective raises as gloo's do."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank, self.ring_p2p = world_size, rank, False

    def all_reduce(self, *_args, **_kwargs):
        raise RuntimeError("[gloo] Connection closed by peer")

    all_gather = exchange_chunks = all_reduce


def _split_exchange(rank: int, world_size: int, algorithm: str) -> dict:
    """Three workers train two rounds. The exchange at the end of round 3 completes on rank 0 (over a
    group with rank 2, the worker then lost: it stands for the old group whose result rank 0 received)
    and fails on rank 1. Ranks 0 and 1 go on as the survivors: rank 1 adopts rank 0's outcome."""
    full = Comm()
    old_pair, survivors = Comm.from_ranks([0, 2]), Comm.from_ranks([0, 1])  # collective: every rank creates them
    model = tiny_model(seed=rank)
    if algorithm == "diloco":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        strategy = DiLoCo(model, opt, full, sync_every=H, outer_lr=0.7, outer_momentum=0.9)
    else:
        strategy, opt = _co2(model, full)
    strategy.setup()
    run_loop(strategy, model, opt, rank, 0, 3 * H - 1)  # two rounds, then up to the third round's exchange
    phi_before = _global_flat(strategy)
    strategy.comm = _DeadGroupComm(3, rank) if rank == 1 else old_pair
    try:
        run_loop(strategy, model, opt, rank, 3 * H - 1, 3 * H)
        completed = True
    except RuntimeError as exc:
        assert "Connection closed" in str(exc)
        completed = False
    if rank == 2:
        return {"completed": completed}
    outcome = _global_flat(strategy) if completed else None
    theta_at_exchange = None if completed else flat_params(model)  # a failed round end changed nothing
    strategy.adopt_completed_exchange(survivors, src=0, completed=completed)
    after = {"phi": _global_flat(strategy), "theta": flat_params(model), "m": _momentum_flat(strategy),
             "counters": (strategy.outer_steps,) if algorithm == "diloco" else (strategy.rounds, strategy.updates),
             "steps_since_sync": strategy.steps_since_sync}
    if algorithm == "co2":
        after["own_params"] = strategy._pending_local.clone()
        after["pending"] = strategy.state_dict()["pending_mean"].clone()
    run_loop(strategy, model, opt, rank, 3 * H, 5 * H)
    strategy.finish()
    return {"completed": completed, "phi_before": phi_before, "outcome": outcome, "after": after,
            "theta_at_exchange": theta_at_exchange,
            "final": flat_params(model), "survivor_calls": len(survivors.records())}


def _global_flat(strategy) -> torch.Tensor:
    if isinstance(strategy, DiLoCo):
        return torch.cat([g.reshape(-1) for g in strategy.global_params]).clone()
    return strategy.outer_params.clone()


def _momentum_flat(strategy) -> torch.Tensor:
    if isinstance(strategy, DiLoCo):
        return torch.cat([b.reshape(-1) for b in strategy._momentum_buffers()]).clone()
    return strategy.momentum.clone()


@pytest.mark.multiproc
@pytest.mark.parametrize("algorithm", ["diloco", "co2"])
def test_survivors_whose_exchange_failed_adopt_the_outcome_of_one_where_it_completed(rank_pool, algorithm: str) -> None:
    """The lost worker died in its exchange's final hops: it completed on one survivor and failed on the
    other. Instead of a restart, the survivor without the result takes it from the one that has it, and
    both go on in step (docs/elastic.md, "A lost peer")."""
    results = rank_pool.run(_split_exchange, 3, args=(algorithm,), timeout_s=120)
    done, failed = results[0], results[1]
    assert (done["completed"], failed["completed"], results[2]["completed"]) == (True, False, True)
    # the failed survivor held the pre-exchange global state; it now holds the completed outcome
    assert not torch.equal(failed["phi_before"], done["outcome"])
    for key in ("phi", "theta", "m"):
        torch.testing.assert_close(failed["after"][key], done["after"][key], rtol=0, atol=0)
    assert failed["after"]["counters"] == done["after"]["counters"]
    assert failed["after"]["steps_since_sync"] == done["after"]["steps_since_sync"] == 0
    if algorithm == "diloco":
        torch.testing.assert_close(done["after"]["phi"], done["outcome"], rtol=0, atol=0)  # the outcome is kept
        torch.testing.assert_close(done["after"]["theta"], done["after"]["phi"], rtol=0, atol=0)  # θ = φ
    else:
        # round 3 is redone over the survivors from each one's own parameters at the round end (the failed
        # one kept its θ of the failed exchange, as the others did), and applied at the next round end as usual
        torch.testing.assert_close(failed["after"]["own_params"], failed["theta_at_exchange"], rtol=0, atol=0)
        expected = (done["after"]["own_params"] + failed["after"]["own_params"]) / 2
        torch.testing.assert_close(done["after"]["pending"], expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(failed["after"]["pending"], done["after"]["pending"], rtol=0, atol=0)
    torch.testing.assert_close(failed["final"], done["final"], rtol=0, atol=0)  # in step two rounds later
    assert done["survivor_calls"] == failed["survivor_calls"] > 0


def _train_dropping_lost_exchanges(strategy, model, opt, rank: int, start: int, stop: int) -> list[int]:
    """The trainer loop for a strategy that drops a lost exchange (Strategy.drop_lost_exchange): an
    exchange that raises is dropped and training goes on. Returns the steps at which one was dropped."""
    dropped = []

    def step_and_drop(step: int) -> None:
        try:
            run_loop(strategy, model, opt, rank, step, step + 1)
        except RuntimeError as exc:
            assert "Connection closed" in str(exc)
            assert strategy.drop_lost_exchange()
            dropped.append(step)

    for step in range(start, stop):
        step_and_drop(step)
    return dropped


def _streaming_split_exchange(rank: int, world_size: int) -> dict:
    """Three Streaming DiLoCo workers (P = 2, H = 4, τ = 1, α = 0.5) train two rounds. In round 3 the
    exchange of fragment 0 (started at t = 9, merged at t = 10) completes on rank 0 (over a group with
    rank 2, the worker then lost) and fails on rank 1. Both train on, dropping every exchange that fails
    from then on (rank 0's of fragment 1 at t = 11), to the boundary at t = 12, and regroup there."""
    full = Comm()
    old_pair, survivors = Comm.from_ranks([0, 2]), Comm.from_ranks([0, 1])
    model = tiny_model(seed=rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    strategy = StreamingDiLoCo(model, opt, full, sync_every=4, outer_lr=0.7, outer_momentum=0.9, fragments=2,
                               overlap_steps=1, mixing_factor=0.5, quantization="e3m0")
    strategy.setup()
    run_loop(strategy, model, opt, rank, 0, 8)
    strategy.comm = _DeadGroupComm(3, rank) if rank == 1 else old_pair
    dropped = _train_dropping_lost_exchanges(strategy, model, opt, rank, 8, 10)  # fragment 0's exchange
    if rank == 2:
        return {}
    strategy.comm = _DeadGroupComm(3, rank)  # rank 2 is gone: whatever comes next over the old group fails
    dropped += _train_dropping_lost_exchanges(strategy, model, opt, rank, 10, 12)
    frag0 = strategy.fragment_params[0]
    before = {"global": _global_flat(strategy), "m": _momentum_flat(strategy),
              "last_sync_t": list(strategy.last_sync_t), "outer_steps": strategy.outer_steps,
              "params": [p.detach().clone() for p in strategy.params], "boundary": strategy.at_membership_boundary()}
    strategy.continue_after_peer_loss(survivors, interrupted=False)
    after = {"global": _global_flat(strategy), "m": _momentum_flat(strategy),
             "last_sync_t": list(strategy.last_sync_t), "outer_steps": strategy.outer_steps,
             "params": [p.detach().clone() for p in strategy.params],
             "frag0_global": [strategy.global_params[i].detach().clone() for i in frag0]}
    run_loop(strategy, model, opt, rank, 12, 20)
    strategy.finish()
    return {"dropped": dropped, "frag0": frag0, "before": before, "after": after, "final": flat_params(model),
            "survivor_calls": len(survivors.records())}


@pytest.mark.multiproc
def test_streaming_survivors_train_on_to_the_boundary_and_take_a_fragment_merged_on_one_only(rank_pool) -> None:
    """Streaming DiLoCo: the lost worker died in the final hops of a fragment exchange, which completed on
    one survivor and failed on the other. The one where it failed drops it and trains on (so both stop
    at the same boundary, not at steps apart); there the survivors reconcile: the fragment is taken from
    the one that merged it, and both go on in step (docs/elastic.md, "A lost peer")."""
    results = rank_pool.run(_streaming_split_exchange, 3, timeout_s=120)
    done, failed = results[0], results[1]
    assert done["dropped"] == [10] and failed["dropped"] == [8, 10]  # exchange starts at t = 9 and t = 11
    assert done["before"]["boundary"] and failed["before"]["boundary"]  # both at the boundary t = 12
    assert done["before"]["last_sync_t"] == [10, 8] and failed["before"]["last_sync_t"] == [6, 8]
    assert not torch.equal(done["before"]["global"], failed["before"]["global"])  # fragment 0 differs
    for r in (done, failed):
        assert r["after"]["last_sync_t"] == [10, 8] and r["after"]["outer_steps"] == done["before"]["outer_steps"]
        torch.testing.assert_close(r["after"]["global"], done["before"]["global"], rtol=0, atol=0)  # rank 0's kept
        torch.testing.assert_close(r["after"]["m"], done["before"]["m"], rtol=0, atol=0)
    for i, (before, after) in enumerate(zip(failed["before"]["params"], failed["after"]["params"])):
        if i in failed["frag0"]:  # merged as the merge would have: (1 - α)·θ_p + α·θ_local
            g = failed["after"]["frag0_global"][failed["frag0"].index(i)]
            torch.testing.assert_close(after, torch.lerp(g, before, 0.5), rtol=0, atol=0)
        else:  # fragment 1 (dropped everywhere) keeps its local progress
            torch.testing.assert_close(after, before, rtol=0, atol=0)
    for before, after in zip(done["before"]["params"], done["after"]["params"]):
        torch.testing.assert_close(after, before, rtol=0, atol=0)  # nothing to take: untouched
    torch.testing.assert_close(failed["final"], done["final"], rtol=0, atol=0)  # in step two rounds later
    assert done["survivor_calls"] == failed["survivor_calls"] > 0


# ------------------------------------------------------------------------ single process


def test_membership_change_is_refused_mid_round_and_unsupported_for_ddp() -> None:
    model = tiny_model()
    for strategy, opt in (_noloco(model, Comm()), _co2(model, Comm())):
        strategy.setup()
        run_loop(strategy, model, opt, 0, 0, 1)  # one inner step of a round of H = 2
        with pytest.raises(RuntimeError, match="round boundary"):
            strategy.on_membership_change(Comm())
    ddp = DDP(model, torch.optim.SGD(model.parameters(), lr=0.1), Comm())
    with pytest.raises(NotImplementedError, match="ddp: .*coordinated restart.*checkpoint"):
        ddp.on_membership_change(Comm())


def test_a_single_worker_membership_change_keeps_its_state() -> None:
    model = tiny_model()
    strategy, opt = _noloco(model, Comm())
    strategy.setup()
    run_loop(strategy, model, opt, 0, 0, 2 * H)
    before = _noloco_state(strategy)
    strategy.on_membership_change(Comm())
    after = _noloco_state(strategy)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"src must be a group rank in \[0, 1\) \(got 2\)"):
        strategy.on_membership_change(Comm(), src=2)


class _Gathered:
    """A stand-in Comm whose all_gather returns fixed rows (what the other members contributed)."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows, self.world_size = rows, len(rows)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [torch.tensor(row, dtype=torch.int64) for row in self.rows]


def test_membership_roles_agree_on_joiners_and_refuse_a_joining_src_or_split_survivors() -> None:
    rows = [[0, 8, 4], [0, 8, 4], [1, 0, 0]]  # [joining, t, rounds]: two survivors at step 8, one joiner
    assert membership_roles(_Gathered(rows), 1, False, (8, 4)) == ([False, False, True], [8, 4])
    with pytest.raises(ValueError, match=r"src=2 is a joining worker; pass a survivor as src \(one of \[0, 1\]\)"):
        membership_roles(_Gathered(rows), 2, True, (0, 0))
    assert membership_roles(_Gathered([[1, 0, 0], [1, 6, 3]]), 1, True, (0, 0)) == ([True, True], [6, 3])
    with pytest.raises(ValueError, match="survivors are at different positions"):
        membership_roles(_Gathered([[0, 8, 4], [0, 6, 3]]), 0, False, (8, 4))
