"""Generate the Grafana dashboards shipped by the loco-operator chart.

    python charts/generate_dashboards.py           # (re)write charts/loco-operator/dashboards/*.json
    python charts/generate_dashboards.py --check   # exit 1 when a committed file differs

The dashboards are built in code with grafana-foundation-sdk (Grafana's own typed builders), so the
JSON model is well-formed by construction; ``tests/test_dashboards.py`` then checks what a builder
cannot: every PromQL expression parses and references only metrics that Loco's code exports, the
datasource is a template variable, and the ``namespace``/``job`` variables exist. The committed
JSON files must equal this script's output (a test fails on drift).

Label conventions (see ``loco_trainer/metrics.py``): trainer series carry ``namespace`` and ``job``
(the TrainingJob), ``replica`` and ``rank``. Prometheus must keep them (``honorLabels: true``, as the
chart's PodMonitor and ServiceMonitor set), or they arrive renamed ``exported_job``/``exported_namespace``.

Only metrics that exist are charted; wanted panels whose metrics are missing are listed in
:data:`MISSING_METRICS` (and in docs/helm.md) instead of being invented here.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m

#: Output directory: the chart reads dashboards/*.json with .Files.Glob.
OUT_DIR = Path(__file__).resolve().parent / "loco-operator" / "dashboards"

#: Every panel queries the datasource chosen in this variable (never a hard-coded uid).
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")

#: Selector of the dashboard's namespace/job variables, spliced into every trainer query.
SEL = 'namespace=~"$namespace", job=~"$job"'

#: Panels the issue asks for whose metrics no Loco code exports yet (reported, not invented).
MISSING_METRICS: dict[str, str] = {
    "Workers ready vs desired": "an operator gauge such as loco_operator_job_workers{namespace,job,state=ready|desired}",
    "Bytes on the wire per algorithm": "an `algorithm` label (or a loco_trainer_info{algorithm} series) on the trainer metrics; "
    "the panel shows bytes per exchange `kind` instead",
    "Checkpoint age": "a last-commit timestamp such as loco_trainer_last_checkpoint_timestamp_seconds",
    "Restarts per job": "namespace/job labels on loco_operator_restarts_total (it counts every job together)",
    "Operator reconcile queue": "a queue/in-flight gauge such as loco_operator_reconciles_in_flight",
    "Fault-to-recovery time": "a histogram such as loco_operator_recovery_seconds (failure seen -> workers running again)",
}


# ----------------------------------------------------------------------------------- builders


def query(expr: str, legend: str, ref_id: str) -> prom.Dataquery:
    """A Prometheus range query against the dashboard's datasource variable."""
    return prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(DATASOURCE)


def _targets(panel, targets: list[tuple[str, str]]):
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
    return panel


def timeseries(
    title: str, description: str, unit: str, targets: list[tuple[str, str]], *, width: int = 12, stacked: bool = False
) -> ts_b.Panel:
    """A time-series panel of ``targets`` (expr, legend) pairs."""
    panel = (
        ts_b.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
        .span(width).height(8).fill_opacity(10).line_width(1)
        .legend(common_b.VizLegendOptions().display_mode(common_m.LegendDisplayMode.TABLE)
                .placement(common_m.LegendPlacement.BOTTOM).show_legend(True).calcs(["lastNotNull", "max"]))
        .tooltip(common_b.VizTooltipOptions().mode(common_m.TooltipDisplayMode.MULTI).sort(common_m.SortOrder.DESCENDING))
    )
    if stacked:
        panel = panel.stacking(common_b.StackingConfig().mode(common_m.StackingMode.NORMAL)).fill_opacity(40)
    return _targets(panel, targets)


def stat(title: str, description: str, unit: str, targets: list[tuple[str, str]], *, width: int = 6) -> stat_b.Panel:
    """A single-value panel (last value of each series)."""
    panel = (
        stat_b.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
        .span(width).height(4)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    return _targets(panel, targets)


def datasource_variable() -> dash.DatasourceVariable:
    return dash.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, metric: str, selector: str = "") -> dash.QueryVariable:
    """A multi-select variable over the values of label ``name`` of ``metric``."""
    expr = f"label_values({metric}{{{selector}}}, {name})" if selector else f"label_values({metric}, {name})"
    return (
        dash.QueryVariable(name).label(label).datasource(DATASOURCE)
        .query({"query": expr, "refId": f"{name}-values", "qryType": 1})
        .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dash_m.VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*")
    )


def annotation(name: str, expr: str, color: str) -> dash.AnnotationQuery:
    """A PromQL annotation: a marker wherever ``expr`` has a sample (titled ``name``, tagged namespace/job)."""
    return dash.AnnotationQuery().name(name).datasource(DATASOURCE).enable(True).icon_color(color).expr(expr)


def loco_links() -> dash.DashboardLink:
    """A drop-down of every Loco dashboard, keeping the time range and variables."""
    return (
        dash.DashboardLink("Loco dashboards").type(dash_m.DashboardLinkType.DASHBOARDS).tags(["loco"])
        .as_dropdown(True).include_vars(True).keep_time(True)
    )


@dataclass(frozen=True)
class DashboardSpec:
    """One generated dashboard: its file name and its built JSON model."""

    filename: str
    model: dict = field(hash=False)


def _finish(builder: dash.Dashboard) -> dict:
    """The dashboard's JSON model, with the few fields the SDK's builders do not expose filled in."""
    model = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    for variable in model.get("templating", {}).get("list", []):
        variable.pop("id", None)  # a placeholder UUID shared by every variable; Grafana keys variables by name
    for item in model.get("annotations", {}).get("list", []):
        # Prometheus annotation fields: marker title and the labels shown as tags.
        item.setdefault("titleFormat", item["name"])
        item.setdefault("tagKeys", "namespace,job")
        item.setdefault("step", "60s")
    return model


# ----------------------------------------------------------------------------------- dashboards


def training_jobs_dashboard() -> DashboardSpec:
    """"Loco / Training jobs": progress, loss, throughput, step time, communication, checkpoints, stalls, restarts."""
    rate = "$__rate_interval"
    builder = (
        dash.Dashboard("Loco / Training jobs").uid("loco-training-jobs")
        .description("Per-TrainingJob training metrics scraped from the trainer workers' /metrics.")
        .tags(["loco", "training"]).refresh("30s").time("now-3h", "now").timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR).editable()
        .with_variable(datasource_variable())
        .with_variable(label_variable("namespace", "Namespace", "loco_trainer_step"))
        .with_variable(label_variable("job", "TrainingJob", "loco_trainer_step", 'namespace=~"$namespace"'))
        .annotation(annotation(
            "Restarts", "changes(loco_operator_restarts_total[2m]) > 0", "red",
        ))
        .annotation(annotation(
            "Stalls", f"(changes(loco_trainer_step{{{SEL}}}[5m]) == 0) and on (namespace, job, replica, rank) "
            f"(loco_trainer_step{{{SEL}}} < loco_trainer_total_steps{{{SEL}}})", "orange",
        ))
        .link(loco_links())
        .with_row(dash.Row("Progress"))
        .with_panel(stat("Step", "Inner steps completed (slowest worker).", "none",
                         [(f"min by (namespace, job) (loco_trainer_step{{{SEL}}})", "{{job}}")]))
        .with_panel(stat("Progress", "Steps completed over steps to run.", "percentunit",
                         [(f"min by (namespace, job) (loco_trainer_step{{{SEL}}}) / "
                           f"max by (namespace, job) (loco_trainer_total_steps{{{SEL}}})", "{{job}}")]))
        .with_panel(stat("Trainer processes reporting", "Worker ranks whose /metrics Prometheus scrapes.", "none",
                         [(f"count by (namespace, job) (loco_trainer_step{{{SEL}}})", "{{job}}")]))
        .with_panel(stat("Stalled ranks", "Unfinished ranks whose step has not moved for 5 minutes.", "none",
                         [(f"count by (namespace, job) ((changes(loco_trainer_step{{{SEL}}}[5m]) == 0) "
                           f"and on (namespace, job, replica, rank) (loco_trainer_step{{{SEL}}} < loco_trainer_total_steps{{{SEL}}}))"
                           f" or on (namespace, job) (0 * count by (namespace, job) (loco_trainer_step{{{SEL}}}))", "{{job}}")]))
        .with_row(dash.Row("Loss"))
        .with_panel(timeseries("Training loss", "Mean training loss over the last log interval, averaged over ranks.", "none",
                               [(f"avg by (namespace, job) (loco_trainer_loss{{{SEL}}})", "{{job}}")]))
        .with_panel(timeseries("Eval loss", "Latest held-out loss.", "none",
                               [(f"avg by (namespace, job) (loco_trainer_eval_loss{{{SEL}}})", "{{job}}")]))
        .with_row(dash.Row("Throughput"))
        .with_panel(timeseries("Tokens/s", "Training tokens per second, summed over every rank.", "short",
                               [(f"sum by (namespace, job) (rate(loco_trainer_tokens_total{{{SEL}}}[{rate}]))", "{{job}}"),
                                (f"sum by (namespace, job) (loco_trainer_tokens_per_second{{{SEL}}})", "{{job}} (reported)")]))
        .with_panel(timeseries("Step time", "Inner-step wall time: median and 95th percentile over ranks.", "s",
                               [(f"histogram_quantile(0.5, sum by (namespace, job, le) (rate(loco_trainer_step_seconds_bucket{{{SEL}}}[{rate}])))", "{{job}} p50"),
                                (f"histogram_quantile(0.95, sum by (namespace, job, le) (rate(loco_trainer_step_seconds_bucket{{{SEL}}}[{rate}])))", "{{job}} p95")]))
        .with_panel(timeseries("Mean step time per replica", "Stragglers stand out: mean inner-step time of each replica.", "s",
                               [(f"sum by (namespace, job, replica) (rate(loco_trainer_step_seconds_sum{{{SEL}}}[{rate}])) / "
                                 f"sum by (namespace, job, replica) (rate(loco_trainer_step_seconds_count{{{SEL}}}[{rate}]))", "{{job}} r{{replica}}")]))
        .with_panel(timeseries("Learning rate", "Inner optimizer learning rate.", "none",
                               [(f"max by (namespace, job) (loco_trainer_learning_rate{{{SEL}}})", "{{job}}")]))
        .with_row(dash.Row("Communication"))
        .with_panel(timeseries("Bytes on the wire", "Bytes sent through collectives per second, by exchange kind.", "Bps",
                               [(f"sum by (namespace, job, kind) (rate(loco_trainer_comm_bytes_sent_total{{{SEL}}}[{rate}]))", "{{job}} {{kind}}")],
                               stacked=True))
        .with_panel(timeseries("Bytes per inner step", "Communication per inner step: the low-communication algorithms' saving.", "bytes",
                               [(f"sum by (namespace, job) (rate(loco_trainer_comm_bytes_sent_total{{{SEL}}}[{rate}])) / "
                                 f"sum by (namespace, job) (rate(loco_trainer_step_seconds_count{{{SEL}}}[{rate}]))", "{{job}}")]))
        .with_row(dash.Row("Checkpoints and faults"))
        .with_panel(timeseries("Checkpoint save time", "Wall time of a checkpoint save, commit included (95th percentile).", "s",
                               [(f"histogram_quantile(0.95, sum by (namespace, job, le) (rate(loco_trainer_checkpoint_save_seconds_bucket{{{SEL}}}[{rate}])))", "{{job}} p95")]))
        .with_panel(timeseries("Checkpoints committed", "Checkpoints saved per hour.", "none",
                               [(f"max by (namespace, job) (increase(loco_trainer_checkpoint_save_seconds_count{{{SEL}}}[1h]))", "{{job}}")]))
        .with_panel(timeseries("Restarts (all jobs)", "Restarts from the last checkpoint per hour, over every job the operator "
                               "handles (the operator's counter has no per-job label yet); red annotations mark each.", "none",
                               [("sum (increase(loco_operator_restarts_total[1h]))", "restarts")]))
    )
    return DashboardSpec("training-jobs.json", _finish(builder))


def operator_dashboard() -> DashboardSpec:
    """"Loco / Operator": reconcile latency and rate, API errors, jobs by phase, transitions, restarts."""
    rate = "$__rate_interval"
    builder = (
        dash.Dashboard("Loco / Operator").uid("loco-operator")
        .description("Health of the Loco operator: reconcile latency, API errors, TrainingJobs by phase.")
        .tags(["loco", "operator"]).refresh("30s").time("now-6h", "now").timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR).editable()
        .with_variable(datasource_variable())
        .with_variable(label_variable("namespace", "Namespace", "loco_trainer_step"))
        .with_variable(label_variable("job", "TrainingJob", "loco_trainer_step", 'namespace=~"$namespace"'))
        .annotation(annotation("Restarts", "changes(loco_operator_restarts_total[2m]) > 0", "red"))
        .link(loco_links())
        .with_row(dash.Row("TrainingJobs"))
        .with_panel(timeseries("Jobs by phase", "TrainingJobs in each phase.", "none",
                               [("sum by (phase) (loco_operator_jobs)", "{{phase}}")], stacked=True))
        .with_panel(timeseries("Phase transitions", "Transitions per minute, by from -> to.", "none",
                               [(f"sum by (from, to) (rate(loco_operator_job_transitions_total[{rate}])) * 60", "{{from}} -> {{to}}")]))
        .with_panel(timeseries("Restarts", "Job restarts from checkpoint per hour.", "none",
                               [("sum (increase(loco_operator_restarts_total[1h]))", "restarts")]))
        .with_panel(timeseries("Trainer ranks reporting", "Worker ranks of the selected jobs whose /metrics Prometheus scrapes.", "none",
                               [(f"count by (namespace, job) (loco_trainer_step{{{SEL}}})", "{{namespace}}/{{job}}")]))
        .with_row(dash.Row("Reconcile"))
        .with_panel(timeseries("Reconcile latency", "Duration of one reconcile (observe, plan, apply).", "s",
                               [(f"histogram_quantile(0.5, sum by (le) (rate(loco_operator_reconcile_duration_seconds_bucket[{rate}])))", "p50"),
                                (f"histogram_quantile(0.95, sum by (le) (rate(loco_operator_reconcile_duration_seconds_bucket[{rate}])))", "p95"),
                                (f"histogram_quantile(0.99, sum by (le) (rate(loco_operator_reconcile_duration_seconds_bucket[{rate}])))", "p99")]))
        .with_panel(timeseries("Reconciles/s", "Reconciles per second.", "reqps",
                               [(f"sum (rate(loco_operator_reconcile_duration_seconds_count[{rate}]))", "reconciles")]))
        .with_panel(timeseries("API errors/s", "Failed Kubernetes API calls per second, by operation.", "reqps",
                               [(f"sum by (operation) (rate(loco_operator_api_errors_total[{rate}]))", "{{operation}}")]))
    )
    return DashboardSpec("operator.json", _finish(builder))


def all_dashboards() -> list[DashboardSpec]:
    """Every dashboard the chart ships."""
    return [training_jobs_dashboard(), operator_dashboard()]


def render(spec: DashboardSpec) -> str:
    """The file text of a dashboard (stable key order, trailing newline)."""
    return json.dumps(spec.model, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed dashboard differs from the generated one")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    args = parser.parse_args(argv)
    stale = []
    for spec in all_dashboards():
        path = args.out / spec.filename
        text = render(spec)
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale dashboards (run python charts/generate_dashboards.py): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
