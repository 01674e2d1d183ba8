"""``loco local demo FILE``: a real TrainingJob end to end on the embedded cluster, with live progress.

Starts the embedded cluster and the operator, applies FILE (by default examples/quickstart.yaml),
shows phase / workers / step / loss / tokens/s while it trains, and ends with a one-screen summary:
final losses, throughput, restarts, the committed checkpoint on disk and the job's Events.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loco_local.stack import LocalStack, default_nodes

TERMINAL = {"Succeeded", "Failed"}


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def _job_table(job: dict[str, Any]) -> Table:
    status = job.get("status") or {}
    workers = status.get("workers") or {}
    ckpt = status.get("lastCheckpoint") or {}
    table = Table(show_header=True, header_style="bold", expand=False)
    for col in ("phase", "workers", "step", "loss", "eval", "tok/s", "restarts", "ckpt"):
        table.add_column(col, no_wrap=True)
    table.add_row(
        _fmt(status.get("phase"), ""),
        f"{workers.get('ready', 0)}/{workers.get('desired', job['spec'].get('replicas', '?'))}",
        f"{_fmt(status.get('step'))}/{_fmt(status.get('totalSteps'))}",
        _fmt(status.get("loss"), ".4f"),
        _fmt(status.get("evalLoss"), ".4f"),
        _fmt(status.get("tokensPerSecond"), ",.0f"),
        _fmt(status.get("restarts", 0)),
        str(ckpt["step"]) if ckpt else "-",
    )
    return table


def _progress_line(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    workers = status.get("workers") or {}
    return (
        f"{_fmt(status.get('phase'))} | workers {workers.get('ready', 0)}/{workers.get('desired', '?')}"
        f" | step {_fmt(status.get('step'))}/{_fmt(status.get('totalSteps'))} | loss {_fmt(status.get('loss'), '.4f')}"
        f" | {_fmt(status.get('tokensPerSecond'), ',.0f')} tok/s | restarts {status.get('restarts', 0)}"
    )


def _events_table(events: list[dict[str, Any]], limit: int = 8) -> Table:
    table = Table(show_header=True, header_style="bold", box=None, expand=False)
    table.add_column("type")
    table.add_column("reason")
    table.add_column("message", overflow="fold")
    for event in events[-limit:]:
        table.add_row(event.get("type", ""), event.get("reason", ""), event.get("message", ""))
    return table


def run_demo(manifest: Path, state_dir: Path, *, nodes: int = 3, timeout_s: float = 900, keep: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when the job Succeeded)."""
    console = Console()
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "TrainingJob"]
    if len(jobs) != 1:
        console.print(f"[red]{manifest} must contain exactly one TrainingJob (found {len(jobs)})[/red]")
        return 2
    name = jobs[0]["metadata"]["name"]
    if state_dir.exists():
        shutil.rmtree(state_dir)

    console.rule("[bold]Loco demo")
    console.print(f"embedded cluster: {nodes} nodes, state in {state_dir}")
    started = time.monotonic()
    with LocalStack(state_dir, default_nodes(nodes)) as stack:
        console.print(f"cluster up at {stack.cluster.url}; operator running (log: {stack.operator_log})")
        console.print(f"[dim]export KUBECONFIG={stack.kubeconfig}[/dim]")
        stack.apply_file(manifest)
        console.print(f"applied {manifest} -> TrainingJob/{name}")

        progress = Progress(TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                            TimeElapsedColumn())
        task = progress.add_task("steps", total=jobs[0]["spec"].get("training", {}).get("steps", 1))
        job: dict[str, Any] | None = None
        deadline = time.monotonic() + timeout_s
        last_line = ""
        # A terminal gets a live table; a log (CI, a pipe) gets one line per change instead.
        with Live(console=console, refresh_per_second=4, transient=True, auto_refresh=console.is_terminal) as live:
            while time.monotonic() < deadline:
                job = stack.get_job(name)
                if job is None:
                    time.sleep(0.5)
                    continue
                status = job.get("status") or {}
                progress.update(task, completed=status.get("step") or 0, total=status.get("totalSteps") or progress.tasks[0].total)
                if console.is_terminal:
                    live.update(Group(_job_table(job), progress, Panel(_events_table(stack.events(name)), title="events")))
                else:
                    line = _progress_line(job)
                    if line != last_line:
                        console.print(line, highlight=False)
                        last_line = line
                if status.get("phase") in TERMINAL:
                    break
                time.sleep(1.0)
        job = job or {}
        status = job.get("status") or {}
        phase = status.get("phase")
        elapsed = time.monotonic() - started
        _summary(console, stack, name, job, elapsed)
        if keep:
            console.print("[bold]--keep[/bold]: the cluster stays up until you press Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0 if phase == "Succeeded" else 1


def _summary(console: Console, stack: LocalStack, name: str, job: dict[str, Any], elapsed_s: float) -> None:
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    ckpt = status.get("lastCheckpoint") or {}
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    phase = status.get("phase")
    color = "green" if phase == "Succeeded" else "red"
    table.add_row("job", f"{name} ([{color}]{phase}[/{color}]) in {elapsed_s:.0f}s")
    table.add_row("algorithm", f"{spec.get('algorithm', {}).get('name')} on {spec.get('replicas')} workers")
    table.add_row("steps", f"{_fmt(status.get('step'))}/{_fmt(status.get('totalSteps'))}")
    table.add_row("final loss", f"train {_fmt(status.get('loss'), '.4f')}, eval {_fmt(status.get('evalLoss'), '.4f')}")
    table.add_row("throughput", f"{_fmt(status.get('tokensPerSecond'), ',.0f')} tokens/s")
    table.add_row("restarts", _fmt(status.get("restarts", 0)))
    for fault in status.get("faults") or []:  # what the fault detector found and did (docs/fault-detection.md)
        where = ", ".join(f"{pod} on {node}" for pod, node in zip(fault.get("pods") or [], fault.get("nodes") or []))
        table.add_row("fault", f"[red]{fault.get('kind')}[/red] in epoch {fault.get('epoch')}: {where or 'ranks ' + str(fault.get('ranks'))}"
                               f"{' (node cordoned)' if fault.get('cordoned') else ''}")
    if status.get("avoidNodes"):
        table.add_row("avoided nodes", ", ".join(status["avoidNodes"]))
    if ckpt:
        host_dir = _checkpoint_on_disk(stack, ckpt.get("path", ""))
        table.add_row("checkpoint", f"step {ckpt.get('step')} at {ckpt.get('path')}")
        if host_dir is not None:
            files = sorted(p for p in host_dir.rglob("*") if p.is_file())
            size = sum(p.stat().st_size for p in files)
            table.add_row("on disk", f"{host_dir} ({len(files)} files, {size / 1e6:.1f} MB)")
    console.print(Panel(table, title="summary"))
    console.print(Panel(_events_table(stack.events(name), limit=20), title=f"events of {name}"))
    console.print("[dim]Explore: loco local up, then kubectl get tj / describe tj; docs/local-cluster.md[/dim]")


def _checkpoint_on_disk(stack: LocalStack, container_path: str) -> Path | None:
    """Find a container checkpoint path on the host: volumes of the embedded cluster live under
    <state>/volumes/<namespace>/<claim>/."""
    if not container_path:
        return None
    volumes = stack.state_dir / "volumes"
    parts = Path(container_path).parts
    for claim_dir in volumes.glob("*/*"):
        for i in range(1, len(parts)):
            candidate = claim_dir.joinpath(*parts[i + 1:]) if i + 1 < len(parts) else claim_dir
            if candidate.exists() and candidate.name == parts[-1]:
                return candidate
    return None
