"""A real Prometheus proves the dashboards: every panel's PromQL, evaluated against a real run.

Debian's ``prometheus`` (2.42, ``make tools``) runs on loopback with a 1 s scrape interval, scraping the
operator process of the ``stack`` fixture (its ``--metrics-port 0`` port, read from its log) and the
job's worker pods (``IP:8080``, through a file_sd file following the pod list: the same
:mod:`loco_local.prometheus` that ``loco local up --prometheus`` uses). A 2-worker DiLoCo job crashes
one worker once (fault injection), restarts from its checkpoint and finishes. While it runs, every
panel query of both dashboards goes through ``/api/v1/query`` with the template variables
substituted; each must parse and return data (the GPU panel only has to run: this is a CPU run).
Loco's alerting rules (``charts/loco-operator/alerts/loco.rules.yaml``) are loaded too: the crash must fire
``LocoWorkerFault`` for the job, and no other alert. Then ``kubectl get tj -o wide`` and ``kubectl describe tj``
must tell the story of the run.

With ``LOCO_DASHBOARD_DUMP=<file.json>`` the test also saves every panel's series over the run
(range queries), which ``charts/plot_dashboards.py`` renders to docs/dashboards/*.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import REPO, dump_debug
from loco_local.scenario import small_job
from loco_local.prometheus import ALERT_RULES, PodTargetFollower, Prometheus, PrometheusError

pytestmark = pytest.mark.timeout(400)

DASHBOARDS = REPO / "charts" / "loco-operator" / "dashboards"
#: Template variables -> the values a user selecting "All" over this run would send.
VARIABLES = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "1h", "$namespace": ".*", "$job": ".*",
             "${datasource}": ""}
#: Panels that cannot have data on a CPU-only run (they must still parse and run).
GPU_ONLY_PANELS = {"GPU memory"}
JOB = "prom"
STEPS = 60
POPULATION = {
    "apiVersion": "loco.dev/v1alpha1", "kind": "Population", "metadata": {"name": "prom-pbt"},
    "spec": {"size": 2, "exploitEverySteps": 4, "template": small_job("x", replicas=1, steps=8)["spec"],
             "search": [{"field": "training.lr", "min": 1e-3, "max": 1e-2}]},
}
CONTROL_PLANES = ("embedded", "kubernetes")


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def dashboard_queries() -> list[tuple[str, str, str, str]]:
    """``(dashboard, panel title, kind, expr)`` for every panel target and annotation of both dashboards."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        model = json.loads(path.read_text())
        stack = list(model.get("panels", []))
        while stack:
            panel = stack.pop(0)
            stack.extend(panel.get("panels") or [])
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    found.append((path.name, panel.get("title", ""), "panel", target["expr"]))
        for item in model.get("annotations", {}).get("list", []):
            if item.get("expr"):
                found.append((path.name, item.get("name", ""), "annotation", item["expr"]))
    return found


def operator_metrics_port(log: Path, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = re.search(r"operator metrics on :(\d+)/metrics", log.read_text(errors="replace") if log.exists() else "")
        if match:
            return int(match.group(1))
        time.sleep(0.3)
    raise AssertionError(f"the operator never logged its metrics port in {log}")


def missing_data(prom: Prometheus, queries: list[tuple[str, str, str, str]]) -> list[str]:
    """The panel queries returning no data now (nothing, or only NaN: e.g. a quantile of no observations);
    raises when one fails to parse or run."""
    missing = []
    for board, title, kind, expr in queries:
        try:
            result = prom.query(substitute(expr))
        except PrometheusError as exc:
            raise AssertionError(f"{board} / {title} ({kind}): Prometheus refused {substitute(expr)!r}: {exc}") from None
        numbers = [r["value"][1] for r in result if isinstance(r.get("value"), list)]
        if kind == "panel" and title not in GPU_ONLY_PANELS and not any(v not in ("NaN", "+Inf", "-Inf") for v in numbers):
            missing.append(f"{board} / {title}: {substitute(expr)}")
    return missing


def value(prom: Prometheus, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="Debian's prometheus package is not installed (run 'make tools' as root)")
def test_real_prometheus_evaluates_every_dashboard_query_on_a_real_run(stack, tmp_path):
    queries = dashboard_queries()
    assert len([q for q in queries if q[2] == "panel"]) >= 30, "the dashboards lost panels"
    port = operator_metrics_port(stack.operator_log)
    # adaptiveSteps at equal speeds: every worker takes the full H, and the local-steps panel has data
    doc = small_job(JOB, steps=STEPS, training__evalEvery=10, checkpoint__everySteps=10, algorithm__adaptiveSteps={},
                    faultInjection={"crashAtStep": 25, "ranks": [1], "exitCode": 3, "stepDelayS": 0.15})
    with Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"], interval_s=1.0, rule_files=[ALERT_RULES]) as prom:
        follower = PodTargetFollower(lambda: stack.list_pods(JOB), prom.workers_file, interval_s=1.0).start()
        started = time.time()
        try:
            # scraped before the job exists, so increase() sees every event of the run from 0
            stack.wait_for(lambda: prom.query('up{job="loco-operator"} == 1'), timeout_s=60, what="a first operator scrape")
            # a tiny Population first (2 members, 2 rounds): the Populations panels get their series
            stack.apply(POPULATION)
            stack.wait_for(lambda: prom.query('loco_operator_population_score{population="prom-pbt", stat="best"}'),
                           timeout_s=240, what="the population's first scored round")
            stack.apply(doc)
            missing: list[str] = []

            def all_panels_have_data() -> bool:
                nonlocal missing
                job = stack.get_job(JOB) or {}
                if (job.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    raise AssertionError(f"{JOB} finished before every panel had data; still empty:\n" + "\n".join(missing))
                missing = missing_data(prom, queries)
                return not missing

            try:
                stack.wait_for(all_panels_have_data, timeout_s=240, interval_s=2.0, what="data in every dashboard panel")
            except TimeoutError:
                raise AssertionError("panels without data:\n" + "\n".join(missing) + "\n" + dump_debug(stack, JOB)) from None
            # the numbers behind the panels are the run's: one worker-exit fault, one restart, one recovery
            assert value(prom, f'loco_operator_job_restarts_total{{job="{JOB}"}}') == 1
            assert value(prom, f'loco_operator_faults_total{{job="{JOB}", kind="worker-exit"}}') == 1
            assert value(prom, "loco_operator_fault_recovery_seconds_count") >= 1
            assert value(prom, "loco_operator_job_time_to_running_seconds_count") >= 1
            # per-job counters start at 0, so increase() (the Restarts panel) sees the first restart
            assert value(prom, f'sum(increase(loco_operator_job_restarts_total{{job="{JOB}"}}[1h]))') >= 0.9
            # so are the phase transitions (the Phase transitions panel): the crash's Running -> Restarting shows
            assert value(prom, 'sum(increase(loco_operator_job_transitions_total{from="Running", to="Restarting"}[1h]))') >= 0.9
            # Loco's alerts (charts/loco-operator/alerts): the crash fires LocoWorkerFault for this job, nothing else fires
            firing = f'ALERTS{{alertname="LocoWorkerFault", alertstate="firing", job="{JOB}", kind="worker-exit"}}'
            stack.wait_for(lambda: prom.query(firing), timeout_s=30, what="LocoWorkerFault firing for the crash")
            # firing only: a worker scraped once so far has an unchanged step over the window, so
            # LocoTrainingJobStalled may be pending (seen on the real control plane); its `for: 5m` keeps it from firing
            others = prom.query('ALERTS{alertname!="LocoWorkerFault", alertstate="firing"}')
            assert not others, [s["metric"] for s in others]
            # both workers scraped: waited for, since a worker the crash restarted is a new pod, a new target the
            # follower adds within a second and Prometheus scrapes a second later (CI once read 1 here)
            stack.wait_for(lambda: value(prom, f'count(loco_trainer_step{{job="{JOB}"}})') == 2, timeout_s=60,
                           what="both workers' step scraped")
            assert value(prom, f'max(loco_operator_job_workers{{job="{JOB}", state="desired"}})') == 2
            job = stack.wait_for_phase(JOB, {"Succeeded", "Failed"}, timeout_s=240)
            assert job["status"]["phase"] == "Succeeded", dump_debug(stack, JOB)
            if os.environ.get("LOCO_DASHBOARD_DUMP"):
                dump_series(prom, queries, started, time.time(), Path(os.environ["LOCO_DASHBOARD_DUMP"]))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                exposition = resp.read().decode()
        finally:
            follower.stop()
    promtool = shutil.which("promtool")
    if promtool:  # the live operator's exposition, after a real run, lints clean
        done = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    check_kubectl_story(stack)


def check_kubectl_story(stack) -> None:
    """``kubectl get tj -o wide`` shows the columns; ``kubectl describe tj`` tells the run's story."""
    wide = stack.kubectl("get", "tj", JOB, "-o", "wide").stdout.splitlines()
    header = wide[0].split()
    assert header == ["NAME", "PHASE", "WORKERS", "STEP", "PROGRESS", "ETA", "LOSS", "ALGORITHM", "RESTARTS", "AGE",
                      "CHECKPOINT", "TOKENS/S"], wide
    # cut the row at the header's column starts: an unset value prints as an empty cell
    starts = [wide[0].index(name) for name in header] + [None]
    row = {name: wide[1][starts[i]:starts[i + 1]].strip() for i, name in enumerate(header)}
    assert row["NAME"] == JOB and row["PHASE"] == "Succeeded" and row["STEP"] == str(STEPS)
    assert row["PROGRESS"] == "100%" and row["ETA"] == "", wide  # finished: no time left to guess
    assert row["ALGORITHM"] == "diloco" and row["RESTARTS"] == "1" and row["CHECKPOINT"] == str(STEPS)
    assert float(row["TOKENS/S"]) > 0 and float(row["LOSS"]) > 0
    plain = stack.kubectl("get", "tj", JOB).stdout.splitlines()[0].split()
    assert "CHECKPOINT" not in plain and {"RESTARTS", "ALGORITHM"} <= set(plain)
    described = stack.kubectl("describe", "tj", JOB).stdout
    assert "Conditions:" in described and "Events:" in described, described
    conditions = described[described.index("Conditions:"):described.index("Events:")]
    assert re.search(r"Message:\s+Step \d+ committed at \S+: \S+\s+Reason:\s+CheckpointCommitted\s+Status:\s+True\s+"
                     r"Type:\s+Checkpointed", conditions), conditions
    events = described[described.index("Events:"):]
    story = ["WorkersCreated", "Running", "CheckpointCommitted", "WorkerFailed", "Restarting", "Succeeded"]
    for reason in story:
        assert reason in events, f"kubectl describe lacks a {reason} event:\n{events}"
    assert "exited with code 3" in events, events
    assert re.search(r"resuming from step (10|20)\b", events), f"no 'resuming from step N' event:\n{events}"


def dump_series(prom: Prometheus, queries: list[tuple[str, str, str, str]], start: float, end: float, path: Path) -> None:
    """Every panel's series over the run (range queries, 2 s step) as JSON for charts/plot_dashboards.py."""
    panels: dict[str, dict[str, Any]] = {}
    for board, title, kind, expr, legend in queries_with_legends(queries):
        if kind != "panel":
            continue
        entry = panels.setdefault(f"{board}::{title}", {"dashboard": board, "title": title, "targets": []})
        series = prom.query_range(substitute(expr), start, end, 2.0)
        entry["targets"].append({"expr": expr, "legend": legend, "series": [
            {"labels": s["metric"], "values": [[float(t), float(v)] for t, v in s["values"]]} for s in series]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"start": start, "end": end, "panels": list(panels.values())}, indent=1))


def queries_with_legends(queries: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str, str]]:
    """``queries`` plus each panel target's Grafana legend format (for the plots)."""
    legends: dict[tuple[str, str, str], str] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        stack = list(json.loads(path.read_text()).get("panels", []))
        while stack:
            panel = stack.pop(0)
            stack.extend(panel.get("panels") or [])
            for target in panel.get("targets") or []:
                legends[(path.name, panel.get("title", ""), target.get("expr", ""))] = target.get("legendFormat", "")
    return [(b, t, k, e, legends.get((b, t, e), "")) for b, t, k, e in queries]
