"""The distributed algorithms and the registry the training loop builds them from.

    strategy = make_strategy(config.algorithm, model, inner_optimizer, comm)

``ALGORITHMS`` maps ``algorithm.name`` (``ddp``, ``diloco``, ``streaming-diloco``, ``noloco``,
``co2``) to the :class:`~loco_trainer.algorithms.base.Strategy` subclass implementing it; each class
has ``from_spec(spec, model, inner_optimizer, comm)`` taking the *resolved* spec (paper defaults
filled in, see ``loco_contract.config.ALGORITHM_DEFAULTS``).
"""

from __future__ import annotations

import torch

from loco_trainer.algorithms.base import Strategy
from loco_trainer.algorithms.co2 import CO2
from loco_trainer.algorithms.ddp import DDP
from loco_trainer.algorithms.diloco import DiLoCo
from loco_trainer.algorithms.noloco import NoLoCo
from loco_trainer.algorithms.streaming_diloco import StreamingDiLoCo
from loco_trainer.comm import Comm
from loco_contract.config import AlgorithmSpec

ALGORITHMS: dict[str, type[Strategy]] = {
    DDP.name: DDP,
    DiLoCo.name: DiLoCo,
    StreamingDiLoCo.name: StreamingDiLoCo,
    NoLoCo.name: NoLoCo,
    CO2.name: CO2,
}


def make_strategy(spec: AlgorithmSpec, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, comm: Comm) -> Strategy:
    """The strategy for ``spec`` (resolved here, so unset parameters take the paper defaults).

    ``model`` is the bare module whose parameters ``inner_optimizer`` steps; ``comm`` is the group
    of all workers. Raises ``ValueError`` naming ``algorithm.name`` for an unknown algorithm.
    """
    resolved = spec.resolved()
    name = resolved.name.value
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"algorithm.name {name!r} is not available in this trainer (available: {', '.join(sorted(ALGORITHMS))})"
        ) from None
    return cls.from_spec(resolved, model, inner_optimizer, comm)


def num_parameters(model: torch.nn.Module) -> int:
    """Trainable parameter count N used by the ``bytes_per_inner_step`` formulas."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ALGORITHMS", "CO2", "DDP", "DiLoCo", "NoLoCo", "Strategy", "StreamingDiLoCo", "make_strategy", "num_parameters",
]

