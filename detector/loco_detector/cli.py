"""``loco diagnose TRACE``: replay a collective-timing trace through the fault detector."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml
from pydantic import ValidationError

from loco_detector.detector import replay
from loco_detector.trace import TraceError, read_trace
from loco_contract.detection import DetectorConfig
from loco_detector.types import Verdict


def load_detector_config(path: str | None, param_hint: str = "--config") -> DetectorConfig:
    """A DetectorConfig from a YAML/JSON file: either the fields themselves (camelCase) or a
    TrainingJob manifest, whose ``spec.faultDetection`` is used."""
    if path is None:
        return DetectorConfig()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint=param_hint) from None
    if isinstance(data, dict) and "spec" in data:
        data = (data.get("spec") or {}).get("faultDetection") or {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of DetectorConfig fields", param_hint=param_hint)
    try:
        return DetectorConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"faultDetection.{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise click.BadParameter(f"{path}: {problems}", param_hint=param_hint) from None


def _render(v: Verdict) -> str:
    where = []
    if v.link is not None:
        where.append(f"link {v.link[0]} -> {v.link[1]}")
    if v.node is not None:
        where.append(f"node {v.node}")
    ranks = ", ".join(map(str, v.ranks[:16])) + (f" ... ({len(v.ranks)} ranks)" if len(v.ranks) > 16 else "")
    head = f"[{v.kind.value}] t={v.at_s:.3f}s" + (f" collective #{v.seq}" if v.seq is not None else "")
    lines = [head, f"  blame: ranks {ranks}" + (f"; {'; '.join(where)}" if where else ""), f"  {v.message}"]
    lines += [f"    {k}: {val}" for k, val in v.evidence.items()]
    return "\n".join(lines)


@click.command()
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print verdicts as JSON (one object with a 'verdicts' list).")
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False),
    help="YAML/JSON with DetectorConfig fields (camelCase), or a TrainingJob manifest (its spec.faultDetection).",
)
@click.option("--tick", type=float, default=None, help="Replay resolution in seconds (default: automatic).")
def diagnose(trace: str, as_json: bool, config_path: str | None, tick: float | None) -> None:
    """Find the faulty rank, link or node in a collective-timing TRACE (JSON Lines, see docs/fault-detection.md).

    The trace is replayed as the operator would have seen it live; every verdict is printed with
    the numbers behind it. Exit status 0 when nothing was found, 3 when there are verdicts.
    """
    config = load_detector_config(config_path)
    try:
        tr = read_trace(trace)
    except TraceError as exc:
        raise click.ClickException(f"{trace}: {exc}") from None
    if tick is not None and tick <= 0:
        raise click.BadParameter(f"must be > 0, got {tick}", param_hint="--tick")
    try:
        det = replay(tr, config, tick_s=tick)
    except ValueError as exc:
        raise click.ClickException(f"{trace}: {exc}") from None
    verdicts = det.history
    if as_json:
        click.echo(json.dumps({
            "trace": trace, "worldSize": tr.topology.world_size, "records": len(tr.records),
            "linkSamples": len(tr.links), "verdicts": [v.to_dict() for v in verdicts],
            "stopped": det.ended,
        }, indent=2))
    else:
        click.echo(f"{trace}: {tr.topology.world_size} ranks on {len(tr.topology.node_names)} nodes, "
                   f"{len(tr.records)} collective records, {len(tr.links)} connection samples")
        if not verdicts:
            click.echo("no fault found")
        for v in verdicts:
            click.echo(_render(v))
        if det.ended is not None:
            click.echo(f"detection stopped at t={det.ended['at_s']:.3f}s: {det.ended['reason']}")
    if verdicts:
        raise SystemExit(3)
