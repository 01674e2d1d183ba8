"""The one small strategy interface every distributed algorithm implements.

The training loop (``loco_trainer.train``) is identical for every algorithm; it calls these hooks,
in this order, on every rank:

    strategy = make_strategy(spec, model, inner_optimizer, comm)   # registry in algorithms/__init__
    strategy.setup()                       # once, after any checkpoint was loaded (e.g. broadcast
                                           # or adopt the global parameters)
    for step in range(start_step, total_steps):
        loss = forward/backward(...)       # the model may be strategy.wrap(model)'s result
        strategy.after_backward(step)      # DDP: gradients averaged (or nothing, if a comm hook did)
        clip, inner_optimizer.step(), zero_grad
        strategy.after_inner_step(step)    # sync points: DiLoCo's outer step when (step+1) % H == 0
    strategy.finish()                      # drain async work; leave every rank with the final model

``step`` is the 0-based index of the inner step just taken. A strategy communicates only through
the :class:`loco_trainer.comm.Comm` it was given, which counts bytes and times collectives.

Checkpoints: ``state_dict()`` returns the algorithm's own state (outer optimizer, global
parameters, fragment schedule, pending async round, ...) as a dict of tensors and plain values;
``load_state_dict()`` takes it back. Model and inner optimizer state are saved by the loop.
"""

from __future__ import annotations

import abc
from typing import Any

import torch


class Strategy(abc.ABC):
    """Base class of DDP, DiLoCo, Streaming DiLoCo, NoLoCo and CO2."""

    #: the ``algorithm.name`` this strategy implements
    name: str = ""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop runs forward/backward on (default: the model itself)."""
        return model

    def setup(self) -> None:
        """Called once before the first step, after any checkpoint was loaded."""

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

    def metrics(self) -> dict[str, float]:
        """Algorithm-specific gauges for logs and /metrics (e.g. outer rounds, worker spread)."""
        return {}

    def bytes_per_inner_step(self, num_params: int, world_size: int) -> float:
        """Expected bytes sent per rank per inner step (the formula in docs/algorithms.md)."""
        raise NotImplementedError
