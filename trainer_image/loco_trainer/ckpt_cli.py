"""``loco ckpt ls|inspect|verify|convert``: the universal checkpoint tools on the command line.

``loco ckpt`` is :data:`ckpt` (also ``python -m loco_trainer.ckpt_cli``).
Exit status: 0 success, 1 a checkpoint failed verification or cannot be converted, 2 bad usage.
"""

from __future__ import annotations

import json
import os
import sys

import click


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


@click.command("ls")
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


@click.command("inspect")
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--params/--no-params", "show_params", default=False, help="List every parameter (name, shape, dtype, fragments).")
def inspect_cmd(directory: str, as_json: bool, show_params: bool) -> None:
    """Show the checkpoints under DIRECTORY (a job's checkpoint root or one step-N directory):
    steps, layout at save, algorithm, sizes, parameters and validity."""
    from loco_trainer.ucp import tools

    try:
        info = tools.inspect(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"checkpoints in {info['root']} (latest: {info['latest'] or '-'})")
    for col in ("step", "time", "algorithm", "layout", "parameters", "size", "files", "state"):
        table.add_column(col)
    for c in info["checkpoints"]:
        lay = c["layout"]
        table.add_row(str(c["step"]), c["time"], c["algorithm"] or "-",
                      f"{lay['numReplicas']}x{lay['nprocPerWorker']} {lay['parallelism']}", f"{c['numParameters']:,}",
                      _human(c["bytes"]), str(c["files"]), "committed")
    for name in info["incomplete"]:
        table.add_row(name, "", "", "", "", "", "", "[red]incomplete (never loaded; removed at next start)[/red]")
    console.print(table)
    if show_params:
        for c in info["checkpoints"]:
            pt = Table(title=f"step {c['step']}: parameters")
            for col in ("name", "shape", "dtype", "fragments", "layout"):
                pt.add_column(col)
            for p in c["parameters"]:
                pt.add_row(p["name"], str(p["shape"]), p["dtype"], str(p["fragments"]), p["layout"])
            console.print(pt)


@click.command("verify")
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify_cmd(directory: str, as_json: bool) -> None:
    """Check every committed checkpoint under DIRECTORY: data files present with their recorded
    sizes, fragments tiling each tensor, and every fragment's crc32. Exits 1 on any problem."""
    from loco_trainer.ucp import FormatError, tools

    try:
        reports = tools.verify(directory)
    except (FileNotFoundError, FormatError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not reports:
        raise click.ClickException(f"{directory}: no committed checkpoint to verify")
    if as_json:
        click.echo(json.dumps([{"dir": r.dir, "step": r.step, "ok": r.ok, "fragments": r.fragments,
                                "bytesChecked": r.bytes_checked, "problems": r.problems, "reasons": r.reasons} for r in reports],
                              indent=2))
    else:
        for r in reports:
            status = "OK" if r.ok else f"CORRUPT ({len(r.problems)} problems)"
            click.echo(f"{r.dir}: {status}, {r.fragments} fragments, {_human(r.bytes_checked)} checked")
            for p in r.problems:
                click.echo(f"  - {p}")
    if not all(r.ok for r in reports):
        sys.exit(1)


@click.command("convert")
@click.argument("source")
@click.argument("out")
@click.option("--from-dcp", "from_dcp", is_flag=True,
              help="SOURCE is a torch.distributed.checkpoint directory; write a UCP checkpoint under OUT.")
@click.option("--to-torch", "to_torch", is_flag=True,
              help="SOURCE is a UCP checkpoint root or step directory; write one consolidated torch.save file OUT.")
@click.option("--step", type=int, default=None, help="Step to convert (--to-torch: default the newest) or to record (--from-dcp).")
def convert_cmd(source: str, out: str, from_dcp: bool, to_torch: bool, step: int | None) -> None:
    """Convert between a universal checkpoint and other formats (exactly one of --from-dcp, --to-torch)."""
    from loco_trainer.ucp import tools

    if from_dcp == to_torch:
        raise click.UsageError("give exactly one of --from-dcp (import a DCP directory) or --to-torch (export OUT.pt)")
    try:
        if from_dcp:
            info = tools.from_dcp(source, out, step=step)
            click.echo(f"imported {source} as {info.url} (step {info.step}, {len(info.manifest.model_atoms())} model tensors)")
        else:
            info = tools.to_torch(source, out, step=step)
            click.echo(f"wrote {out}: step {info.step} consolidated from {info.url} ({info.layout.describe()})")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group("ckpt", context_settings={"help_option_names": ["-h", "--help"]})
def ckpt() -> None:
    """Inspect universal checkpoints: ls, inspect, verify, convert (see docs/checkpoint-format.md)."""


for _command in (ckpt_ls, inspect_cmd, verify_cmd, convert_cmd):
    ckpt.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    ckpt()
