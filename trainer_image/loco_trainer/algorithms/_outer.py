"""What the outer-loop strategies (DiLoCo, Streaming DiLoCo, NoLoCo, CO2) share.

Each of them takes inner steps locally and, every H = ``sync_every`` steps, runs an outer step with
learning rate ``outer_lr`` and momentum ``outer_momentum`` over its copy of the *trainable*
parameters. :class:`OuterLoopStrategy` holds that common part: argument validation (the same
``ValueError`` wording everywhere), the bookkeeping attributes, the trainable-parameter list, the
initial broadcast from rank 0 and the checkpoint's algorithm check. The update rules, their state
and their ``state_dict`` layouts stay in each algorithm's module. :func:`require_positive` is also
used by DDP (``bucket_mb``).
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch

from loco_trainer.algorithms.base import Strategy
from loco_trainer.comm import Comm, broadcast_flat


def require_positive(label: str, value: float) -> None:
    """Raise ``ValueError("<label> must be > 0 (got <value>)")`` unless ``value > 0``."""
    if value <= 0:
        raise ValueError(f"{label} must be > 0 (got {value})")


def validate_outer_args(sync_every: int, outer_lr: float, outer_momentum: float) -> None:
    """Check H >= 1, η > 0 and μ in [0, 1); ``ValueError`` naming the argument otherwise."""
    if sync_every < 1:
        raise ValueError(f"sync_every (H) must be >= 1 (got {sync_every})")
    require_positive("outer_lr", outer_lr)
    if not 0 <= outer_momentum < 1:
        raise ValueError(f"outer_momentum must be in [0, 1) (got {outer_momentum})")


class OuterArgs(TypedDict):
    """The keyword arguments every outer-loop strategy takes: H, η, μ (see :func:`validate_outer_args`)."""

    sync_every: int
    outer_lr: float
    outer_momentum: float


def outer_args(spec: Any) -> OuterArgs:
    """H, η and μ from an algorithm spec (the trainer config's ``algorithm``), as constructor keywords."""
    return OuterArgs(sync_every=spec.sync_every, outer_lr=spec.outer_lr, outer_momentum=spec.outer_momentum)


def cpu_fp32(params: list[torch.Tensor], *, copy: bool = False) -> list[torch.Tensor]:
    """Detached fp32 CPU versions of ``params`` (fresh copies with ``copy=True``; otherwise a
    tensor already fp32 on the CPU is returned as is, sharing storage)."""
    return [p.detach().to("cpu", torch.float32, copy=copy) for p in params]


class OuterLoopStrategy(Strategy):
    """Base of the strategies with an inner/outer loop (see the module docstring).

    Subclasses call :meth:`_init_outer` first in ``__init__`` (after validating their own
    arguments), which validates the common ones and sets:

    ``model``, ``inner_optimizer``, ``comm``, ``sync_every``, ``outer_lr``, ``outer_momentum``;
    ``param_names`` / ``params``: the trainable named parameters, in ``named_parameters()`` order
    (the order every flat exchange and every ``state_dict`` key list follows);
    ``steps_since_sync = 0`` (inner steps since the last outer step) and ``_loaded = False`` (set
    by ``load_state_dict`` so ``setup`` keeps the loaded state).
    """

    def _init_outer(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer | None, comm: Comm, *,
                    sync_every: int, outer_lr: float, outer_momentum: float) -> None:
        validate_outer_args(sync_every, outer_lr, outer_momentum)
        self.model, self.inner_optimizer, self.comm = model, inner_optimizer, comm
        self.sync_every, self.outer_lr, self.outer_momentum = sync_every, outer_lr, outer_momentum
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.steps_since_sync = 0
        self._loaded = False

    def at_membership_boundary(self) -> bool:
        """Right after an outer step (DiLoCo, NoLoCo, CO2; Streaming DiLoCo has its own schedule)."""
        return self.steps_since_sync == 0

    def _require_round_boundary(self, last: str) -> None:
        """``RuntimeError`` unless this worker is at a round boundary (``last`` names what ended the round)."""
        if self.steps_since_sync != 0:
            raise RuntimeError(
                f"on_membership_change must be called at a round boundary ({self.steps_since_sync} inner steps "
                f"since the {last}); call finish() first"
            )

    def _broadcast_model_from_rank0(self) -> None:
        """Every rank adopts rank 0's parameters (all of them, trainable or not) and buffers."""
        broadcast_flat(self.comm, [p.data for p in self.model.parameters()] + list(self.model.buffers()), src=0)

    def _check_state_algorithm(self, state: dict[str, Any]) -> None:
        """``ValueError`` unless the checkpoint's algorithm state was written by this algorithm."""
        if state.get("algorithm") != self.name:
            raise ValueError(
                f"checkpoint holds algorithm state of {state.get('algorithm')!r}, not {self.name!r}: resume with the "
                f"same algorithm.name or start without the checkpoint"
            )
