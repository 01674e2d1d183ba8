"""CO2: full COmmunication-COmputation overlap (Sun et al., ICLR 2024, arXiv:2401.16265).

Local updating plus an *asynchronous* all-reduce that overlaps the next H inner steps, so training
never waits for the network; the price is that every outer update is one round stale.

Update rule. Round r ends after H inner steps with local parameters θᵢ,r (every worker started the
round from the outer parameters φ). At that point, on every worker:

    all-reduce (average) of θᵢ,r started    the *parameters*: it completes while round r+1 computes
    x̄_{r−1} = wait(previous all-reduce)     the previous round's mean parameters (one round stale)
    g = φ − x̄_{r−1}                          the outer gradient, from the *current* φ
    m ← β·m + g / λ                          λ: staleness-gap penalty (λ > 1 damps the stale step)
    m ← clamp(m, −c, +c)                     outer momentum clipping (in place: it really clips)
    φ ← φ − η·m ;  θᵢ ← φ                    every worker adopts φ, keeps its inner optimizer state

Round 1 has no previous average, so φ is unchanged after it; round r's progress lands at the end
of round r+1 ("exactly one round late").

Why the current φ. Round r−1's workers started from φ_s (φ at that round's start); by the time its
mean arrives, the outer step at the end of round r−1 has moved φ (it carried round r−2's progress,
whose ground round r−1, started without it, partly covered again). Measured from the current φ,
g = Δ̄_{r−1} − (φ_s − φ) with Δ̄_{r−1} = φ_s − x̄_{r−1}: the round's mean progress minus the step
taken since it began, so that ground is not counted twice. That is the rule of the reference summary (``m ← β·m + (φ − x̄)/λ``)
and of the released code (its outer step reads the all-reduced parameters against its current
``old_params``). An earlier version measured from the round's own start (g = Δ̄_{r−1}); it oscillated at
the released code's η = 1.0 and trailed this rule at every H tried (docs/algorithms.md,
"Convergence and the defaults"). The released code divides by λ as above; the paper's adaptive,
gap-dependent penalty is not reproduced (λ is a constant here).

Symbols -> arguments: H -> ``sync_every``, η -> ``outer_lr`` (1.0, as in the released code),
β -> ``outer_momentum`` (0.5), λ -> ``staleness_penalty`` (1.0), c -> ``clip_threshold`` (1.0).
``nesterov`` (off, as in the paper) takes the step on ``g/λ + β·m`` instead of ``m``
(torch.optim.SGD's Nesterov form, clipped m).

Bytes per inner step per rank (N parameters, fp32): 2(n−1)/n · 4N / H — as DiLoCo, but hidden
behind computation.

Membership change (:meth:`CO2.on_membership_change`, at a round boundary, called by every member of
the new group). The pending asynchronous round is **completed, not dropped**: each survivor waits for
the all-reduce in flight on the *old* group (every old member issued it at the round end; a departing
worker drains it with ``finish()`` before it stops) and applies it at once (m, φ update, θ = φ), as
``finish()`` would. Why: that mean carries H inner steps of every old worker — an update as
valid as any CO2 update, which is always one round stale; dropping it would throw that work away, and
it cannot be redone over the new set. It lands one round earlier than without the change. Then the
group rank ``src`` (a survivor) broadcasts φ and m (2 · 4N bytes) over the new group and every member
sets θ = φ: survivors already hold these values (all old members apply the same averages), joiners
adopt them together with ``src``'s round counters; inner optimizer states are kept. The new membership
starts with nothing pending, so its first round applies no update (the usual one-round delay).
"""

from __future__ import annotations

from typing import Any, Unpack

import torch

from loco_trainer.algorithms._outer import OuterArgs, OuterLoopStrategy, cpu_fp32, outer_args, require_positive
from loco_trainer.algorithms.base import membership_roles
from loco_trainer.comm import Comm, CommHandle, broadcast_flat, flatten

#: 2: the pending all-reduce result is the workers' mean *parameters* (``pending_mean``); 1 (read, converted):
#: it was their mean Δ from the round's start (``pending_average``)
STATE_FORMAT = 2


class CO2(OuterLoopStrategy):
    """CO2 (see the module docstring for the update rule and argument mapping)."""

    name = "co2"

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer | None, comm: Comm, *,
                 staleness_penalty: float = 1.0, clip_threshold: float = 1.0, nesterov: bool = False,
                 **outer: Unpack[OuterArgs]) -> None:
        self._init_outer(model, inner_optimizer, comm, **outer)
        require_positive("stalenessPenalty", staleness_penalty)
        require_positive("clipThreshold", clip_threshold)
        self.staleness_penalty = staleness_penalty
        self.clip_threshold = clip_threshold
        self.nesterov = bool(nesterov) and self.outer_momentum > 0
        numel = sum(p.numel() for p in self.params)
        #: φ, the outer parameters (flat fp32, CPU)
        self.outer_params = flatten(cpu_fp32(self.params)).clone()
        #: m, the outer momentum (flat)
        self.momentum = torch.zeros(numel)
        self.rounds = 0
        #: outer updates applied so far (rounds − 1 once training is under way)
        self.updates = 0
        #: fraction of momentum entries the last clipping changed
        self.last_clipped_fraction = 0.0
        self._pending: CommHandle | None = None
        self._pending_mean: torch.Tensor | None = None
        #: this worker's parameters θᵢ at the end of the round not applied yet (kept to redo its all-reduce
        #: over the survivors if a peer is lost before the round is applied: 4N bytes of CPU memory)
        self._pending_local: torch.Tensor | None = None
        #: True once this worker ended a round or joined a membership: it has state of its own
        #: (the default ``joining`` of :meth:`on_membership_change` is ``not _active``)
        self._active = False

    @classmethod
    def from_spec(cls, spec: Any, model: torch.nn.Module, inner_optimizer: Any, comm: Comm) -> "CO2":
        return cls(model, inner_optimizer, comm, **outer_args(spec), staleness_penalty=spec.staleness_penalty,
                   clip_threshold=spec.clip_threshold, nesterov=bool(spec.nesterov))

    def setup(self) -> None:
        """Fresh start: every rank adopts rank 0's parameters and buffers; φ = θ."""
        if self._loaded:
            return
        self._broadcast_model_from_rank0()
        self.outer_params.copy_(flatten(cpu_fp32(self.params)))

    def after_inner_step(self, step: int) -> None:
        """At the end of every round ((s+1) % H == 0): start this round's all-reduce, apply the
        previous round's average, adopt φ."""
        self.steps_since_sync += 1
        if (step + 1) % self.sync_every == 0:
            self.round_end()

    def finish(self) -> None:
        """End a partial round like a full one, then wait for the last all-reduce and apply it, so no
        round's progress is lost and every rank ends with the same parameters φ."""
        if self.steps_since_sync > 0:
            self.round_end()
        if self._has_pending():
            self._apply(self._take_pending())
            self._adopt()

    @torch.no_grad()
    def round_end(self) -> None:
        """End the round: resolve the previous round's all-reduce, start this round's, apply the previous
        average, adopt φ. Safe to call again after a failure part-way (a lost peer): nothing is applied
        before the new all-reduce has started, and a resolved average is kept until it is."""
        local = flatten(cpu_fp32(self.params))  # a new tensor (flatten copies)
        self._resolve()  # raises on a lost peer: nothing changed yet
        handle = self.comm.all_reduce(local.clone(), op="avg", async_op=True)
        previous = self._pending_mean
        self._pending, self._pending_local, self._pending_mean = handle, local, None
        if previous is not None:
            self._apply(previous)
        self._adopt()
        self.steps_since_sync = 0
        self.rounds += 1
        self._active = True

    # --------------------------------------------------------------------------- membership

    @torch.no_grad()
    def on_membership_change(self, comm: Comm, src: int = 0, *, joining: bool | None = None) -> None:
        """Switch to the group ``comm`` at a round boundary, without restarting the survivors.

        Every member of the new group calls it (a departing worker calls ``finish()`` instead, which
        completes the pending all-reduce on the old group). Order: (1) a round still pending is
        completed on the old group and applied (φ, m updated, θ = φ); (2) the members agree on who
        joins (``joining``; default: this worker joins unless it ended a round in this process or
        joined before) with one small all_gather; (3) group rank ``src`` broadcasts φ and m, every
        member adopts them and sets θ = φ; joiners also take ``src``'s round counters. Inner optimizer
        states are kept. ``src`` must be a survivor unless every member joins. Raises ``RuntimeError``
        mid-round and ``ValueError`` (on every member alike) for a joining ``src``.
        """
        self._require_round_boundary("last round end")
        joining = not self._active if joining is None else joining
        if self._has_pending():  # completed, not dropped: see the module docstring
            self._apply(self._take_pending())
            self._adopt()
        joiners, (rounds, updates) = membership_roles(comm, src, joining, (self.rounds, self.updates))
        self.comm = comm
        broadcast_flat(comm, [self.outer_params, self.momentum], src=src)
        self._adopt()
        if joining:
            self.rounds, self.updates = int(rounds), int(updates)
            self._loaded = True  # a later setup() keeps the adopted state
        self._active = True

    def before_membership_change(self) -> None:
        """Called while the old group is still whole, just before a planned switch: wait for the round
        in flight, so :meth:`on_membership_change` applies it instead of losing it with the old group."""
        self._resolve()

    @torch.no_grad()
    def continue_after_peer_loss(self, comm: Comm, interrupted: bool) -> None:
        """Survivors go on with ``comm`` after a peer was lost. The round not applied yet (its all-reduce
        was started on the old group; its result may be lost with the peer) is all-reduced again over
        ``comm`` from the kept θᵢ: it becomes the survivors' mean, the lost workers' contribution to it
        is dropped, and it is applied at the next round end as usual (one round stale). It is redone even
        where this worker had received the old group's average: whether a survivor did depends on timing,
        and the survivors must apply the same update. An interrupted round end is then completed. A round
        pending from a checkpoint (no θᵢ kept; identical on every rank) is kept."""
        self.comm = comm
        if self._pending_local is not None:
            self._pending = None
            self._pending_mean = comm.all_reduce(self._pending_local.clone(), op="avg")
        if interrupted and self.steps_since_sync > 0:
            self.round_end()

    @torch.no_grad()
    def adopt_completed_exchange(self, comm: Comm, src: int, completed: bool) -> None:
        """The round end completed on ``src`` (and maybe others) but failed part-way here: waiting for the
        previous round's average, or starting this round's all-reduce. Such a worker finishes its half
        (it keeps its parameters θᵢ of this round, as the others did) and takes
        ``src``'s outcome: the round counters (one small ``all_gather``), then φ and m (``src``'s
        broadcast; they include the previous round's average, with every worker's contribution). Then,
        as after any peer loss, every survivor redoes this round's all-reduce from its kept θᵢ over
        ``comm`` (:meth:`continue_after_peer_loss`), applied at the next round end."""
        if not completed:
            self._pending_local = flatten(cpu_fp32(self.params))  # a new tensor (flatten copies)
            self._pending = self._pending_mean = None
            self.steps_since_sync = 0
        self.comm = comm
        rounds, updates = membership_roles(comm, src, not completed, (self.rounds, self.updates))[1]
        broadcast_flat(comm, [self.outer_params, self.momentum], src=src)
        self._adopt()
        self.rounds, self.updates, self._active = int(rounds), int(updates), True
        self.continue_after_peer_loss(comm, interrupted=False)

    def _has_pending(self) -> bool:
        return self._pending is not None or self._pending_mean is not None

    def _resolve(self) -> None:
        """Wait for the all-reduce in flight, if any, and keep its average until it is applied."""
        if self._pending is not None:
            self._pending_mean = self._pending.wait()
            self._pending = None

    def _take_pending(self) -> torch.Tensor:
        self._resolve()
        mean, self._pending_mean, self._pending_local = self._pending_mean, None, None
        return mean

    @torch.no_grad()
    def _apply(self, mean_params: torch.Tensor) -> None:
        """The outer step for a round whose all-reduce returned ``mean_params`` (x̄): g = φ − x̄."""
        g = self.outer_params - mean_params  # from the current φ (module docstring)
        m = self.momentum
        m.mul_(self.outer_momentum).add_(g, alpha=1.0 / self.staleness_penalty)
        c = self.clip_threshold
        self.last_clipped_fraction = float((m.abs() > c).float().mean())
        m.clamp_(-c, c)  # in place: the clipped momentum is the one used and kept
        if self.nesterov:  # torch.optim.SGD's Nesterov form, on the clipped momentum: g + beta * m
            self.outer_params.add_(g, alpha=-self.outer_lr / self.staleness_penalty)
            self.outer_params.add_(m, alpha=-self.outer_lr * self.outer_momentum)
        else:
            self.outer_params.add_(m, alpha=-self.outer_lr)
        self.updates += 1

    @torch.no_grad()
    def _adopt(self) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(self.outer_params[offset : offset + n].view_as(p).to(p.device, p.dtype))
            offset += n

    def metrics(self) -> dict[str, float]:
        return {
            "outer_rounds": float(self.rounds),
            "outer_momentum_max_abs": float(self.momentum.abs().max()) if self.momentum.numel() else 0.0,
            "outer_momentum_clipped_fraction": self.last_clipped_fraction,
        }

    def state_dict(self) -> dict[str, Any]:
        """φ, m, the round position and the pending round: an all-reduce in flight is waited for
        (all ranks already issued it) and its average saved, so a resumed run applies it on time."""
        self._resolve()
        return {
            "format": STATE_FORMAT,
            "algorithm": self.name,
            "outer_params": self.outer_params.clone(),
            "momentum": self.momentum.clone(),
            "pending_mean": None if self._pending_mean is None else self._pending_mean.clone(),
            "steps_since_sync": self.steps_since_sync,
            "rounds": self.rounds,
            "updates": self.updates,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state_algorithm(state)
        state = _upgrade_state(state)
        for key in ("outer_params", "momentum", "pending_mean"):
            if state[key] is not None and state[key].shape != self.outer_params.shape:
                raise ValueError(f"co2 checkpoint: {key} has shape {tuple(state[key].shape)}, the model needs "
                                 f"{tuple(self.outer_params.shape)}")
        self.outer_params.copy_(state["outer_params"])
        self.momentum.copy_(state["momentum"])
        pending = state["pending_mean"]
        self._pending, self._pending_local = None, None
        self._pending_mean = None if pending is None else pending.clone()
        self.steps_since_sync = int(state["steps_since_sync"])
        self.rounds = int(state["rounds"])
        self.updates = int(state["updates"])
        self._loaded = True

    def bytes_per_inner_step(self, num_params: int, world_size: int) -> float:
        n = world_size
        return 0.0 if n <= 1 else 2 * (n - 1) / n * 4 * num_params / self.sync_every


def _upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 state (its pending result a mean Δ̄ from the round's start) as format 2. The saved φ is
    the φ that round's update will be measured from (nothing is applied before it), so x̄ = φ − Δ̄ gives
    that one round the update it would have had (g = Δ̄); later rounds follow the current rule."""
    fmt = state.get("format", 1)
    if fmt == STATE_FORMAT:
        return state
    if fmt != 1:
        raise ValueError(f"co2 state format {fmt!r} is not supported (this version reads 1 and {STATE_FORMAT}): "
                         f"resume with the version that wrote it, or start without the checkpoint")
    delta = state.get("pending_average")
    upgraded = {k: v for k, v in state.items() if k != "pending_average"}
    upgraded["format"] = STATE_FORMAT
    upgraded["pending_mean"] = None if delta is None else state["outer_params"] - delta
    return upgraded
