"""The one small strategy interface every distributed algorithm implements.

The training loop (``loco_trainer.train``) is identical for every algorithm; it calls these hooks,
in this order, on every rank:

    strategy = make_strategy(spec, model, inner_optimizer, comm)   # registry in algorithms/__init__
    strategy.setup()                       # once, after any checkpoint was loaded (e.g. broadcast
                                           # or adopt the global parameters)
    for step in range(start_step, total_steps):
        if not strategy.takes_step(step): strategy.after_inner_step(step); continue   # adaptive local steps
        loss = forward/backward(...)       # the model may be strategy.wrap(model)'s result
        strategy.after_backward(step)      # DDP: gradients averaged (or nothing, if a comm hook did)
        clip, inner_optimizer.step(), zero_grad
        strategy.after_inner_step(step)    # sync points: DiLoCo's outer step when (step+1) % H == 0
    strategy.finish()                      # drain async work; leave every rank with the final model

Between two rounds, when the set of workers changes, every member of the new group may call
``strategy.on_membership_change(new_comm, src)`` instead of restarting (DiLoCo, Streaming DiLoCo,
NoLoCo, CO2; DDP resizes by a coordinated restart from the checkpoint); see docs/algorithms.md,
"Membership changes".

``step`` is the 0-based index of the inner step just taken. A strategy communicates only through
the :class:`loco_trainer.comm.Comm` it was given, which counts bytes and times collectives.

Checkpoints: ``state_dict()`` returns the algorithm's own state (outer optimizer, global
parameters, fragment schedule, pending async round, ...) as a dict of tensors and plain values;
``load_state_dict()`` takes it back. Model and inner optimizer state are saved by the loop.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import torch


def membership_roles(comm: Any, src: int, joining: bool, position: Sequence[int]) -> tuple[list[bool], list[int]]:
    """The roles of a membership change, agreed on by every member of the new group ``comm``.

    One small ``all_gather`` of ``[joining, *position]`` (int64) from every member. Returns
    ``(joiners, src_position)``: ``joiners[r]`` is True when group rank ``r`` joins (has no state worth
    keeping), and ``src_position`` is the group rank ``src``'s ``position`` (the counters a joiner adopts,
    e.g. inner steps taken and rounds). Raises the same ``ValueError`` on every rank when ``src`` is out
    of range, when ``src`` is a joiner while some member is a survivor (choose a survivor as src), or when
    the survivors' positions differ (they are not at the same sync boundary).
    """
    if not 0 <= src < comm.world_size:
        raise ValueError(f"src must be a group rank in [0, {comm.world_size}) (got {src})")
    mine = torch.tensor([int(bool(joining)), *[int(x) for x in position]], dtype=torch.int64)
    rows = [row.tolist() for row in comm.all_gather(mine)]
    joiners = [bool(row[0]) for row in rows]
    if joiners[src] and not all(joiners):
        survivors = [r for r, j in enumerate(joiners) if not j]
        raise ValueError(f"membership change: src={src} is a joining worker; pass a survivor as src (one of {survivors})")
    positions = {tuple(row[1:]) for row, j in zip(rows, joiners) if not j}
    if len(positions) > 1:
        raise ValueError(f"membership change: the survivors are at different positions {sorted(positions)}; "
                         f"call it at the same sync boundary on every member")
    return joiners, rows[src][1:]


class Strategy(abc.ABC):
    """Base class of DDP, DiLoCo, Streaming DiLoCo, NoLoCo and CO2."""

    #: the ``algorithm.name`` this strategy implements
    name: str = ""
    #: Whether an exchange a lost peer interrupted concerns only the ranks that took part in it, so each
    #: survivor recovers on its own (:meth:`continue_after_peer_loss` gets its own ``interrupted``, and the
    #: survivors need not agree on it): NoLoCo's pairwise gossip. False for the collectives of DiLoCo,
    #: Streaming DiLoCo and CO2, where every survivor must redo or abandon the same exchange.
    interruption_is_local: bool = False

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop runs forward/backward on (default: the model itself)."""
        return model

    def setup(self) -> None:
        """Called once before the first step, after any checkpoint was loaded."""

    def takes_step(self, step: int) -> bool:
        """Whether this worker computes inner step ``step`` (asked before it). False: the loop passes over it at
        once (no batch, no forward or backward) but still calls :meth:`after_inner_step` and runs every collective
        of that step, so the workers stay in step: a slow worker under ``algorithm.adaptiveSteps`` takes fewer
        steps per round. Default: always True."""
        return True

    def after_backward(self, step: int) -> None:
        """Called after backward, before gradient clipping and the inner optimizer step."""

    @abc.abstractmethod
    def after_inner_step(self, step: int) -> None:
        """Called after the inner optimizer step ``step`` (0-based)."""

    def finish(self) -> None:
        """Called once after the last step: complete pending communication."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected algorithm state keys {sorted(state)}")

    def on_membership_change(self, comm: Any, src: int = 0) -> None:
        """Switch to a new set of workers (``comm``, a :class:`loco_trainer.comm.Comm` over the new
        group) at a sync boundary, without restarting the survivors.

        Every member of the new group calls it at the same boundary, survivors and joiners alike
        (a joiner after ``setup``/``load_state_dict`` or nothing at all); a departing worker does not
        (it drains with ``finish()`` and stops). Survivors keep their state; a joiner adopts what the
        algorithm needs from the group rank ``src`` (a survivor). What exactly is kept, adopted or
        drained is each algorithm's contract (its module docstring; docs/algorithms.md, "Membership
        changes"). Raises ``RuntimeError`` when called mid-round.

        The default raises ``NotImplementedError``: for DDP a resize is a coordinated restart of every
        worker from the latest checkpoint (every step is a sync point; nothing is gained by a live switch).
        """
        raise NotImplementedError(
            f"{self.name}: a live membership change is not supported; resize by a coordinated restart of all "
            f"workers from the latest checkpoint"
        )

    def at_membership_boundary(self) -> bool:
        """True between rounds, where :meth:`on_membership_change` may be called (no local progress
        since the last outer step that a switch would have to reconcile, no exchange in flight).
        The live-resize loop checks for a membership update only there. Default False (never)."""
        return False

    def before_membership_change(self) -> None:
        """Called at a planned boundary just before the switch, while the old group is still whole:
        complete what is still in flight on it (CO2's asynchronous round). Default: nothing."""

    def continue_after_peer_loss(self, comm: Any, interrupted: bool) -> None:
        """Go on with ``comm``, the group of the survivors after one or more workers were lost
        mid-round (a collective failed because a peer died). Survivors only: nobody joins here.

        ``interrupted``: the loss interrupted this strategy's own communication in the last
        :meth:`after_inner_step`, which must then be completed or abandoned over ``comm`` as the
        algorithm documents. Every survivor calls it at the same point (the loop checks that they
        agree on the step, and on ``interrupted`` unless :attr:`interruption_is_local`; where they do not,
        :meth:`adopt_completed_exchange` is called instead). The lost workers' contributions to the
        current round are dropped.
        Default: ``NotImplementedError`` (the job restarts from its checkpoint instead)."""
        raise NotImplementedError(f"{self.name}: continuing after a lost peer is not supported; the job restarts "
                                  f"from its latest checkpoint")

    def drop_lost_exchange(self) -> bool:
        """A peer loss interrupted this strategy's own exchange in :meth:`after_inner_step` (its
        collective raised). Return True after dropping whatever that exchange left in flight, so that
        the worker trains on to the next :meth:`at_membership_boundary` and regroups there with the
        other survivors, some of which may have completed that exchange (it then runs no collective
        that needs the lost peer: the loop skips its probes, evals and saves; the strategy's own
        exchanges fail again and are dropped again). :meth:`continue_after_peer_loss` then reconciles
        what the survivors completed differently. Return False (the default) to stop at this step:
        the survivors then agree there (DiLoCo, CO2 and NoLoCo, whose exchange ends at a boundary
        every survivor stops at)."""
        return False

    def adopt_completed_exchange(self, comm: Any, src: int, completed: bool) -> None:
        """Go on with ``comm`` (the survivors) when the exchange of the last :meth:`after_inner_step`
        completed on some survivors and failed on the others: the lost worker died during its final
        hops, so some received the old group's result. ``completed``: whether it did on this worker;
        group rank ``src`` is one that did. Instead of a redo, the others adopt ``src``'s outcome, which
        already holds every survivor's contribution; what then goes on over ``comm`` is as in
        :meth:`continue_after_peer_loss` with ``interrupted=False``. Every survivor calls it at the same
        step. Default: ``NotImplementedError`` (the job restarts from its checkpoint instead)."""
        raise NotImplementedError(f"{self.name}: survivors that disagree on whether the last exchange completed "
                                  f"cannot reconcile; the job restarts from its latest checkpoint")

    def p2p_covers_links(self, world_size: int) -> bool:
        """Whether this algorithm's own point-to-point traffic gives every ordered pair of ranks
        (src -> dst) a connection sample in every outer step, over a group of ``world_size`` ranks.

        When True the loop skips :meth:`loco_trainer.comm.Comm.probe` at its log intervals (the
        receives already fill the connection matrix, see docs/fault-detection.md). The probe is
        collective, so the answer must come from the configuration and ``world_size`` alone, never
        from what one rank observed: every rank must decide the same. Default False: collectives
        (DDP, DiLoCo, Streaming DiLoCo, CO2) leave no per-connection sample.
        """
        return False

    def metrics(self) -> dict[str, float]:
        """Algorithm-specific gauges for logs and /metrics (e.g. outer rounds, worker spread)."""
        return {}

    def bytes_per_inner_step(self, num_params: int, world_size: int) -> float:
        """Expected bytes sent per rank per inner step (the formula in docs/algorithms.md)."""
        raise NotImplementedError
