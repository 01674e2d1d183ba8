"""NoLoCo: No-all-reduce Low Communication training (Kolehmainen et al., 2025, arXiv:2506.10911).

No collective at all: every H inner steps the ranks are split into random groups of G (2 in the
paper) by a permutation drawn from an RNG seeded with (seed, round) — identical on every rank
without any communication — and each group exchanges its members' outer weights φⱼ and outer
gradients (θⱼ − φⱼ) point-to-point. Worker i then (``nesterov``, the default) takes DiLoCo's Nesterov
step on the group's mean outer gradient, and pulls towards the group's mean outside the momentum (a
one-off correction, not a direction to keep):

    m  ← β·m + meanⱼ(θⱼ − φⱼ)                                  j over i's group (i included)
    φᵢ ← φᵢ + α·(meanⱼ(θⱼ − φⱼ) + β·m) + γ·(meanⱼ φⱼ − φᵢ)
    θᵢ ← φᵢ                                                    inner optimizer state is kept

or, with ``nesterov=False``, the paper's modified Nesterov step (β = 0.5 in the paper):

    m  ← β·m + α·meanⱼ(θⱼ − φⱼ) + γ·(meanⱼ φⱼ − φᵢ)
    φᵢ ← φᵢ + m ;  θᵢ ← φᵢ

The γ term pulls the worker towards its group's mean and is what keeps the replicas from drifting
apart; the authors' code uses γ = α, the paper writes it as a separate coefficient, so both are
exposed. Workers never hold identical weights; :attr:`last_spread` (RMS distance of the group's
outer weights from their mean, before the step) reports how far apart they are.

Over one group of every worker the replicas never differ and this is DiLoCo to rounding (tested). Why it
exists: the paper's rule (β = 0.5, no Nesterov) trailed DiLoCo by ~7 points at our 10,000-step setting,
and neither groups of every worker (~6 points left) nor β = 0.9 alone (~6) closed it: DiLoCo's
Nesterov step is what the gap was (docs/algorithms.md, "NoLoCo: why it trailed").

Symbols -> arguments: H -> ``sync_every``, α -> ``outer_lr`` (0.7), β -> ``outer_momentum`` (0.9; the paper's
rule takes 0.5), γ -> ``mean_pull`` (default α), G -> ``group_size`` (2), seed -> ``seed``, ``nesterov`` (on); in a
TrainingJob ``spec.algorithm`` these are ``syncEvery``, ``outerLr``, ``outerMomentum``, ``meanPull``,
``groupSize``, ``groupSeed`` and ``nesterov``.

Bytes per inner step per rank: (G−1) · 2 · 4N / H (φ and θ−φ in fp32 to each peer), independent of
the number of workers (exact when G divides n; a rank in the one larger group sends G · 8N / H). With
``final_merge`` the run ends with one all-reduce average of the weights (2(n−1)/n · 4N once), after which every
worker holds the same model.

Membership change (:meth:`NoLoCo.on_membership_change`, at a round boundary, called by every member
of the new group). Survivors keep everything: their own φᵢ, mᵢ, θᵢ (= φᵢ at the boundary) and inner
optimizer state. Each joiner adopts the group rank ``src``'s φ and m (sent to the joiners only, point
to point: 2 · 4N bytes per joiner from ``src``), sets θ = φ_src, and takes ``src``'s step and round
counters; its inner optimizer state is its own (fresh or from its checkpoint), model buffers are not
exchanged. From the next round on the gossip permutation is drawn over the new group's ranks
0..n'−1 (same (seed, round) rule), so a departed worker is never a partner again. Which members join
is agreed with one small all_gather (see :func:`loco_trainer.algorithms.base.membership_roles`).

After a lost peer (:meth:`NoLoCo.continue_after_peer_loss`, survivors only, at the same step): a
survivor whose gossip the loss interrupted (its partner died, or the group was aborted mid-exchange)
skips that round's update: nothing was changed before every transfer completed, so it keeps φᵢ, mᵢ,
θᵢ, and the round counts as taken. Its partner may have completed the same exchange and applied it;
both stay valid NoLoCo replicas (they differ by design), which is why each survivor decides on its own
(:attr:`interruption_is_local`). The next rounds draw their groups over the survivors.
"""

from __future__ import annotations

from typing import Any, Unpack

import torch

from loco_trainer.algorithms._outer import OuterArgs, OuterLoopStrategy, cpu_fp32, outer_args
from loco_trainer.algorithms.base import membership_roles
from loco_trainer.comm import Comm, flatten, unflatten_into

STATE_FORMAT = 1


def gossip_groups(world_size: int, group_size: int, round_index: int, seed: int = 0) -> list[list[int]]:
    """The groups of round ``round_index``: a permutation of the ranks from ``torch.Generator``
    seeded with (seed, round), cut into consecutive groups of ``group_size``; a remainder too small
    to form a group (fewer than 2 ranks) joins the last group. Pure: identical on every rank."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (got {group_size})")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
    perm = torch.randperm(world_size, generator=gen).tolist()
    groups = [perm[i : i + group_size] for i in range(0, world_size, group_size)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        groups[-2].extend(groups.pop())
    return [sorted(g) for g in groups]


class NoLoCo(OuterLoopStrategy):
    """NoLoCo (see the module docstring).

    Args:
        model, inner_optimizer, comm: as for every strategy.
        sync_every: H. outer_lr: α. outer_momentum: β. mean_pull: γ (None: = α). group_size: G.
        seed: seed of the group permutation (the same on all ranks).
        init_sync: ``setup()`` broadcasts rank 0's initial parameters (a one-time broadcast, before
            training; False relies on identically seeded initialisation and issues no collective at all).
        final_merge: :meth:`finish` ends with one all-reduce average of the workers' weights, so every worker
            holds the same model (the one a job saves and serves); off, they end as different NoLoCo replicas.
        nesterov: DiLoCo's Nesterov step on the group's mean outer gradient, the pull kept out of the momentum
            (module docstring; the default); off, the paper's modified Nesterov rule. m means different things in the two
            forms: keep the setting for the life of a run.
    """

    name = "noloco"
    interruption_is_local = True

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer | None, comm: Comm, *,
                 group_size: int = 2, mean_pull: float | None = None, seed: int = 0, init_sync: bool = True,
                 final_merge: bool = False, nesterov: bool = True, **outer: Unpack[OuterArgs]) -> None:
        self._init_outer(model, inner_optimizer, comm, **outer)
        if group_size < 2:
            raise ValueError(f"groupSize must be >= 2 (got {group_size})")
        self.mean_pull = self.outer_lr if mean_pull is None else mean_pull
        self.group_size = group_size
        self.seed = seed
        self.init_sync = init_sync
        self.final_merge = final_merge
        self.nesterov = bool(nesterov)
        #: φᵢ, this worker's outer weights (fp32, CPU)
        self.outer_params = cpu_fp32(self.params, copy=True)
        #: m, the outer momentum
        self.momentum = [torch.zeros_like(o) for o in self.outer_params]
        #: inner steps taken so far
        self.t = 0
        self.rounds = 0
        #: RMS distance of the group's outer weights from their mean at the last round (0 before any)
        self.last_spread = 0.0
        #: the group of the last round (group ranks)
        self.last_group: list[int] = []
        #: True once this worker took a gossip round or joined a membership: it has state of its own
        #: (the default ``joining`` of :meth:`on_membership_change` is ``not _active``)
        self._active = False

    @classmethod
    def from_spec(cls, spec: Any, model: torch.nn.Module, inner_optimizer: Any, comm: Comm) -> "NoLoCo":
        return cls(model, inner_optimizer, comm, **outer_args(spec), group_size=spec.group_size,
                   mean_pull=spec.mean_pull, seed=spec.group_seed if spec.group_seed is not None else 0,
                   final_merge=bool(spec.final_merge), nesterov=bool(spec.nesterov))

    def setup(self) -> None:
        """Fresh start: (with ``init_sync``) every rank adopts rank 0's parameters, then φ = θ."""
        if self._loaded:
            return
        if self.init_sync:
            self._broadcast_model_from_rank0()
        with torch.no_grad():
            for o, p in zip(self.outer_params, self.params):
                o.copy_(p.detach())

    def after_inner_step(self, step: int) -> None:
        """After step s with (s+1) % H == 0: one gossip round (round index (s+1)//H)."""
        self.steps_since_sync += 1
        self.t = step + 1
        if (step + 1) % self.sync_every == 0:
            self.gossip((step + 1) // self.sync_every)

    def finish(self) -> None:
        """One last gossip round over a partial round, if any. Workers still differ afterwards (that is NoLoCo; the
        loop saves rank 0's model), unless ``final_merge``: then one all-reduce averages their weights (φ = θ after
        the round), the only all-reduce of the run."""
        if self.steps_since_sync > 0:
            self.gossip(self.t // self.sync_every + 1)  # the index the partial round would have had
        if self.final_merge and self.comm.world_size > 1:
            with torch.no_grad():
                flat = self.comm.all_reduce(flatten(self.outer_params), op="avg")
                unflatten_into(flat, self.outer_params)
                for o, p in zip(self.outer_params, self.params):
                    p.copy_(o.to(p.device, p.dtype))

    @torch.no_grad()
    def gossip(self, round_index: int) -> None:
        """Exchange φ and θ−φ with this round's group and apply the modified Nesterov step."""
        n = self.comm.world_size
        local = cpu_fp32(self.params)
        deltas = [t - o for t, o in zip(local, self.outer_params)]
        mine = torch.cat([flatten(self.outer_params), flatten(deltas)])  # [φ | θ−φ], 2N floats
        if n == 1:
            group, received = [0], []
        else:
            group = next(g for g in gossip_groups(n, self.group_size, round_index, self.seed) if self.comm.rank in g)
            peers = [r for r in group if r != self.comm.rank]
            buffers = [torch.empty_like(mine) for _ in peers]
            ops = [("send", mine, r) for r in peers] + [("recv", b, r) for b, r in zip(buffers, peers)]
            for handle in self.comm.batch_isend_irecv(ops):
                handle.wait()
            received = buffers
        everyone = [mine] + received
        mean = torch.stack(everyone).mean(dim=0)
        numel = mine.numel() // 2
        mean_phi, mean_delta = mean[:numel], mean[numel:]
        my_phi = mine[:numel]
        self.last_spread = float(torch.stack([e[:numel] - mean_phi for e in everyone]).pow(2).mean().sqrt())
        flat_m = flatten(self.momentum)
        if self.nesterov:
            # DiLoCo's outer step on the group's mean outer gradient, plus the pull towards the group's mean,
            # which stays out of the momentum (a pull is a correction to make once, not a direction to keep)
            flat_m.mul_(self.outer_momentum).add_(mean_delta)
            step = (mean_delta + self.outer_momentum * flat_m).mul_(self.outer_lr).add_(mean_phi - my_phi, alpha=self.mean_pull)
        else:
            flat_m.mul_(self.outer_momentum).add_(mean_delta, alpha=self.outer_lr).add_(mean_phi - my_phi, alpha=self.mean_pull)
            step = flat_m
        unflatten_into(flat_m, self.momentum)
        steps = [torch.empty_like(o) for o in self.outer_params]
        unflatten_into(step, steps)
        for o, d, p in zip(self.outer_params, steps, self.params):
            o.add_(d)
            p.copy_(o.to(p.device, p.dtype))
        self.last_group = group
        self.steps_since_sync = 0
        self.rounds += 1
        self._active = True

    # --------------------------------------------------------------------------- membership

    @torch.no_grad()
    def on_membership_change(self, comm: Comm, src: int = 0, *, joining: bool | None = None) -> None:
        """Switch to the group ``comm`` at a round boundary, without restarting the survivors.

        Every member of the new group calls it (a departing worker does not). ``joining``: whether
        this worker joins (adopts ``src``'s state) or survives (keeps its own); default: it joins
        unless it has taken a gossip round in this process or joined before. Survivors keep φ, m, θ
        and the inner optimizer state; a joiner receives ``src``'s φ and m point to point, sets
        θ = φ, and adopts ``src``'s inner-step and round counters (its loop must resume at that step,
        ``self.t``). ``src`` must be a survivor unless every member joins. The following rounds draw
        their gossip groups over the new ranks. Raises ``RuntimeError`` mid-round and ``ValueError``
        (on every member alike) for a joining ``src`` or survivors at different steps.
        """
        self._require_round_boundary("last gossip round")
        joining = not self._active if joining is None else joining
        joiners, (t, rounds) = membership_roles(comm, src, joining, (self.t, self.rounds))
        self.comm = comm
        me = comm.rank
        payload = torch.cat([flatten(self.outer_params), flatten(self.momentum)])  # [φ | m]
        if me == src:
            ops = [("send", payload, r) for r, j in enumerate(joiners) if j and r != src]
        elif joining:
            ops = [("recv", payload, src)]
        else:
            ops = []
        for handle in comm.batch_isend_irecv(ops):
            handle.wait()
        if joining:
            numel = payload.numel() // 2
            unflatten_into(payload[:numel], self.outer_params)
            unflatten_into(payload[numel:], self.momentum)
            for o, p in zip(self.outer_params, self.params):
                p.copy_(o.to(p.device, p.dtype))
            self.t, self.rounds = int(t), int(rounds)
            self.last_spread, self.last_group = 0.0, []
            self._loaded = True  # a later setup() keeps the adopted state
        self._active = True

    def continue_after_peer_loss(self, comm: Comm, interrupted: bool) -> None:
        """Go on over ``comm`` (the survivors). ``interrupted``: this worker's gossip of the round just
        ended failed; its update is skipped (nothing had changed) and the round counts as taken, so
        every survivor's round counter stays in step. See the module docstring."""
        self.comm = comm
        if interrupted and self.steps_since_sync > 0:
            self.steps_since_sync = 0
            self.rounds += 1
            self.last_group = []
        self._active = True  # a survivor: its state is its own (a later membership change keeps it)

    def p2p_covers_links(self, world_size: int) -> bool:
        """True when every round's gossip is one group of all the ranks: ``2 <= world_size <= G + 1``
        (a remainder of one rank joins the last group, see :func:`gossip_groups`). Each rank then
        sends to and receives from every other rank every round, so one outer step samples every
        ordered pair. With more ranks the groups are drawn at random each round: a pair meets with
        probability about (G-1)/(n-1) a round and can go unsampled for any number of rounds, so there
        is no bound and the loop keeps probing. Probing only the pairs a round missed would save little:
        a probe costs its two barriers, not its 4 KiB transfers."""
        return 2 <= world_size <= self.group_size + 1

    def metrics(self) -> dict[str, float]:
        return {"outer_rounds": float(self.rounds), "worker_spread": self.last_spread}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "algorithm": self.name,
            "outer_params": {n: o.clone() for n, o in zip(self.param_names, self.outer_params)},
            "momentum": {n: m.clone() for n, m in zip(self.param_names, self.momentum)},
            "steps_since_sync": self.steps_since_sync,
            "t": self.t,
            "rounds": self.rounds,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state_algorithm(state)
        for key, targets in (("outer_params", self.outer_params), ("momentum", self.momentum)):
            saved = state[key]
            if set(saved) != set(self.param_names):
                raise ValueError(f"noloco checkpoint {key} does not match the model's parameters")
            for name, t in zip(self.param_names, targets):
                if saved[name].shape != t.shape:
                    raise ValueError(f"noloco checkpoint: {key}[{name!r}] has shape {tuple(saved[name].shape)}, "
                                     f"the model's has {tuple(t.shape)}")
                t.copy_(saved[name])
        self.steps_since_sync = int(state["steps_since_sync"])
        self.t = int(state["t"])
        self.rounds = int(state["rounds"])
        self._loaded = True

    def bytes_per_inner_step(self, num_params: int, world_size: int) -> float:
        if world_size <= 1:
            return 0.0
        return (min(self.group_size, world_size) - 1) * 2 * 4 * num_params / self.sync_every
