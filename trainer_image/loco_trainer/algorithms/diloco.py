"""DiLoCo: Distributed Low-Communication training (Douillard et al., 2023, arXiv:2311.08105).

Update rule. Every worker i starts a round from the global parameters θ and takes H inner steps
with its own inner optimizer (AdamW in the paper), reaching θᵢ. Then, with one all-reduce:

    Δ   = (1/n) Σᵢ (θ − θᵢ)          outer (pseudo-)gradient: points *against* the direction the workers moved
    v   ← μ·v + Δ                    outer momentum
    θ   ← θ − η·(Δ + μ·v)            Nesterov (θ ← θ − η·v without Nesterov)
    θᵢ  ← θ on every worker          the inner optimizer state (AdamW moments) is kept

i.e. ``torch.optim.SGD(global_params, lr=η, momentum=μ, nesterov=True)`` stepped with ``grad = Δ``.
With η = 1, μ = 0 the outer step is plain parameter averaging (θ ← mean θᵢ), and with H = 1 and an
inner SGD it is exactly DDP.

Symbols -> arguments: H -> ``sync_every``, η -> ``outer_lr`` (paper 0.7), μ -> ``outer_momentum``
(paper 0.9), Nesterov -> ``nesterov``.

Bytes per inner step per rank (N parameters, fp32 exchange, n ranks): 2(n−1)/n · 4N / H.
"""

from __future__ import annotations

from typing import Any, Unpack

import torch

from loco_trainer.algorithms._outer import OuterArgs, OuterLoopStrategy, outer_args, require_positive
from loco_trainer.algorithms.base import membership_roles
from loco_trainer.comm import Comm, all_reduce_flat, broadcast_flat

STATE_FORMAT = 1


class DiLoCo(OuterLoopStrategy):
    """DiLoCo (see the module docstring for the update rule).

    Args:
        model: the bare module whose parameters the inner optimizer steps.
        inner_optimizer: the inner optimizer; DiLoCo never touches its state.
        comm: the group of all workers.
        sync_every: H, inner steps per round (the outer step runs after step s when (s+1) % H == 0).
        outer_lr: η. outer_momentum: μ. nesterov: Nesterov momentum (ignored when μ = 0).
        bucket_mb: size of the flat buckets the pseudo-gradient is all-reduced in.
        offload: keep the global parameters and outer momentum as fp32 on the CPU (device memory
            is left to the model); False keeps them on the parameters' device.

    The global parameters are fp32 copies keyed by parameter name; ``state_dict()`` holds them, the
    outer optimizer state and the position inside the current round.
    """

    name = "diloco"

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer | None, comm: Comm, *,
                 nesterov: bool = True, bucket_mb: float = 32.0, offload: bool = True,
                 **outer: Unpack[OuterArgs]) -> None:
        self._init_outer(model, inner_optimizer, comm, **outer)
        require_positive("bucket_mb", bucket_mb)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.nesterov = bool(nesterov) and self.outer_momentum > 0
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        pin = offload and torch.cuda.is_available()
        self.global_params = [
            torch.nn.Parameter(
                p.detach().to("cpu" if offload else p.device, torch.float32, copy=True).pin_memory()
                if pin
                else p.detach().to("cpu" if offload else p.device, torch.float32, copy=True),
                requires_grad=False,
            )
            for p in self.params
        ]
        self.outer_optimizer = torch.optim.SGD(
            self.global_params, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=self.nesterov
        )
        #: outer steps taken so far
        self.outer_steps = 0

    @classmethod
    def from_spec(cls, spec: Any, model: torch.nn.Module, inner_optimizer: Any, comm: Comm) -> "DiLoCo":
        return cls(
            model,
            inner_optimizer,
            comm,
            **outer_args(spec),
            nesterov=spec.nesterov,
        )

    # ------------------------------------------------------------------------------- hooks

    def setup(self) -> None:
        """Fresh start: every rank adopts rank 0's parameters and buffers, which become the global
        parameters. After ``load_state_dict``: the loaded global parameters are kept and the model
        is left as the loop restored it (mid-round, the local parameters differ from the global)."""
        if self._loaded:
            return
        self._broadcast_model_from_rank0()
        self._reset_global_from_model()

    def after_inner_step(self, step: int) -> None:
        """Count the step; after step s with (s+1) % H == 0, run the outer step (all ranks)."""
        self.steps_since_sync += 1
        if (step + 1) % self.sync_every == 0:
            self.sync()

    def finish(self) -> None:
        """If inner steps were taken since the last outer step (total steps not a multiple of H),
        run one final outer step over that partial round, so every rank ends with the same model —
        the global parameters. Nothing to do otherwise."""
        if self.steps_since_sync > 0:
            self.sync()

    # ---------------------------------------------------------------------------- outer step

    @torch.no_grad()
    def sync(self) -> None:
        """The outer step (every rank must call it at the same point): average the pseudo-gradient
        Δ = θ − θᵢ over the group, step the outer optimizer, adopt the new θ locally."""
        pseudo_grads = [g - p.detach().to(g.device, torch.float32) for g, p in zip(self.global_params, self.params)]
        all_reduce_flat(self.comm, pseudo_grads, op="avg", bucket_bytes=self.bucket_bytes)
        for g, d in zip(self.global_params, pseudo_grads):
            g.grad = d
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._adopt_global()
        self.steps_since_sync = 0
        self.outer_steps += 1

    @torch.no_grad()
    def _adopt_global(self) -> None:
        for p, g in zip(self.params, self.global_params):
            p.copy_(g.to(p.device, non_blocking=True))

    @torch.no_grad()
    def _reset_global_from_model(self) -> None:
        for g, p in zip(self.global_params, self.params):
            g.copy_(p.detach())

    def metrics(self) -> dict[str, float]:
        return {"outer_steps": float(self.outer_steps), "steps_since_sync": float(self.steps_since_sync)}

    # --------------------------------------------------------------------------- membership

    @torch.no_grad()
    def on_membership_change(self, comm: Comm, src: int = 0) -> None:
        """Switch to a new group at a round boundary, without restarting.

        Every member of the new group calls it (survivors and newcomers alike, after newcomers ran
        ``setup``/``load_state_dict`` or nothing at all). Group rank ``src`` (a survivor) broadcasts
        the global parameters and the outer momentum; every member adopts them as its local
        parameters; inner optimizer states are kept. Raises ``RuntimeError`` mid-round.
        """
        if self.steps_since_sync != 0:
            raise RuntimeError(
                f"on_membership_change must be called at a round boundary ({self.steps_since_sync} inner steps "
                f"since the last outer step); call finish()/sync() first"
            )
        self.comm = comm
        tensors = list(self.global_params) + self._momentum_buffers()
        broadcast_flat(comm, tensors, src=src, bucket_bytes=self.bucket_bytes)
        self._adopt_global()
        self._loaded = True

    def continue_after_peer_loss(self, comm: Comm, interrupted: bool) -> None:
        """Survivors go on with ``comm``; the lost workers' inner steps of this round are dropped.
        An interrupted outer step is run again over ``comm``: it changes nothing before its
        all-reduce completes (the pseudo-gradients are temporaries, the global parameters and the
        outer momentum are untouched), so the redo is exactly the outer step of the survivors."""
        self.comm = comm
        if interrupted and self.steps_since_sync > 0:
            self.sync()

    @torch.no_grad()
    def adopt_completed_exchange(self, comm: Comm, src: int, completed: bool) -> None:
        """The outer step completed on ``src`` (and maybe others) but not here: take its outcome. One
        small ``all_gather`` agrees on the outer-step count (the workers that completed hold one more),
        then ``src`` broadcasts the global parameters and the outer momentum, and every survivor adopts
        them. A worker whose step failed drops its round's local progress: its pseudo-gradient is already
        in the average ``src`` applied (every contribution reaches every rank before any rank completes)."""
        self.comm = comm
        (outer_steps,) = membership_roles(comm, src, not completed, (self.outer_steps,))[1]
        broadcast_flat(comm, list(self.global_params) + self._momentum_buffers(), src=src, bucket_bytes=self.bucket_bytes)
        self._adopt_global()
        self.steps_since_sync, self.outer_steps = 0, int(outer_steps)

    def _momentum_buffers(self) -> list[torch.Tensor]:
        """The outer momentum buffers, created as zeros where missing (equivalent for SGD: the first
        step then sets v = Δ either way), so every rank has the same tensors to exchange."""
        if self.outer_momentum == 0:
            return []
        buffers = []
        for g in self.global_params:
            state = self.outer_optimizer.state[g]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(g)
            buffers.append(state["momentum_buffer"])
        return buffers

    # ---------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "algorithm": self.name,
            "global_params": {n: g.detach().clone() for n, g in zip(self.param_names, self.global_params)},
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "steps_since_sync": self.steps_since_sync,
            "outer_steps": self.outer_steps,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state_algorithm(state)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.name} state format {state.get('format')!r} is not supported (expected {STATE_FORMAT})")
        saved = state["global_params"]
        missing = sorted(set(self.param_names) - set(saved))
        extra = sorted(set(saved) - set(self.param_names))
        if missing or extra:
            raise ValueError(f"{self.name} checkpoint does not match the model: missing {missing}, unexpected {extra}")
        for name, g in zip(self.param_names, self.global_params):
            if saved[name].shape != g.shape:
                raise ValueError(
                    f"{self.name} checkpoint: global parameter {name!r} has shape {tuple(saved[name].shape)}, "
                    f"the model's has {tuple(g.shape)}"
                )
            g.copy_(saved[name])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.steps_since_sync = int(state["steps_since_sync"])
        self.outer_steps = int(state["outer_steps"])
        self._loaded = True

    def bytes_per_inner_step(self, num_params: int, world_size: int) -> float:
        n = world_size
        return 0.0 if n <= 1 else 2 * (n - 1) / n * 4 * num_params / self.sync_every
