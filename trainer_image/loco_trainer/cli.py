"""Command line: ``loco train`` (= ``python -m loco_trainer``); ``loco ckpt`` is ckpt_cli.py."""

from __future__ import annotations

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
@click.option("--fault-detection/--no-fault-detection", default=True, show_default=True,
              help="Local mode: run the fault detector over the ranks, as the operator does in a cluster.")
@click.option("--detector-config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Local mode: the detector's settings (faultDetection fields, or a TrainingJob manifest).")
@click.option("--on-fault", type=click.Choice(["report", "stop", "restart"]), default="report", show_default=True,
              help="Local mode: on a verdict the operator would act on, log it (report), end the run with 75 (stop) or "
                   "restart every rank from the newest checkpoint (restart; at most --max-restarts times, then 75).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=3, show_default=True,
              help="Local mode: restarts --on-fault restart may make (the operator's runPolicy.backoffLimit).")
@click.option("--fault-trace", default=None, type=click.Path(dir_okay=False),
              help="Local mode: keep the detector's trace here (`loco diagnose` replays it).")
@click.option("--local-rank", type=int, default=None, hidden=True)
@click.option("--termination-message/--no-termination-message", default=None, hidden=True)
@click.option("--status-port-file", default=None, hidden=True)
def train(config_path: str, nproc: int | None, nproc_per_worker: int, overrides: tuple[str, ...], history_path: str | None,
          status_port: int | None, status_host: str | None, fault_detection: bool, detector_config: str | None,
          on_fault: str, max_restarts: int, fault_trace: str | None, local_rank: int | None, termination_message: bool | None,
          status_port_file: str | None) -> None:
    """Train: in a pod, this pod's LOCO_NPROC_PER_WORKER ranks; with --nproc N, N local ranks."""
    from loco_contract.config import RuntimeEnv
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
    detector = None
    if nproc is not None and local_rank is None and fault_detection:
        from loco_detector.cli import load_detector_config

        detector = load_detector_config(detector_config, param_hint="--detector-config")
    options = LaunchOptions(config_path, config, env, history_path=os.path.abspath(history_path) if history_path else None,
                            status_port=status_port, status_port_file=status_port_file, status_host=status_host,
                            termination_message=termination_message is not False,
                            local_pods=env.num_replicas if nproc is not None else 1, detector=detector, on_fault=on_fault, max_restarts=max_restarts,
                            fault_trace=os.path.abspath(fault_trace) if fault_trace else None)
    if local_rank is not None:
        sys.exit(run_rank(options, local_rank))
    sys.exit(launch(options))
