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

Only metrics that exist are charted (docs/metrics.md lists them); a wanted panel whose metric is
missing goes into :data:`MISSING_METRICS` (and docs/helm.md) instead of being invented here.
``e2e/test_prometheus.py`` evaluates every panel's query through a real Prometheus scraping a real run.
Operator per-job series carry ``namespace``/``job`` too, so the ServiceMonitor also honours labels.
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
MISSING_METRICS: dict[str, str] = {}

#: Panels whose query legitimately returns nothing on a CPU-only run (checked to parse and run, not for data).
GPU_ONLY_PANELS: frozenset[str] = frozenset({"GPU memory"})


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
            "Restarts", f"changes(loco_operator_job_restarts_total{{{SEL}}}[2m]) > 0", "red",
        ))
        .annotation(annotation(
            "Faults", f"changes(loco_operator_faults_total{{{SEL}}}[2m]) > 0", "purple",
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
        .with_panel(timeseries("Workers ready vs desired", "Worker pods of the current epoch: desired (spec.replicas) and "
                               "ready (running and reporting progress), from the operator.", "none",
                               [(f"max by (namespace, job, state) (loco_operator_job_workers{{{SEL}}})", "{{job}} {{state}}")]))
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
        .with_panel(timeseries("Inner steps per round by worker", "Under algorithm.adaptiveSteps: the inner steps each "
                               "worker takes per round (syncEvery for the fastest; fewer for a slower worker, so it "
                               "keeps up instead of holding every sync).", "none",
                               [(f"max by (namespace, job, worker) (loco_operator_job_worker_local_steps{{{SEL}}})",
                                 "{{job}} w{{worker}}")]))
        .with_row(dash.Row("Communication"))
        .with_panel(timeseries("Bytes on the wire", "Bytes sent through collectives per second, by exchange kind.", "Bps",
                               [(f"sum by (namespace, job, kind) (rate(loco_trainer_comm_bytes_sent_total{{{SEL}}}[{rate}]))", "{{job}} {{kind}}")],
                               stacked=True))
        .with_panel(timeseries("Bytes on the wire per algorithm", "Bytes sent per second, summed per algorithm "
                               "(joined on loco_trainer_info).", "Bps",
                               [(f"sum by (algorithm) (rate(loco_trainer_comm_bytes_sent_total{{{SEL}}}[{rate}]) "
                                 f"* on (namespace, job, replica, rank) group_left (algorithm) max by (namespace, job, replica, rank, algorithm) (loco_trainer_info{{{SEL}}}))", "{{algorithm}} sent"),
                                (f"sum by (algorithm) (rate(loco_trainer_comm_bytes_received_total{{{SEL}}}[{rate}]) "
                                 f"* on (namespace, job, replica, rank) group_left (algorithm) max by (namespace, job, replica, rank, algorithm) (loco_trainer_info{{{SEL}}}))", "{{algorithm}} received")]))
        .with_panel(timeseries("Bytes per inner step", "Communication per inner step: the low-communication algorithms' saving.", "bytes",
                               [(f"sum by (namespace, job) (rate(loco_trainer_comm_bytes_sent_total{{{SEL}}}[{rate}])) / "
                                 f"sum by (namespace, job) (rate(loco_trainer_step_seconds_count{{{SEL}}}[{rate}]))", "{{job}}")]))
        .with_panel(timeseries("Outer sync time", "Wall time of the algorithm's outer synchronisation (p95, and mean per replica).", "s",
                               [(f"histogram_quantile(0.95, sum by (namespace, job, le) (rate(loco_trainer_outer_sync_seconds_bucket{{{SEL}}}[1h])))", "{{job}} p95"),
                                (f"sum by (namespace, job, replica) (rate(loco_trainer_outer_sync_seconds_sum{{{SEL}}}[1h])) / "
                                 f"sum by (namespace, job, replica) (rate(loco_trainer_outer_sync_seconds_count{{{SEL}}}[1h]))", "{{job}} r{{replica}} mean")]))
        .with_panel(timeseries("Collective time", "Duration of one collective by kind (p95): the timings the fault detector "
                               "reads; a slow rank shifts its peers' waits.", "s",
                               [(f"histogram_quantile(0.95, sum by (namespace, job, kind, le) (rate(loco_trainer_collective_seconds_bucket{{{SEL}}}[1h])))", "{{job}} {{kind}} p95")]))
        .with_row(dash.Row("Checkpoints and faults"))
        .with_panel(stat("Checkpoint age", "Time since the job's last committed checkpoint (from the operator).", "s",
                         [(f"time() - max by (namespace, job) (loco_operator_job_checkpoint_timestamp_seconds{{{SEL}}})", "{{job}}")]))
        .with_panel(stat("Checkpoint step", "Inner step of the last committed checkpoint.", "none",
                         [(f"max by (namespace, job) (loco_operator_job_checkpoint_step{{{SEL}}})", "{{job}}")]))
        .with_panel(timeseries("Checkpoint stall", "Time a checkpoint blocked training (p95 and max over ranks of the mean).", "s",
                               [(f"histogram_quantile(0.95, sum by (namespace, job, le) (rate(loco_trainer_checkpoint_stall_seconds_bucket{{{SEL}}}[1h])))", "{{job}} p95"),
                                (f"max by (namespace, job) (rate(loco_trainer_checkpoint_stall_seconds_sum{{{SEL}}}[1h]) / "
                                 f"rate(loco_trainer_checkpoint_stall_seconds_count{{{SEL}}}[1h]))", "{{job}} mean (worst rank)")]))
        .with_panel(timeseries("Checkpoint save time", "Wall time of a checkpoint save, commit included (95th percentile).", "s",
                               [(f"histogram_quantile(0.95, sum by (namespace, job, le) (rate(loco_trainer_checkpoint_save_seconds_bucket{{{SEL}}}[1h])))", "{{job}} p95")]))
        .with_panel(timeseries("Checkpoints committed", "Checkpoints saved per hour.", "none",
                               [(f"max by (namespace, job) (increase(loco_trainer_checkpoint_save_seconds_count{{{SEL}}}[1h]))", "{{job}}")]))
        .with_panel(timeseries("Restarts", "Restarts from the last checkpoint in the past hour, per job; red annotations mark each.", "none",
                               [(f"sum by (namespace, job) (increase(loco_operator_job_restarts_total{{{SEL}}}[1h]))", "{{job}}")]))
        .with_panel(timeseries("Faults by kind", "Faults detected in the past hour, by kind (worker exit, OOM, eviction, "
                               "lost pod, fault-detector verdicts); purple annotations mark each.", "none",
                               [(f"sum by (namespace, job, kind) (increase(loco_operator_faults_total{{{SEL}}}[1h]))", "{{job}} {{kind}}")]))
        .with_panel(timeseries("GPU memory", "CUDA memory per rank (GPU runs only).", "bytes",
                               [(f"max by (namespace, job, replica, state) (loco_trainer_gpu_memory_bytes{{{SEL}}})", "{{job}} r{{replica}} {{state}}")]))
    )
    return DashboardSpec("training-jobs.json", _finish(builder))


def operator_dashboard() -> DashboardSpec:
    """"Loco / Operator": reconcile latency and rate, API errors, jobs by phase, transitions, restarts, populations."""
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
        # every transition is exported at 0 from the operator's start, so increase() sees the first of each;
        # "> 0" keeps the ones that did not happen out of the legend
        .with_panel(timeseries("Phase transitions", "Phase transitions in the past hour, by from -> to (those that "
                               "happened; from is empty for a new job).", "none",
                               [("sum by (from, to) (increase(loco_operator_job_transitions_total[1h])) > 0", "{{from}} -> {{to}}")]))
        .with_panel(timeseries("Restarts", "Job restarts from checkpoint in the past hour, all jobs and per job.", "none",
                               [("sum (increase(loco_operator_restarts_total[1h]))", "all jobs"),
                                (f"sum by (namespace, job) (increase(loco_operator_job_restarts_total{{{SEL}}}[1h]))", "{{namespace}}/{{job}}")]))
        .with_panel(timeseries("Faults and resizes", "Faults by kind and worker-count changes in the past hour.", "none",
                               [("sum by (kind) (increase(loco_operator_faults_total[1h]))", "fault {{kind}}"),
                                ("sum (increase(loco_operator_resizes_total[1h])) or vector(0)", "resizes")]))
        .with_panel(timeseries("Fault-to-recovery time", "From a fault (job Restarting) to all workers running again: "
                               "median and p95 over the past hour, and the mean.", "s",
                               [("histogram_quantile(0.5, sum by (le) (increase(loco_operator_fault_recovery_seconds_bucket[1h])))", "p50"),
                                ("histogram_quantile(0.95, sum by (le) (increase(loco_operator_fault_recovery_seconds_bucket[1h])))", "p95"),
                                ("sum (increase(loco_operator_fault_recovery_seconds_sum[1h])) / sum (increase(loco_operator_fault_recovery_seconds_count[1h]))", "mean")]))
        .with_panel(timeseries("Creation to running", "From a TrainingJob's creation to all its workers running (p50, p95, past hour).", "s",
                               [("histogram_quantile(0.5, sum by (le) (increase(loco_operator_job_time_to_running_seconds_bucket[1h])))", "p50"),
                                ("histogram_quantile(0.95, sum by (le) (increase(loco_operator_job_time_to_running_seconds_bucket[1h])))", "p95")]))
        .with_panel(timeseries("Workers ready vs desired", "Worker pods per job: desired and ready.", "none",
                               [(f"max by (namespace, job, state) (loco_operator_job_workers{{{SEL}}})", "{{namespace}}/{{job}} {{state}}")]))
        .with_panel(timeseries("Trainer ranks reporting", "Worker ranks of the selected jobs whose /metrics Prometheus scrapes.", "none",
                               [(f"count by (namespace, job) (loco_trainer_step{{{SEL}}})", "{{namespace}}/{{job}}")]))
        .with_row(dash.Row("Populations"))
        .with_panel(timeseries("Population score: best and median", "Each Population's best and median member score "
                               "(its spec.metric, lower is better) at the end of its last finished round.", "none",
                               [('min by (namespace, population, stat) (loco_operator_population_score{namespace=~"$namespace"})',
                                 "{{namespace}}/{{population}} {{stat}}")]))
        .with_panel(timeseries("Population rounds and exploits", "The round each Population trains now (from 0), and "
                               "the exploits it has made so far (bottom members that took a top member's checkpoint).",
                               "none",
                               [('max by (namespace, population) (loco_operator_population_round{namespace=~"$namespace"})',
                                 "{{namespace}}/{{population}} round"),
                                ('max by (namespace, population) (loco_operator_population_exploits{namespace=~"$namespace"})',
                                 "{{namespace}}/{{population}} exploits")]))
        .with_row(dash.Row("Reconcile"))
        .with_panel(timeseries("Reconcile latency", "Duration of one reconcile (observe, plan, apply).", "s",
                               [(f"histogram_quantile(0.5, sum by (le) (rate(loco_operator_reconcile_duration_seconds_bucket[{rate}])))", "p50"),
                                (f"histogram_quantile(0.95, sum by (le) (rate(loco_operator_reconcile_duration_seconds_bucket[{rate}])))", "p95"),
                                (f"histogram_quantile(0.99, sum by (le) (rate(loco_operator_reconcile_duration_seconds_bucket[{rate}])))", "p99")]))
        .with_panel(timeseries("Reconciles/s", "Reconciles per second.", "reqps",
                               [(f"sum (rate(loco_operator_reconcile_duration_seconds_count[{rate}]))", "reconciles")]))
        .with_panel(timeseries("Reconcile queue", "Reconciles running or waiting behind another reconcile of the same job "
                               "(max over the interval).", "none",
                               [(f"max (max_over_time(loco_operator_reconciles_in_flight[{rate}]))", "in flight")]))
        # every operation's series exists from the start at 0 (metrics.API_OPERATIONS): "> 0" keeps the failing ones,
        # vector(0) one flat line when none fails
        .with_panel(timeseries("API errors/s", "Failed Kubernetes API calls per second, by operation (0 when none).", "reqps",
                               [(f"sum by (operation) (rate(loco_operator_api_errors_total[{rate}])) > 0 or vector(0)", "{{operation}}")]))
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
