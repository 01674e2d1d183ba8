"""Plot the dashboards' panels from a real run's Prometheus data (no Grafana renderer on CI machines).

    LOCO_DASHBOARD_DUMP=/tmp/run.json python -m pytest e2e/test_prometheus.py   # a real run, every panel's series
    python charts/plot_dashboards.py /tmp/run.json docs/dashboards                # one PNG per dashboard

The dump holds, for every panel of ``charts/loco-operator/dashboards/*.json``, the series its PromQL
targets returned over the run (Prometheus range queries, template variables substituted). Each
dashboard becomes one figure: a grid of panels in dashboard order, titled as in Grafana, the x axis
in seconds since the job was created; a panel without data (the GPU panel on a CPU run) says so.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

TITLES = {"training-jobs.json": "Loco / Training jobs", "operator.json": "Loco / Operator"}


def legend(labels: dict[str, str], expr: str, fmt: str = "") -> str:
    """The series' legend: Grafana's ``legendFormat`` (``{{label}}`` substituted) when the panel has
    one, else the labels that vary in such queries (job, replica, kind, state, ...)."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() if fmt else ""
    if text:
        return text
    keep = [f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("namespace", "__name__", "instance", "pod", "pod_namespace")]
    return ", ".join(keep) or re.sub(r"\s+", " ", expr)[:40]


def plot(dump: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = float(dump["start"])
    by_board: dict[str, list[dict[str, Any]]] = {}
    for panel in dump["panels"]:
        by_board.setdefault(panel["dashboard"], []).append(panel)
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for board, panels in by_board.items():
        cols = 3
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 3.0), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            ax.set_title(panel["title"], fontsize=9)
            drawn = 0
            for target in panel["targets"]:
                for series in target["series"]:
                    points = [(t - start, v) for t, v in series["values"] if not math.isnan(v)]
                    if not points:
                        continue
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, linewidth=1.2, marker="." if len(points) < 4 else None,
                            label=legend(series["labels"], target["expr"], target.get("legend", "")))
                    drawn += 1
            if drawn:
                if drawn <= 9:
                    ax.legend(fontsize=6, loc="best")
            else:
                ax.text(0.5, 0.5, "no data (GPU only)" if "GPU" in panel["title"] else "no data",
                        ha="center", va="center", transform=ax.transAxes, fontsize=8, color="grey")
            ax.tick_params(labelsize=7)
            ax.set_xlabel("s since job creation", fontsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{TITLES.get(board, board)} (a real run on the embedded cluster, scraped by Prometheus 2.42)", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        path = out_dir / (Path(board).stem + ".png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", type=Path, help="JSON written by e2e/test_prometheus.py (LOCO_DASHBOARD_DUMP)")
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/dashboards"), help="output directory")
    args = parser.parse_args(argv)
    try:
        dump = json.loads(args.dump.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.dump}: {exc}", file=sys.stderr)
        return 1
    for path in plot(dump, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
