"""LiveMembership.on_update: a smaller membership that the loop has not switched to within
ABORT_OLD_GROUP_AFTER_S interrupts the Comm's point-to-point waits, then aborts the old group (in
that order: gloo's abort does not wake this process's own pending transfers)."""

from __future__ import annotations

import time
import types

import pytest
import torch

import loco_trainer.live_membership as live
from loco_contract.config import RuntimeEnv
from loco_contract.protocol import MembershipUpdate
from loco_trainer.live_membership import LiveMembership
from loco_trainer.rendezvous import RankInfo


def _trainer_state(epoch: int, world_size: int, regrouping: bool = False, comm=None, report=None):
    calls: list[str] = []
    comm = comm or types.SimpleNamespace(interrupt=lambda: calls.append("interrupt"))
    env = RuntimeEnv.from_environ({}).model_copy(update={"epoch": epoch})
    state = LiveMembership(env, RankInfo(0, 0, world_size, 0, 1), None, torch.device("cpu"), comm=lambda: comm,
                           report=report or (lambda **fields: None))
    if regrouping:
        state.begin_regroup()
    return state, calls


def _update(epoch: int, world_size: int) -> MembershipUpdate:
    return MembershipUpdate(epoch=epoch, rank=0, world_size=world_size, master_addr="127.0.0.1", master_port=29502)


def _run(monkeypatch, state, update, calls) -> None:
    monkeypatch.setattr(live, "ABORT_OLD_GROUP_AFTER_S", 0.05)
    monkeypatch.setattr(live, "abort_group", lambda: calls.append("abort"))
    state.on_update(update)
    time.sleep(0.5)  # the timer fires after ABORT_OLD_GROUP_AFTER_S


def test_a_stale_group_is_interrupted_then_aborted(monkeypatch) -> None:
    state, calls = _trainer_state(epoch=1, world_size=3)
    _run(monkeypatch, state, _update(epoch=2, world_size=2), calls)
    assert calls == ["interrupt", "abort"]
    assert state._aborted_epoch == 1  # the loop's next error counts as a lost peer


def test_a_loop_already_regrouping_or_a_grow_leaves_the_group_alone(monkeypatch) -> None:
    state, calls = _trainer_state(epoch=1, world_size=3, regrouping=True)
    _run(monkeypatch, state, _update(epoch=2, world_size=2), calls)
    grow, grow_calls = _trainer_state(epoch=1, world_size=3)
    _run(monkeypatch, grow, _update(epoch=2, world_size=4), grow_calls)
    assert calls == [] and grow_calls == [] and state._aborted_epoch is None


def test_a_loss_seen_outside_the_exchange_leaves_the_group_and_the_next_exchange_stops_there(monkeypatch) -> None:
    """LiveMembership.leave_after_loss (a probe, eval or save saw the loss): the Comm is interrupted, then
    the group aborted, and the interrupted exchange the loop then reaches counts as the lost peer,
    so every survivor stops at that exchange (docs/elastic.md, "A lost peer")."""
    from loco_trainer.comm import Comm, CommInterrupted

    comm = Comm(interruptible=True)
    calls: list[str] = []
    progress: list[dict] = []
    state, _ = _trainer_state(epoch=1, world_size=3, report=lambda **fields: progress.append(fields),
                              comm=types.SimpleNamespace(interrupt=lambda: (calls.append("interrupt"), comm.interrupt())))
    state.live = True
    monkeypatch.setattr(live, "abort_group", lambda: calls.append("abort"))
    seen = RuntimeError("Connection closed by peer [10.0.0.3]:4000")
    assert state.leave_after_loss(seen, 75) is seen
    assert calls == ["interrupt", "abort"] and state._aborted_epoch == 1
    # /status says why the worker still runs in the old epoch
    assert progress == [{"message": "a peer was lost at step 75: training on to where the survivors regroup"}]
    # what the algorithm's exchange raises next on the interrupted Comm, even one the default group
    # (gone after the abort) would have failed with an unrelated message, counts as the lost peer
    comm._world_size = 2  # as if the group were still there: the call is refused before it is issued
    with pytest.raises(CommInterrupted) as refused:
        comm.all_reduce(torch.ones(2))
    assert state.peer_lost(refused.value)
    assert state.peer_lost(RuntimeError("Default process group has not been initialized"))
