"""Why a rank failed, as the exit code the operator's failure policy reads (:class:`loco_contract.exits.ExitCode`).

The trainer raises what it knows (:class:`ConfigError`, :class:`~loco_trainer.data.DataError`,
:class:`NonFiniteLoss`); :func:`exit_code_for` maps those and the failures of torch (out of memory, a broken
process group) to the documented codes, so "a configuration error fails the job at once" needs no log reading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from loco_contract.exits import ExitCode


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the field and the fix."""


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite: the run cannot go on from here."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"the training loss is {loss} at step {step}: lower training.lr or raise training.warmupSteps "
                         f"(or set training.gradClip), then resume from the last checkpoint")


@contextlib.contextmanager
def configuration_errors() -> Iterator[None]:
    """While the run is being built from its config: a ``ValueError`` (other than a data error) is the config's
    fault (an algorithm setting the algorithm refuses, a model that cannot be built, a sharding it cannot do)."""
    from loco_trainer.data import DataError

    try:
        yield
    except (ConfigError, DataError):
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code a rank ends with after ``exc`` (see the module docstring)."""
    from loco_trainer.data import DataError

    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG
    if isinstance(exc, DataError):
        return ExitCode.DATA
    if isinstance(exc, NonFiniteLoss):
        return ExitCode.NON_FINITE_LOSS
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        return ExitCode.OUT_OF_MEMORY
    if _peer_lost(exc):
        return ExitCode.PEER_LOST
    return ExitCode.ERROR


def _peer_lost(exc: BaseException) -> bool:
    from loco_trainer.live_membership import PEER_LOSS_MARKERS
    from loco_trainer.rendezvous import RendezvousError
    from loco_trainer.waits import CommInterrupted

    if isinstance(exc, (RendezvousError, CommInterrupted)):
        return True
    return isinstance(exc, RuntimeError) and (
        type(exc).__name__.startswith("Dist") or any(marker in str(exc) for marker in PEER_LOSS_MARKERS))
