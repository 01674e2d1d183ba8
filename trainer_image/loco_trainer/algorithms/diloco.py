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

Adaptive local steps (``adaptive_steps``, the FedCompass idea; ``adaptive_steps.py`` has the rule): worker i
computes Hᵢ <= H of each round's H positions, set from the step times the workers measured in the last round
(exchanged in the outer step's all-reduce, 4n bytes more), and the outer gradient is the step-weighted mean
Σᵢ Tᵢ·Δᵢ / Σⱼ Tⱼ. With equal speeds every Hᵢ = H and the step is the one above, bit for bit.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Unpack

import torch

from loco_trainer.algorithms._outer import OuterArgs, OuterLoopStrategy, outer_args, require_positive
from loco_trainer.algorithms import adaptive_steps as adaptive
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
        adaptive_steps: ``(min_steps, tolerance)`` to set each worker's inner steps per round from its
            measured step rate (``algorithm.adaptiveSteps``); None: every worker takes H.
        clock: the seconds clock the step times are measured with (tests pass a fake one).

    The global parameters are fp32 copies keyed by parameter name; ``state_dict()`` holds them, the
    outer optimizer state and the position inside the current round.
    """

    name = "diloco"

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer | None, comm: Comm, *,
                 nesterov: bool = True, bucket_mb: float = 32.0, offload: bool = True,
                 adaptive_steps: tuple[int, float] | None = None, clock: Callable[[], float] = time.perf_counter,
                 **outer: Unpack[OuterArgs]) -> None:
        self._init_outer(model, inner_optimizer, comm, **outer)
        require_positive("bucket_mb", bucket_mb)
        if adaptive_steps is not None:
            min_steps, tolerance = adaptive_steps
            if not 1 <= min_steps <= self.sync_every:
                raise ValueError(f"adaptive_steps min_steps must be in [1, sync_every={self.sync_every}] (got {min_steps})")
            if not 0 <= tolerance <= 1:
                raise ValueError(f"adaptive_steps tolerance must be in [0, 1] (got {tolerance})")
        self.adaptive = adaptive_steps
        self._clock = clock
        self._step_clock = adaptive.StepClock()
        #: each group rank's inner steps per round (all H unless adaptive steps moved them)
        self.local_steps = [self.sync_every] * comm.world_size
        #: the step times (s) the last plan was made from, by group rank (empty before the first one)
        self.step_seconds: list[float] = []
        #: the step times each round measured, by group rank, oldest first (the last HISTORY_ROUNDS rounds)
        self.step_history: list[list[float]] = []
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
        steps = spec.adaptive_steps
        return cls(
            model,
            inner_optimizer,
            comm,
            **outer_args(spec),
            nesterov=spec.nesterov,
            adaptive_steps=None if steps is None else (steps.min_steps, steps.tolerance),
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

    def takes_step(self, step: int) -> bool:
        """Whether this worker computes the inner step at this round position (always, unless adaptive steps
        gave it fewer than H this round)."""
        return self.adaptive is None or adaptive.computes(
            self.steps_since_sync, self.local_steps[self.comm.rank], self.sync_every)

    def after_inner_step(self, step: int) -> None:
        """Count the step; after step s with (s+1) % H == 0, run the outer step (all ranks)."""
        if self.adaptive is not None:
            self._step_clock.note(self._clock(), self.takes_step(step))
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
        exchanged, times = pseudo_grads, None
        if self.adaptive is not None:
            # the step-weighted mean, and each worker's step time for the next round's plan, in the same all-reduce
            taken = [adaptive.steps_taken(self.steps_since_sync, h, self.sync_every) for h in self.local_steps]
            weight = adaptive.outer_weights(taken)[self.comm.rank]
            if weight != 1.0:
                torch._foreach_mul_(pseudo_grads, weight)
            times = torch.zeros(self.comm.world_size, dtype=torch.float32, device=pseudo_grads[0].device)  # one bucket
            times[self.comm.rank] = self._step_clock.median()
            exchanged = [*pseudo_grads, times]
        all_reduce_flat(self.comm, exchanged, op="avg", bucket_bytes=self.bucket_bytes)
        for g, d in zip(self.global_params, pseudo_grads):
            g.grad = d
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._adopt_global()
        self.steps_since_sync = 0
        self.outer_steps += 1
        if times is not None:
            self._replan([float(t) * self.comm.world_size for t in times])

    def _replan(self, step_seconds: list[float]) -> None:
        """The next round's steps per worker from the step times every rank now holds (identical on every rank)."""
        min_steps, tolerance = self.adaptive
        self.step_history = [*self.step_history, step_seconds][-adaptive.HISTORY_ROUNDS:]
        self.step_seconds = step_seconds = adaptive.steady_step_seconds(self.step_history)
        self.local_steps = adaptive.plan_local_steps(step_seconds, self.local_steps, sync_every=self.sync_every,
                                                     min_steps=min_steps, tolerance=tolerance)
        self._step_clock.restart(self._clock())

    def _reset_local_steps(self) -> None:
        """A new group (membership change, lost peer): every worker takes H until the first round is measured."""
        self.local_steps = [self.sync_every] * self.comm.world_size
        self.step_seconds, self.step_history = [], []
        self._step_clock.restart(None)

    @torch.no_grad()
    def _adopt_global(self) -> None:
        for p, g in zip(self.params, self.global_params):
            p.copy_(g.to(p.device, non_blocking=True))

    @torch.no_grad()
    def _reset_global_from_model(self) -> None:
        for g, p in zip(self.global_params, self.params):
            g.copy_(p.detach())

    def metrics(self) -> dict[str, float]:
        values = {"outer_steps": float(self.outer_steps), "steps_since_sync": float(self.steps_since_sync)}
        if self.adaptive is not None:
            values["local_steps"] = float(self.local_steps[self.comm.rank])
            if self.step_seconds:
                values["step_seconds"] = self.step_seconds[self.comm.rank]
        return values

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
        self._reset_local_steps()
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
        self._reset_local_steps()
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
        self._reset_local_steps()
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
            **({} if self.adaptive is None else {"local_steps": list(self.local_steps),
                                                 "step_seconds": list(self.step_seconds),
                                                 "step_history": [list(row) for row in self.step_history]}),
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
        saved_steps = [int(h) for h in state.get("local_steps", [])]
        if self.adaptive is not None and len(saved_steps) == self.comm.world_size:  # same workers: keep their plan
            self.local_steps, self.step_seconds = saved_steps, [float(t) for t in state.get("step_seconds", [])]
            self.step_history = [[float(t) for t in row] for row in state.get("step_history", [])]
        elif self.adaptive is not None:  # another world size (or a checkpoint without a plan): measure again
            self._reset_local_steps()
        self._loaded = True

    def bytes_per_inner_step(self, num_params: int, world_size: int) -> float:
        n = world_size
        return 0.0 if n <= 1 else 2 * (n - 1) / n * 4 * num_params / self.sync_every
