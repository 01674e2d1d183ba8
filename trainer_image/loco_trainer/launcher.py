"""Starting the trainer: config loading, the per-pod process launcher, and one rank's main.

``python -m loco_trainer --config FILE`` (in a pod) runs ``LOCO_NPROC_PER_WORKER`` local ranks of
replica ``LOCO_REPLICA_INDEX``; ``--nproc N`` (locally) builds the same runtime for one replica of
N ranks on 127.0.0.1 with a free port. One rank runs in this process; several run as child
processes (``python -m loco_trainer --local-rank i``, same config file and environment).

Locally (several emulated pods) the launcher also runs the fault detector over its ranks, as the operator
does in a cluster (:mod:`loco_trainer.local_detect`): verdicts are logged with their evidence and, with
``on_fault="stop"``, a verdict the operator would act on stops the run.

Exit codes (:class:`loco_contract.exits.ExitCode`): 0 success; a child's code when a local rank fails (the others
are terminated); ``faultInjection.exitCode`` for an injected crash; 143 after SIGTERM; 2 for a bad config, 65 a
data error, 76 a lost peer, 80 a non-finite loss, 81 out of memory, 1 anything else; 75 when the fault detector
stopped the run (EX_TEMPFAIL: resume from the last checkpoint, without the blamed rank's cause).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, Sequence

import yaml
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from loco_contract.config import DEFAULT_CONFIG_PATH, EnvVar, RuntimeEnv, TrainerConfig
from loco_contract.detection import DetectorConfig
from loco_contract.exits import ExitCode, describe
from loco_contract.protocol import ProgressReport, WorkerState
from loco_trainer.failures import ConfigError, exit_code_for
from loco_trainer.interruptible import Terminated, call_interruptibly, raise_terminated

log = logging.getLogger("loco_trainer")

EXIT_SIGTERM = int(ExitCode.SIGTERM)
EXIT_CONFIG = int(ExitCode.CONFIG)
EXIT_FAULT = int(ExitCode.FAULT_STOP)
#: seconds local ranks get to stop after SIGTERM before they are killed
CHILD_GRACE_S = 20.0




# ------------------------------------------------------------------------------------- config


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"invalid trainer config {source}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if err["type"] not in ("missing",) and not isinstance(err.get("input"), dict) else ""
        lines.append(f"  {where}: {msg}{got}")
    return "\n".join(lines)


def apply_overrides(wire: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``wire`` with ``section.field=value`` overrides applied (values parsed as YAML,
    field names in either spelling: ``training.seqLen=64`` or ``training.seq_len=64``)."""
    result = json.loads(json.dumps(wire))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.field=value, for example training.steps=10")
        parts = key.split(".")
        node = result
        for part in parts[:-1]:
            camel = to_camel(part)
            if part != camel and part in node:
                node[camel] = node.pop(part)
            child = node.setdefault(camel, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {camel!r} is not a section")
            node = child
        leaf = to_camel(parts[-1])
        node.pop(parts[-1], None)
        node[leaf] = yaml.safe_load(raw)
    return result


def load_config(path: str, overrides: Sequence[str] = ()) -> TrainerConfig:
    """The :class:`TrainerConfig` in ``path`` (JSON or YAML) with ``overrides`` applied.
    Raises :class:`ConfigError` naming the file and each bad field."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read trainer config {path}: {exc.strerror}; pass --config FILE") from exc
    try:
        wire = yaml.safe_load(text) if text.strip() else {}  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ConfigError(f"trainer config {path} is neither JSON nor YAML: {exc}") from exc
    if not isinstance(wire, dict):
        raise ConfigError(f"trainer config {path} must hold a mapping (got {type(wire).__name__})")
    wire = apply_overrides(wire, overrides)
    try:
        return TrainerConfig.model_validate(wire)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from None


# ------------------------------------------------------------------------------------ options


@dataclass
class LaunchOptions:
    """How to run: the config and the per-pod environment plus local-run knobs."""

    config_path: str
    config: TrainerConfig
    env: RuntimeEnv
    history_path: str | None = None
    status_port: int | None = None  # None: the env's (8080 in a pod); 0: any free port; <0: no endpoint
    #: local mode: the pod leader writes the port it bound here (the launcher's detector reads it: a port
    #: the launcher picked in advance could be taken by another socket before the rank binds it)
    status_port_file: str | None = None
    status_host: str | None = None  # None: POD_IP when set, else all interfaces
    termination_message: bool = True
    extra_environ: dict[str, str] = field(default_factory=dict)
    #: local mode only: emulate this many pods of ``env.nproc_per_worker`` processes each (child
    #: ``i`` is local rank ``i % nproc`` of pod ``i // nproc``; only pod 0 writes the termination
    #: message; with ``detector``, every pod leader serves /status for it). 1 in a real pod.
    local_pods: int = 1
    #: local mode: the fault detector's settings (None: no detection; in a pod the operator detects)
    detector: DetectorConfig | None = None
    #: local mode: what a verdict the operator would act on does: "report" (log it), "stop" (end the run, 75)
    #: or "restart" (every rank again, from the newest checkpoint, at most ``max_restarts`` times; then 75)
    on_fault: str = "report"
    max_restarts: int = 3
    #: local mode: where the detector's trace goes (``loco diagnose`` replays it); None: not kept
    fault_trace: str | None = None


def local_runtime_env(nproc: int, config: TrainerConfig, environ: dict[str, str] | None = None,
                      nproc_per_worker: int = 1) -> RuntimeEnv:
    """The runtime env of pod 0 of a local ``--nproc N [--nproc-per-worker P]`` run on 127.0.0.1:
    ``N / P`` emulated pods (replicas) of ``P`` processes each (P > 1: FSDP-sharded inside each pod).
    Raises ConfigError when P does not divide N."""
    from loco_trainer.rendezvous import free_port

    if nproc_per_worker < 1 or nproc % nproc_per_worker:
        raise ConfigError(
            f"--nproc-per-worker {nproc_per_worker} must be >= 1 and divide --nproc {nproc} (the ranks form "
            f"nproc / nproc-per-worker pods)"
        )

    base = RuntimeEnv.from_environ(environ)
    env_map = os.environ if environ is None else environ
    return base.model_copy(update=dict(
        job_name=config.job_name, namespace=config.namespace, replica_index=0, num_replicas=nproc // nproc_per_worker,
        nproc_per_worker=nproc_per_worker, master_addr="127.0.0.1",
        master_port=int(env_map.get(EnvVar.MASTER_PORT.value) or free_port()),
        status_port=int(env_map.get(EnvVar.STATUS_PORT.value) or 0),
    ))


def env_to_environ(env: RuntimeEnv) -> dict[str, str]:
    """The environment variables that reproduce ``env`` in a child process."""
    out = {}
    for member in EnvVar:
        if member is EnvVar.CONFIG:
            continue
        value = getattr(env, member.name.lower())
        out[member.value] = str(value)
    return out


def _configure_logging(rank: int | None) -> None:
    prefix = f"[rank {rank}] " if rank is not None else "[launcher] "
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


# ------------------------------------------------------------------------------- one rank


def run_rank(options: LaunchOptions, local_rank: int) -> NoReturn:
    """Run local rank ``local_rank`` of this pod to the end, then exit the process with its code
    (0 success, the failing code otherwise) without the interpreter's teardown (see the end).

    The pod leader (local rank 0) serves the progress endpoint and writes the final report to
    the termination message file. Never raises (errors become a failed report and exit code 1).
    """
    import torch.distributed as dist

    from loco_trainer.faults import InjectedCrash
    from loco_trainer.metrics import TrainerMetrics
    from loco_trainer.progress import ProgressServer, ProgressState, read_membership_token, write_termination_message
    from loco_trainer.rendezvous import init_process_group, pick_backend, rank_info
    from loco_trainer.train import Trainer, resolve_device

    cfg, env = options.config, options.env
    info = rank_info(env, local_rank)
    _configure_logging(info.rank)
    if not info.is_pod_leader:  # one voice per pod; progress lines come from global rank 0 only
        logging.getLogger().setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack to stderr
    metrics = TrainerMetrics(cfg.job_name, cfg.namespace, info.replica_index, info.rank)
    progress = server = None
    if info.is_pod_leader:
        progress = ProgressState(ProgressReport(
            job_name=cfg.job_name, namespace=cfg.namespace, replica_index=info.replica_index, epoch=env.epoch,
            state=WorkerState.starting, total_steps=cfg.training.steps, algorithm=cfg.algorithm.name.value,
        ))
        port = env.status_port if options.status_port is None else options.status_port
        if port >= 0:
            host = options.status_host or env.pod_ip or "0.0.0.0"
            server = ProgressServer(progress, metrics.render, host, port, read_membership_token(env)).start()
            host, bound = server.address
            log.info("progress endpoint: http://%s:%d/status and /metrics", host, bound)
            if options.status_port_file:
                _write_atomically(options.status_port_file, str(bound))

    code = 0
    try:
        import torch

        device = resolve_device(cfg.training, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)

        def join_process_group() -> None:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current CUDA device is per thread
            init_process_group(env, info, pick_backend(device), timeout_s=env.collective_timeout_s)

        # in a thread, so SIGTERM is honoured while the rendezvous blocks (see interruptible.py)
        call_interruptibly(join_process_group)
        Trainer(cfg, env, info, device, progress=progress, metrics=metrics,
                history_path=options.history_path).run()
        if progress:
            progress.update(state=WorkerState.finished, message="training finished")
    except InjectedCrash as exc:
        code = int(exc.code)
        if progress:
            progress.update(state=WorkerState.failed, message=f"injected crash (faultInjection) with exit code {code}")
    except Terminated:
        code = EXIT_SIGTERM
        log.warning("SIGTERM: stopping")
        if progress:
            progress.update(state=WorkerState.failed, message="terminated by SIGTERM")
    except Exception as exc:  # noqa: BLE001 - every failure must reach the report
        code = int(exit_code_for(exc))  # what the operator's failure policy matches on (loco_contract.exits)
        log.exception("rank %d failed (%s, exit code %d)", info.rank, describe(code), code)
        if progress:
            progress.update(state=WorkerState.failed,
                            message=f"rank {info.rank}: {describe(code)}: {type(exc).__name__}: {exc}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if progress and options.termination_message:
            write_termination_message(progress.snapshot(), env)
    if server:
        server.stop()
    if code == 0:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown. On failure, peers may be blocked in a collective
    # with us, so no cleanup collective may run. On success everything is committed and closed, but
    # C++ threads of gloo and the checkpoint engine's group can still abort a normal teardown
    # ("terminate called without an active exception", exit 134) after a good run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------------------- launcher


def _child_command(options: LaunchOptions, config_path: str, local_rank: int) -> list[str]:
    cmd = [sys.executable, "-m", "loco_trainer", "--config", config_path, "--local-rank", str(local_rank)]
    if options.history_path:
        cmd += ["--history", options.history_path]
    if options.status_port is not None:
        cmd += ["--status-port", str(options.status_port)]
    if options.status_port_file:
        cmd += ["--status-port-file", options.status_port_file]
    if options.status_host:
        cmd += ["--status-host", options.status_host]
    if not options.termination_message:
        cmd += ["--no-termination-message"]
    return cmd


def _exit_code(returncode: int) -> int:
    return 128 + (-returncode) if returncode < 0 else returncode


def launch(options: LaunchOptions) -> int:
    """Run this pod's ``nproc_per_worker`` ranks (locally: the ranks of all ``local_pods`` emulated
    pods); returns the exit code (see module docstring). Locally, with ``on_fault="restart"``, a fault
    verdict restarts every rank in a new epoch (they resume from the newest committed checkpoint, as
    after the operator's restart), at most ``max_restarts`` times."""
    per_pod = options.env.nproc_per_worker
    nproc = per_pod * options.local_pods
    if nproc == 1:
        return run_rank(options, 0)
    _configure_logging(None)
    restarts = 0
    while True:
        code, failed_rank, faults = _run_ranks(options, nproc, per_pod, restarts)
        if code != EXIT_FAULT or options.on_fault != "restart" or restarts >= options.max_restarts:
            break
        from loco_trainer.rendezvous import free_port

        restarts += 1
        options = replace(options, env=options.env.model_copy(update={
            "epoch": options.env.epoch + 1, "restart_count": options.env.restart_count + 1, "master_port": free_port()}))
        log.warning("restarting every rank from the last checkpoint (restart %d/%d, epoch %d): %s", restarts,
                    options.max_restarts, options.env.epoch, faults[0].verdict.message)
    if code == EXIT_FAULT and options.termination_message:
        _amend_termination_message(options, f"stopped by the fault detector: {faults[0].verdict.message}")
    elif failed_rank not in (None, 0) and options.termination_message:
        _amend_termination_message(options, f"local rank {failed_rank} exited with code {code}")
    return code


def _run_ranks(options: LaunchOptions, nproc: int, per_pod: int, attempt: int) -> tuple[int, int | None, list[Any]]:
    """Start the ``nproc`` local ranks (and the detector over them), wait for the outcome (see
    :func:`_supervise`); returns it with the findings that stopped the run, if any."""
    with tempfile.TemporaryDirectory(prefix="loco-launch-") as tmp:
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, "w", encoding="utf-8") as fh:
            json.dump(options.config.to_wire(), fh)
        environ = {**os.environ, **options.extra_environ, **env_to_environ(options.env)}
        # Like torchrun: local ranks share the cores instead of each spawning one thread per core.
        environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        ports = _detector_ports(options, tmp)
        children = []
        for i in range(nproc):
            pod, local_rank = divmod(i, per_pod)
            child_options = options if pod == 0 else replace(options, status_port=-1, termination_message=False)
            if ports:
                port, port_file = ports[pod]
                child_options = replace(child_options, status_port=port, status_port_file=port_file)
            children.append(subprocess.Popen(_child_command(child_options, config_path, local_rank),
                                             env={**environ, EnvVar.REPLICA_INDEX.value: str(options.env.replica_index + pod)}))
        log.info("started %d local ranks (pids %s)", nproc, ", ".join(str(c.pid) for c in children))
        terminated: list[int] = []
        faults: list[Any] = []  # findings that end this attempt (on_fault "stop" or "restart")
        detection = None
        if ports:
            from loco_trainer.local_detect import LocalDetection

            detection = LocalDetection({pod: port_file for pod, (_, port_file) in ports.items()}, options.detector or DetectorConfig(),
                                       trace_path=_attempt_path(options.fault_trace, attempt),
                                       on_fault=faults.append if options.on_fault in ("stop", "restart") else None,
                                       epoch=options.env.epoch).start()
            log.info("fault detector: watching %d pods (on a fault: %s)", len(ports), options.on_fault)

        def on_sigterm(signum: int, frame: Any) -> None:
            terminated.append(signum)

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            code, failed_rank = _supervise(children, terminated, faults)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if detection is not None:
                detection.stop()
    return code, failed_rank, faults


def _attempt_path(path: str | None, attempt: int) -> str | None:
    """The trace of attempt ``attempt`` (0: ``path`` itself; a restart's: ``trace.restart-1.jsonl``)."""
    if path is None or attempt == 0:
        return path
    stem, dot, ext = os.path.basename(path).partition(".")
    return os.path.join(os.path.dirname(path), f"{stem}.restart-{attempt}{dot}{ext}")


def _detector_ports(options: LaunchOptions, tmp: str) -> dict[int, tuple[int, str]]:
    """pod index -> (the port its leader binds, the file it writes the bound port to), when the launcher
    runs the detector (several emulated pods, detection on, the endpoint not switched off); else empty.
    Port 0 (any free one) except where the user named pod 0's: ranks bind first and say where, so no
    port picked in advance can be taken by another socket in between."""
    if options.local_pods < 2 or options.detector is None or not options.detector.enabled:
        return {}
    if options.status_port is not None and options.status_port < 0:
        return {}
    first = options.status_port if options.status_port else options.env.status_port
    return {pod: (first if pod == 0 and first > 0 else 0, os.path.join(tmp, f"status-port-{pod}"))
            for pod in range(options.local_pods)}


def _write_atomically(path: str, text: str) -> None:
    """Readers see the whole text or no file (never a half-written port)."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(partial, path)


def _amend_termination_message(options: LaunchOptions, cause: str) -> None:
    """Put the root cause into the pod leader's final report (the leader only saw being stopped)."""
    from loco_trainer.progress import termination_message_path, write_termination_message

    path = termination_message_path(options.env)
    report = None
    if path and os.path.isfile(path):
        try:
            report = ProgressReport.model_validate_json(open(path, encoding="utf-8").read())
        except (OSError, ValueError):
            report = None
    report = report or fallback_report(options, cause)
    message = cause if not report.message or report.message == cause else f"{cause} ({report.message})"
    write_termination_message(report.model_copy(update={"state": WorkerState.failed, "message": message}), options.env)


def _stop(children: list[subprocess.Popen], grace_s: float = CHILD_GRACE_S) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGCONT)  # a stopped rank (SIGSTOP: what a hang verdict may blame) can then exit
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _supervise(children: list[subprocess.Popen], terminated: list[int], faults: list[Any] | None = None
               ) -> tuple[int, int | None]:
    """Wait for the children: all succeed -> (0, None); one fails -> stop the rest, return (its
    code, its local rank); SIGTERM -> stop all, (143, None); a fault verdict in ``faults`` (the
    detector appends to it) -> stop all, (75, None).

    When several fail, the first to exit is the root cause (its peers fail after it, on a broken
    collective), so exit times are taken by one waiter thread per child.
    """
    exited: dict[int, float] = {}

    def waiter(index: int, child: subprocess.Popen) -> None:
        child.wait()
        exited.setdefault(index, time.monotonic())

    for i, child in enumerate(children):
        threading.Thread(target=waiter, args=(i, child), daemon=True, name=f"loco-wait-{i}").start()
    while True:
        if terminated:
            log.warning("SIGTERM: stopping %d local ranks", len(children))
            _stop(children)
            return EXIT_SIGTERM, None
        if faults:
            log.error("stopping %d local ranks: the fault detector blamed ranks %s (%s)", len(children),
                      list(faults[0].verdict.ranks), faults[0].verdict.kind.value)
            _stop(children)
            return EXIT_FAULT, None
        failed = sorted((t, i) for i, t in list(exited.items()) if children[i].returncode != 0)
        if failed:
            local_rank = failed[0][1]
            code = _exit_code(children[local_rank].returncode)
            log.error("local rank %d exited with code %d: stopping the other ranks", local_rank, code)
            _stop(children)
            return code, local_rank
        if len(exited) == len(children):
            return 0, None
        time.sleep(0.1)


def fallback_report(options: LaunchOptions, message: str) -> ProgressReport:
    """A failed report for failures before any rank could make one (bad config, launch error)."""
    env = options.env if options else RuntimeEnv.from_environ()
    return ProgressReport(job_name=env.job_name, namespace=env.namespace, replica_index=env.replica_index,
                          epoch=env.epoch, state=WorkerState.failed, message=message[:3000])


def default_config_path() -> str:
    return os.environ.get(EnvVar.CONFIG.value) or DEFAULT_CONFIG_PATH
