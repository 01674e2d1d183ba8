"""``python -m loco_trainer --config FILE [--nproc N]``: see :mod:`loco_trainer.launcher`."""

from loco_trainer.cli import train

if __name__ == "__main__":
    train(prog_name="python -m loco_trainer")
