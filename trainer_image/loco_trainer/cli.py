"""Command line: ``loco train`` (= ``python -m loco_trainer``) and ``loco ckpt``."""

from __future__ import annotations

import json
import os
import sys

import click

from loco_trainer.launcher import (
    EXIT_CONFIG,
    ConfigError,
    LaunchOptions,
    default_config_path,
    fallback_report,
    launch,
    load_config,
    local_runtime_env,
    run_rank,
)


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", default=default_config_path, show_default="$LOCO_CONFIG or /etc/loco/config.json",
              help="TrainerConfig file (JSON or YAML).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Local mode: run N ranks on this machine (no Kubernetes needed).")
@click.option("--nproc-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local mode: group the --nproc ranks into pods of this many processes (FSDP-sharded inside a pod).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a config field, e.g. --set training.steps=10 (repeatable).")
@click.option("--history", "history_path", default=None, type=click.Path(dir_okay=False),
              help="Rank 0 appends one JSON line per step (step, loss, lr, evalLoss) to this file.")
@click.option("--status-port", type=int, default=None,
              help="Port of /status and /metrics (default $LOCO_STATUS_PORT, 8080 in a pod, a free port locally; -1: off).")
@click.option("--status-host", default=None, help="Address the endpoint binds to (default POD_IP, else all; 127.0.0.1 with --nproc).")
@click.option("--local-rank", type=int, default=None, hidden=True)
@click.option("--termination-message/--no-termination-message", default=None, hidden=True)
def train(config_path: str, nproc: int | None, nproc_per_worker: int, overrides: tuple[str, ...], history_path: str | None,
          status_port: int | None, status_host: str | None, local_rank: int | None, termination_message: bool | None) -> None:
    """Train: in a pod, this pod's LOCO_NPROC_PER_WORKER ranks; with --nproc N, N local ranks."""
    from loco_trainer.config import RuntimeEnv
    from loco_trainer.progress import write_termination_message

    env = RuntimeEnv.from_environ()
    try:
        # In a pod the config path is a container path (the ConfigMap mount): resolve it like every
        # other. A local rank started by the launcher gets the launcher's own (host) copy.
        config = load_config(config_path if local_rank is not None else env.resolve_path(config_path), overrides)
    except ConfigError as exc:
        if nproc is None and local_rank is None and termination_message is not False:
            write_termination_message(fallback_report(LaunchOptions(config_path, None, env), str(exc)), env)  # type: ignore[arg-type]
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if nproc is not None:
        try:
            env = local_runtime_env(nproc, config, nproc_per_worker=nproc_per_worker)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        # a local run writes no termination message unless it emulates a pod root
        termination_message = bool(env.local_root) if termination_message is None else termination_message
        status_host = status_host or env.pod_ip or "127.0.0.1"
    options = LaunchOptions(config_path, config, env, history_path=os.path.abspath(history_path) if history_path else None,
                            status_port=status_port, status_host=status_host, termination_message=termination_message is not False,
                            local_pods=env.num_replicas if nproc is not None else 1)
    if local_rank is not None:
        sys.exit(run_rank(options, local_rank))
    sys.exit(launch(options))


@click.group("ckpt", context_settings={"help_option_names": ["-h", "--help"]})
def ckpt() -> None:
    """Inspect universal checkpoints: ls, inspect, verify, convert (see docs/checkpoint-format.md)."""


@ckpt.command("ls")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def ckpt_ls(directory: str, as_json: bool) -> None:
    """List the committed checkpoints under DIRECTORY (a job's <path>/<namespace>/<job>)."""
    from loco_trainer import ucp

    storage = ucp.Storage(directory)
    found = ucp.list_checkpoints(storage)
    incomplete = sorted(n for n in os.listdir(directory) if n.startswith(".tmp-"))
    rows = [{"step": c.step, "path": c.url, "layout": c.layout.to_json(), "worldSize": c.layout.world_size,
             "algorithm": c.manifest.algorithm, "time": c.manifest.time,
             "bytes": sum(c.manifest.files.values())} for c in found]
    if as_json:
        click.echo(json.dumps({"checkpoints": rows, "incomplete": incomplete}, indent=2))
        return
    if not found:
        click.echo(f"no committed checkpoints in {directory}")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("step", "layout", "algorithm", "time", "size", "path")
        for c, row in zip(found, rows):
            table.add_row(str(c.step), c.layout.describe(), row["algorithm"] or "?", row["time"],
                          f"{row['bytes'] / 1e6:.1f} MB", c.url)
        Console(width=200).print(table)
    for name in incomplete:
        click.echo(f"incomplete (ignored, cleaned at the next start): {name}")


# universal checkpoint commands (inspect, verify, convert) live in loco_trainer.ckpt_cli
from loco_trainer.ckpt_cli import register as _register_ucp_commands  # noqa: E402

_register_ucp_commands(ckpt)

