"""LiveMembership.agree, the survivors' check after a lost peer: they must have left the old group
at the same step and data position; on whether the loss interrupted the algorithm's exchange they may
differ only when the exchange completed on some of them (the lost worker died in its final hops) and
the algorithm can hand its outcome over (Strategy.adopt_completed_exchange); otherwise the worker
fails and the job restarts from its checkpoint."""

from __future__ import annotations

import types

import pytest
import torch

from loco_trainer.algorithms.base import Strategy
from loco_trainer.data import DataPosition
from loco_trainer.live_membership import LiveMembership


class _Recorder(Strategy):
    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def after_inner_step(self, step: int) -> None:
        pass

    def continue_after_peer_loss(self, comm, interrupted: bool) -> None:
        self.calls.append(("continue", interrupted))

    def on_membership_change(self, comm, src: int = 0) -> None:
        self.calls.append(("change", src))


class _Reconciling(_Recorder):
    def adopt_completed_exchange(self, comm, src: int, completed: bool) -> None:
        self.calls.append(("adopt", src, completed))


class _Local(_Recorder):
    interruption_is_local = True


def _agree(strategy: Strategy, rows: list[list[int]], rank: int):
    """Group rank ``rank``'s call, the group's rows being [joining, step, sequences, reference world, interrupted]."""
    comm = types.SimpleNamespace(world_size=len(rows), rank=rank,
                                 all_gather=lambda mine: [torch.tensor(r, dtype=torch.int64) for r in rows])
    me = rows[rank]
    host = types.SimpleNamespace(comm=lambda: comm, strategy=strategy, info=types.SimpleNamespace(rank=rank))
    return LiveMembership.agree(host, me[1], DataPosition(me[2]), me[3], joining=bool(me[0]),
                                     interrupted=bool(me[4]), planned=False)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_split_exchange_is_handed_over_from_a_survivor_where_it_completed(rank: int) -> None:
    rows = [[0, 80, 960, 3, 1], [0, 80, 960, 3, 0]]  # it failed on group rank 0, completed on group rank 1
    strategy = _Reconciling()
    assert _agree(strategy, rows, rank) == (80, DataPosition(960), 3)
    assert strategy.calls == [("adopt", 1, rank == 1)]


def test_a_split_exchange_fails_the_worker_when_the_algorithm_cannot_hand_it_over() -> None:
    rows = [[0, 80, 960, 3, 0], [0, 80, 960, 3, 1]]
    with pytest.raises(RuntimeError, match="different points .*interrupted"):
        _agree(_Recorder(), rows, 0)


def test_survivors_at_different_steps_fail_even_when_the_algorithm_could_hand_over() -> None:
    rows = [[0, 80, 960, 3, 0], [0, 90, 1080, 3, 0]]
    strategy = _Reconciling()
    with pytest.raises(RuntimeError, match="different points"):
        _agree(strategy, rows, 1)
    assert strategy.calls == []


def test_agreeing_survivors_redo_or_go_on_and_a_local_interruption_is_each_ones_own() -> None:
    strategy = _Reconciling()
    _agree(strategy, [[0, 80, 960, 3, 1], [0, 80, 960, 3, 1]], 1)
    assert strategy.calls == [("continue", True)]
    local = _Local()
    _agree(local, [[0, 80, 960, 3, 1], [0, 80, 960, 3, 0]], 1)  # NoLoCo's pairwise gossip: no hand-over
    assert local.calls == [("continue", False)]
