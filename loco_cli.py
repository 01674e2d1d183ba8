"""The single ``loco`` console command.

Each subcommand lives with the package it belongs to and is imported only when it is called,
so ``loco ckpt`` never imports the operator and ``loco local`` never imports torch:

==============  ====================================  =================================
subcommand      defined in                            needs extra
==============  ====================================  =================================
``local``       ``loco_local.cli:local``              ``operator``
``operator``    ``loco_operator.cli:operator``        ``operator``
``crds``        ``loco_operator.cli:crds``            (none)
``ckpt``        ``loco_trainer.ckpt_cli:ckpt``        ``trainer``
``train``       ``loco_trainer.cli:train``            ``trainer``
``diagnose``    ``loco_detector.cli``                 ``operator``
==============  ====================================  =================================
"""

from __future__ import annotations

import importlib

import click

#: subcommand name -> ("module", "attribute", one-line help shown by ``loco --help``)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "local": ("loco_local.cli", "local", "Run the embedded local cluster (API server + kubelet)."),
    "operator": ("loco_operator.cli", "operator", "Run the TrainingJob operator."),
    "crds": ("loco_operator.cli", "crds", "Print or write the generated TrainingJob CRD."),
    "ckpt": ("loco_trainer.ckpt_cli", "ckpt", "Inspect, verify and convert checkpoints."),
    "train": ("loco_trainer.cli", "train", "Run the trainer locally (same as python -m loco_trainer)."),
    "diagnose": ("loco_detector.cli", "diagnose", "Find the faulty rank, link or node in a collective-timing trace."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in SUBCOMMANDS:
            module_name, attr, _ = SUBCOMMANDS[cmd_name]
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:  # an extra is not installed
                raise click.ClickException(
                    f"'loco {cmd_name}' needs a dependency that is not installed ({exc.name}); "
                    f"install it with: pip install 'loco[operator,trainer]'"
                ) from exc
            return getattr(module, attr)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from the table so `loco --help` imports nothing heavy.
        rows = [(name, SUBCOMMANDS[name][2]) for name in sorted(SUBCOMMANDS)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loco")
def main() -> None:
    """Loco: low-communication, fault-tolerant training on Kubernetes."""


if __name__ == "__main__":  # pragma: no cover
    main()
