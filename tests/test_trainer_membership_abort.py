"""Trainer._on_membership_update: a smaller membership that the loop has not switched to within
ABORT_OLD_GROUP_AFTER_S interrupts the Comm's point-to-point waits, then aborts the old group (in
that order: gloo's abort does not wake this process's own pending transfers)."""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

import loco_trainer.train as train
from loco_trainer.protocol import MembershipUpdate


def _trainer_state(epoch: int, world_size: int, regrouping: bool = False):
    calls: list[str] = []
    comm = types.SimpleNamespace(interrupt=lambda: calls.append("interrupt"))
    state = types.SimpleNamespace(
        info=types.SimpleNamespace(world_size=world_size), _epoch=epoch, _regrouping=regrouping,
        _group_lock=threading.Lock(), _aborted_epoch=None, _comm=comm)
    return state, calls


def _update(epoch: int, world_size: int) -> MembershipUpdate:
    return MembershipUpdate(epoch=epoch, rank=0, world_size=world_size, master_addr="127.0.0.1", master_port=29502)


def _run(monkeypatch, state, update, calls) -> None:
    monkeypatch.setattr(train, "ABORT_OLD_GROUP_AFTER_S", 0.05)
    monkeypatch.setattr(train, "_abort_group", lambda: calls.append("abort"))
    train.Trainer._on_membership_update(state, update)
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
    """Trainer._defer_peer_loss (a probe, eval or save saw the loss): the Comm is interrupted, then
    the group aborted, and the interrupted exchange the loop then reaches counts as the lost peer,
    so every survivor stops at that exchange (docs/elastic.md, "A lost peer")."""
    from loco_trainer.comm import Comm, CommInterrupted

    state, calls = _trainer_state(epoch=1, world_size=3)
    comm = Comm(interruptible=True)
    state._comm = types.SimpleNamespace(interrupt=lambda: (calls.append("interrupt"), comm.interrupt()))
    state._live = True
    state.info.rank = 0
    progress: list[dict] = []
    state._set_progress = lambda **fields: progress.append(fields)
    monkeypatch.setattr(train, "_abort_group", lambda: calls.append("abort"))
    seen = RuntimeError("Connection closed by peer [10.0.0.3]:4000")
    assert train.Trainer._defer_peer_loss(state, seen, 75) is seen
    assert calls == ["interrupt", "abort"] and state._aborted_epoch == 1
    # /status says why the worker still runs in the old epoch
    assert progress == [{"message": "a peer was lost at step 75: training on to where the survivors regroup"}]
    # what the algorithm's exchange raises next on the interrupted Comm, even one the default group
    # (gone after the abort) would have failed with an unrelated message, counts as the lost peer
    comm._world_size = 2  # as if the group were still there: the call is refused before it is issued
    with pytest.raises(CommInterrupted) as refused:
        comm.all_reduce(torch.ones(2))
    assert train.Trainer._peer_lost(state, refused.value)
    assert train.Trainer._peer_lost(state, RuntimeError("Default process group has not been initialized"))
