"""docs/metrics.md is the contract: both live endpoints export exactly the documented metrics.

* the operator's ``OperatorMetrics`` served over HTTP, fed by the real planner through a job's life
  (created, running, a worker crash, restart, running again, a resize, an eviction), exactly the
  way ``handlers.reconcile`` feeds it;
* a real trainer pod (``python -m loco_trainer --nproc 2``: two local ranks, DiLoCo, so collectives,
  outer syncs and checkpoints happen) scraped on its ``/metrics`` while it trains.

Both expositions are parsed with ``prometheus_client.parser`` and checked against the tables of
docs/metrics.md (name, type, labels; nothing undocumented), then linted with ``promtool check
metrics`` (Debian's prometheus package; ``make tools`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loco_operator.metrics import OperatorMetrics, fault_kind
from loco_operator.planner import EmitEvent, Observed, ObservedPod, plan
from loco_operator.render import JobRef, config_json
from loco_operator.spec import TrainingJobSpec
from loco_contract.protocol import ProgressReport

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "metrics.md"
#: Labels every trainer series carries (docs/metrics.md says so once instead of on every row).
TRAINER_LABELS = {"namespace", "job", "replica", "rank"}
#: Documented metrics a CPU run cannot produce samples for (their family is still declared).
GPU_ONLY = {"loco_trainer_gpu_memory_bytes"}


# ------------------------------------------------------------------------------------ the doc


def documented(section: str) -> dict[str, tuple[str, set[str]]]:
    """``{metric: (type, labels)}`` from the table under ``## <section>`` of docs/metrics.md."""
    text = DOC.read_text()
    match = re.search(rf"^## {section}\b.*?(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/metrics.md has no '## {section}' section"
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in match.group(0).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"`loco_\w+`", cells[0]):
            labels = set(re.findall(r"`(\w+)`", cells[2]))
            rows[cells[0].strip("`")] = (cells[1], labels)
    assert rows, f"no metric rows under '## {section}'"
    return rows


def family_name(name: str, type_: str) -> str:
    """The parser's family name of a documented metric (counters lose ``_total``)."""
    return name.removesuffix("_total") if type_ == "counter" else name


def check_against_doc(text: str, section: str, prefix: str, common_labels: set[str] = frozenset(),
                      samples_optional: set[str] = frozenset()) -> dict[str, Any]:
    """Every metric documented in ``section`` is exported with its type and labels, with samples; no
    exported ``prefix*`` metric is undocumented."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    exported = {name for name in families if name.startswith(prefix)}
    doc = documented(section)
    expected = {family_name(name, t): (name, t, labels) for name, (t, labels) in doc.items()}
    # prometheus_client adds a `<name>_created` gauge (creation time) to each counter and histogram
    exported -= {family_name(name, t) + "_created" for name, (t, _l) in doc.items() if t in ("counter", "histogram")}
    assert exported - set(expected) == set(), f"exported but not in docs/metrics.md ({section}): {sorted(exported - set(expected))}"
    assert set(expected) - exported == set(), f"documented but not exported ({section}): {sorted(set(expected) - exported)}"
    for fam_name, (name, type_, labels) in expected.items():
        family = families[fam_name]
        assert family.type == type_, f"{name}: exported as {family.type}, documented as {type_}"
        assert family.documentation, f"{name} has no HELP text"
        if name in samples_optional:
            continue
        assert family.samples, f"{name}: no samples after a run that should produce them"
        sample_labels = set().union(*(set(s.labels) for s in family.samples)) - {"le", "quantile"}
        assert sample_labels == labels | common_labels, f"{name}: labels {sorted(sample_labels)}, documented {sorted(labels | common_labels)}"
    return families


def promtool_check(text: str) -> None:
    """``promtool check metrics`` must accept the exposition (no lint problems)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        # `make test` installs promtool first (`make tools`, as root in CI): this skips only outside it.
        pytest.skip("promtool is not installed (Debian package 'prometheus'; 'make tools' installs it)")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers.get("Content-Type", "").startswith("text/plain")
        return resp.read().decode()


def test_doc_tables_are_well_formed():
    for section in ("Operator", "Trainer", "Checkpoint engine"):
        for name, (type_, _labels) in documented(section).items():
            assert type_ in ("counter", "gauge", "histogram"), f"{name}: type {type_!r}"
            assert (type_ == "counter") == name.endswith("_total"), f"{name}: counters and only counters end in _total"
            if type_ == "histogram":
                assert name.endswith("_seconds"), f"{name}: histograms here measure seconds"


# ------------------------------------------------------------------------------- the operator


T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
REF = JobRef("j", "ns", "uid-1")


def _job(status: dict[str, Any] | None, replicas: int = 2) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "uid-1", "generation": 1,
                     "creationTimestamp": T0.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "spec": {"replicas": replicas},
    }
    if status is not None:
        body["status"] = status
    return body


def _pods(epoch: int, n: int, phase: str = "Running", **kw: Any) -> tuple[ObservedPod, ...]:
    return tuple(ObservedPod(name=f"j-worker-{r}", rank=r, epoch=epoch, phase=phase, **kw) for r in range(n))


def _report(rank: int, step: int, ckpt: int) -> ProgressReport:
    return ProgressReport.model_validate({
        "jobName": "j", "replicaIndex": rank, "state": "running", "step": step, "totalSteps": 100,
        "lastCheckpoint": {"step": ckpt, "path": f"/ckpt/ns/j/step-{ckpt}", "time": "2026-03-01T12:00:30Z"}})


class _Life:
    """Drives ``plan`` and records into ``OperatorMetrics`` like ``handlers.reconcile`` does."""

    def __init__(self, metrics: OperatorMetrics):
        self.metrics, self.status, self.replicas = metrics, None, 2

    def step(self, seconds: float, pods: tuple[ObservedPod, ...], reports: dict[str, ProgressReport] | None = None) -> list[EmitEvent]:
        now = T0 + timedelta(seconds=seconds)
        body = _job(self.status, self.replicas)
        cfg = config_json(REF, TrainingJobSpec.model_validate(body["spec"]))
        result = plan(body, Observed(pods=pods, service_exists=True, membership_token="tok", configmap_data=cfg, reports=reports or {}), now)
        events = [a for a in result.actions if isinstance(a, EmitEvent)]
        self.metrics.observe_reconcile(body, self.status or {}, result.status,
                                       events=[(e.reason, e.message) for e in events], now_s=now.timestamp())
        self.status = result.status
        return events


def drive_operator_life(metrics: OperatorMetrics) -> None:
    """created -> running (10 s) -> rank 1 exits 3 -> restarting -> running (25 s after the fault)
    -> resized to 3 -> running -> rank 0 evicted -> restarting."""
    life = _Life(metrics)
    life.step(0, ())
    life.step(2, _pods(0, 2, "Pending"))
    life.step(10, _pods(0, 2), {f"j-worker-{r}": _report(r, 20, 20) for r in range(2)})
    assert life.status["phase"] == "Running"
    crashed = (_pods(0, 1)[0], ObservedPod(name="j-worker-1", rank=1, epoch=0, phase="Failed", exit_code=3))
    events = life.step(30, crashed)
    assert life.status["phase"] == "Restarting" and any(e.reason == "WorkerFailed" for e in events)
    life.step(31, ())  # old pods gone: recreated for epoch 1
    life.step(55, _pods(1, 2), {f"j-worker-{r}": _report(r, 25, 20) for r in range(2)})
    assert life.status["phase"] == "Running"
    life.replicas = 3
    life.step(60, _pods(1, 2))  # resize: restart into epoch 2
    life.step(61, ())
    life.step(70, _pods(2, 3))
    assert life.status["phase"] == "Running"
    evicted = (ObservedPod(name="j-worker-0", rank=0, epoch=2, phase="Running", deleting=True),) + _pods(2, 3)[1:]
    life.step(80, evicted)
    assert life.status["phase"] == "Restarting"


def test_fault_kinds_follow_the_planner_messages():
    """The classification reads the planner's own failure messages (a change there fails here)."""
    kinds = []
    for pods in [
        (ObservedPod(name="j-worker-0", rank=0, epoch=0, phase="Failed", exit_code=2),),
        (ObservedPod(name="j-worker-0", rank=0, epoch=0, phase="Failed", exit_code=137, termination_reason="OOMKilled"),),
        (ObservedPod(name="j-worker-0", rank=0, epoch=0, phase="Running", deleting=True),),
        (),  # rank 0 vanished while the job runs
    ]:
        body = _job({"phase": "Running", "workers": {"desired": 1, "ready": 1}}, replicas=1)
        cfg = config_json(REF, TrainingJobSpec.model_validate(body["spec"]))
        result = plan(body, Observed(pods=pods, service_exists=True, membership_token="tok", configmap_data=cfg), T0)
        failed = [a.message for a in result.actions if isinstance(a, EmitEvent) and a.reason == "WorkerFailed"]
        assert len(failed) == 1, result.actions
        kinds.append(fault_kind(failed[0]))
    assert kinds == ["worker-exit", "worker-oom", "worker-evicted", "worker-lost"]


def test_operator_endpoint_exports_every_documented_metric_and_passes_promtool():
    metrics = OperatorMetrics()
    port = metrics.serve(0, addr="127.0.0.1")
    try:
        # a fault detector verdict, as the planner words its FaultDetected event
        metrics.observe_reconcile(_job(None), {"phase": "Running"}, {"phase": "Restarting"}, now_s=T0.timestamp(),
                                  events=[("FaultDetected", "hang-comm at collective #7: blamed rank(s) 1 (j-worker-1 on n1): ...")])
        drive_operator_life(metrics)
        # adaptive local steps: worker 2 was measured slower and takes half of H; then worker 0 left
        plan = [{"worker": 0, "steps": 50}, {"worker": 1, "steps": 50}, {"worker": 2, "steps": 25, "stepSeconds": 0.2}]
        last = {"phase": "Restarting", "workers": {"desired": 3}, "lastCheckpoint": {"step": 20, "time": "2026-03-01T12:00:30Z"},
                "startTime": "2026-03-01T12:00:00Z"}
        metrics.observe_reconcile(_job(None), last, {**last, "localSteps": plan})
        metrics.observe_reconcile(_job(None), last, {**last, "localSteps": plan[1:]})
        metrics.api_errors.labels(operation="create_pod").inc()
        # a Population after its first round (scores), and one just created (none yet), then one deleted
        metrics.observe_population("ns", "pbt", {"round": 1, "best": {"score": 2.5}, "medianScore": 2.75,
                                                 "lineage": [{"member": 3}]})
        metrics.observe_population("ns", "fresh", {"round": 0})
        metrics.observe_population("ns", "gone", {"round": 2, "best": {"score": 1.0}, "medianScore": 1.5})
        metrics.forget_population("ns", "gone")
        text = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        metrics.close()
    families = check_against_doc(text, "Operator", "loco_")
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    job = (("job", "j"), ("namespace", "ns"))
    assert values[("loco_operator_job_restarts_total", job)] == 2  # the crash and the eviction (a resize is no restart)
    assert values[("loco_operator_restarts_total", ())] == 2
    # every fault kind of a job exists from its first reconcile, so increase() counts the first fault too
    assert values[("loco_operator_faults_total", (("job", "j"), ("kind", "slow-comm-link"), ("namespace", "ns")))] == 0
    assert values[("loco_operator_resizes_total", job)] == 1
    assert values[("loco_operator_faults_total", (("job", "j"), ("kind", "worker-exit"), ("namespace", "ns")))] == 1
    assert values[("loco_operator_faults_total", (("job", "j"), ("kind", "worker-evicted"), ("namespace", "ns")))] == 1
    assert values[("loco_operator_faults_total", (("job", "j"), ("kind", "hang-comm"), ("namespace", "ns")))] == 1
    assert values[("loco_operator_job_time_to_running_seconds_count", ())] == 1
    assert values[("loco_operator_job_time_to_running_seconds_sum", ())] == 10  # created at T0, running at T0+10s
    # fault->running: the Restarting condition (T0+30s) to Running again (T0+55s); the resize is not a fault
    assert values[("loco_operator_fault_recovery_seconds_count", ())] == 1
    assert values[("loco_operator_fault_recovery_seconds_sum", ())] == 25
    assert values[("loco_operator_job_workers", job + (("state", "desired"),))] == 3
    assert values[("loco_operator_job_workers", job + (("state", "ready"),))] == 0  # restarting
    assert values[("loco_operator_job_checkpoint_step", job)] == 20
    assert values[("loco_operator_job_checkpoint_timestamp_seconds", job)] == datetime(
        2026, 3, 1, 12, 0, 30, tzinfo=timezone.utc).timestamp()
    assert values[("loco_operator_jobs", (("phase", "Restarting"),))] == 1
    assert values[("loco_operator_reconciles_in_flight", ())] == 0
    pbt = (("namespace", "ns"), ("population", "pbt"))
    assert values[("loco_operator_population_score", pbt + (("stat", "best"),))] == 2.5
    assert values[("loco_operator_population_score", pbt + (("stat", "median"),))] == 2.75
    assert values[("loco_operator_population_round", pbt)] == 1
    assert values[("loco_operator_population_exploits", pbt)] == 1
    assert values[("loco_operator_population_round", (("namespace", "ns"), ("population", "fresh")))] == 0
    assert not [k for k in values if k[0].startswith("loco_operator_population") and ("population", "gone") in k[1]]
    assert not [k for k in values if k[0] == "loco_operator_population_score" and ("population", "fresh") in k[1]]
    local = {dict(labels)["worker"]: v for (name, labels), v in values.items() if name == "loco_operator_job_worker_local_steps"}
    assert local == {"1": 50, "2": 25}  # worker 0's series went with it
    # the job checkpoints every 50 steps (the default): its start is exported, for the checkpoint-age alert
    assert values[("loco_operator_job_start_timestamp_seconds", job)] == T0.timestamp()
    promtool_check(text)

    metrics.forget_job("ns/j")
    after = {f.name: f for f in text_string_to_metric_families(_render(metrics))}
    assert not after["loco_operator_job_workers"].samples and not after["loco_operator_job_checkpoint_step"].samples
    assert not after["loco_operator_job_start_timestamp_seconds"].samples
    assert not after["loco_operator_job_worker_local_steps"].samples


def test_a_job_that_checkpoints_only_at_the_end_exports_no_start_time():
    """checkpoint.everySteps 0 means no checkpoint until the end, by choice: the stale-checkpoint alert must not
    count from such a job's start."""
    def start_samples(every: int | None) -> list:
        metrics = OperatorMetrics()
        body = _job(None)
        if every is not None:
            body["spec"]["checkpoint"] = {"everySteps": every}
        metrics.observe_reconcile(body, {}, {"phase": "Running", "startTime": "2026-03-01T12:00:00Z"})
        families = {f.name: f for f in text_string_to_metric_families(_render(metrics))}
        return families["loco_operator_job_start_timestamp_seconds"].samples

    assert [s.value for s in start_samples(None)] == [datetime(2026, 3, 1, 12, tzinfo=timezone.utc).timestamp()]
    assert [s.value for s in start_samples(100)] == [datetime(2026, 3, 1, 12, tzinfo=timezone.utc).timestamp()]
    assert start_samples(0) == []


def _render(metrics: OperatorMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


# -------------------------------------------------------------------------------- the trainer


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_trainer_endpoint_exports_every_documented_metric_and_passes_promtool(tmp_path):
    import yaml

    config = {
        "jobName": "metrics", "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 200_000},
        "training": {"steps": 200, "batchSize": 4, "seqLen": 32, "lr": 3e-3, "warmupSteps": 2,
                     "logEvery": 2, "evalEvery": 4, "evalBatches": 1},
        "algorithm": {"name": "diloco", "syncEvery": 2},
        "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 4},
        "faultInjection": {"stepDelayS": 0.05},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loco_trainer", "--config", str(path), "--nproc", "2",
                             "--status-port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"

    def ready() -> str | None:
        try:
            text = scrape(url)
        except OSError:
            return None
        names: dict[str, float] = {}  # summed over label sets (kinds)
        for sample in (s for f in text_string_to_metric_families(text) for s in f.samples):
            names[sample.name] = names.get(sample.name, 0.0) + sample.value
        wanted = ("loco_trainer_checkpoint_stall_seconds_count", "loco_trainer_outer_sync_seconds_count",
                  "loco_trainer_collective_seconds_count", "loco_trainer_eval_loss")
        return text if all(names.get(n, 0) > 0 for n in wanted) else None  # NaN (not yet evaluated) fails too

    try:
        deadline, text = time.monotonic() + 180, None
        while text is None and time.monotonic() < deadline and proc.poll() is None:
            text = ready()
            if text is None:
                time.sleep(0.5)
        assert text is not None, f"no complete /metrics within 180s (exit {proc.poll()})"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert text is not None, out[-3000:]
    prefixes = {f.name.split("_")[1] for f in text_string_to_metric_families(text) if f.name.startswith("loco_")}
    assert prefixes == {"trainer", "checkpoint"}, f"unexpected metric prefixes on a trainer: {prefixes}"
    check_against_doc(text, "Checkpoint engine", "loco_checkpoint_")
    families = check_against_doc(text, "Trainer", "loco_trainer_", TRAINER_LABELS, samples_optional=GPU_ONLY)
    samples = {(s.name, s.labels.get("kind") or s.labels.get("algorithm") or ""): s.value
               for f in families.values() for s in f.samples}
    assert samples[("loco_trainer_info", "diloco")] == 1
    assert samples[("loco_trainer_comm_bytes_sent_total", "all_reduce")] > 0
    assert samples[("loco_trainer_comm_bytes_received_total", "all_reduce")] > 0
    assert samples[("loco_trainer_comm_bytes_sent_total", "reduce_scatter")] == 0  # unused kinds start at 0 for rate()
    assert samples[("loco_trainer_checkpoint_last_commit_timestamp_seconds", "")] > time.time() - 600
    assert samples[("loco_trainer_checkpoint_step", "")] % 4 == 0 and samples[("loco_trainer_checkpoint_step", "")] >= 4
    promtool_check(text)


# ------------------------------------------------------------------ the Prometheus of loco local


def test_worker_targets_keep_only_running_loco_pods():
    from loco_local.prometheus import worker_targets

    def pod(name, phase="Running", ip="127.0.1.5", labels=None, deleting=False):
        meta = {"name": name, "namespace": "ns", "labels": {"loco.dev/job": "j"} if labels is None else labels}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "status": {"phase": phase, "podIP": ip}}

    pods = [pod("j-worker-1", ip="127.0.1.6"), pod("j-worker-0"), pod("pending", "Pending"), pod("noip", ip=None),
            pod("other", labels={}), pod("going", deleting=True), pod("v6", ip="fd00::1")]
    assert worker_targets(pods) == [
        {"targets": ["127.0.1.5:8080"], "labels": {"pod": "j-worker-0", "pod_namespace": "ns"}},
        {"targets": ["127.0.1.6:8080"], "labels": {"pod": "j-worker-1", "pod_namespace": "ns"}},
        {"targets": ["[fd00::1]:8080"], "labels": {"pod": "v6", "pod_namespace": "ns"}},
    ]


def test_scrape_config_is_valid_for_promtool(tmp_path):
    import json

    import yaml

    from loco_local.prometheus import ALERT_RULES, scrape_config, worker_targets

    workers = tmp_path / "workers.json"
    workers.write_text(json.dumps(worker_targets([{"metadata": {"name": "p", "namespace": "ns", "labels": {"loco.dev/job": "j"}},
                                                    "status": {"phase": "Running", "podIP": "127.0.2.1"}}])))
    config = scrape_config(["127.0.0.1:9090"], workers, interval_s=1.5, rule_files=[ALERT_RULES])
    assert config["global"]["scrape_interval"] == "1500ms" and config["global"]["scrape_timeout"] == "1200ms"
    assert config["rule_files"] == [str(ALERT_RULES)] and ALERT_RULES.is_file()  # promtool checks the rules too
    assert "rule_files" not in scrape_config(["127.0.0.1:9090"], workers)
    assert all(job["honor_labels"] for job in config["scrape_configs"]), "trainer/operator job labels must win"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    promtool = shutil.which("promtool")
    if promtool is None:
        # `make test` installs promtool first (`make tools`, as root in CI): this skips only outside it.
        pytest.skip("promtool is not installed (Debian package 'prometheus'; 'make tools' installs it)")
    done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(180)
def test_loco_local_up_prometheus_prints_where_to_scrape_and_scrapes(tmp_path):
    """``loco local up --detach --prometheus``: prints the endpoints, runs Prometheus with both jobs."""
    import json

    if shutil.which("prometheus") is None:
        # `make test` installs promtool first (`make tools`, as root in CI): this skips only outside it.
        pytest.skip("Debian's prometheus package is not installed ('make tools' installs it)")
    state = tmp_path / "state"
    loco = [sys.executable, "-c", "import loco_cli; loco_cli.main()", "local"]
    up = subprocess.run([*loco, "up", "--detach", "--nodes", "1", "--state-dir", str(state), "--prometheus",
                         "--prometheus-port", "0", "--operator-metrics", "127.0.0.1:19999"],
                        capture_output=True, text=True, timeout=150)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        info = json.loads((state / "cluster.json").read_text())
        prom_url = info["prometheus"]
        assert "operator: http://127.0.0.1:19999/metrics" in up.stdout, up.stdout
        assert "http://<podIP>:8080/metrics" in up.stdout and f"prometheus: {prom_url}" in up.stdout, up.stdout
        deadline, targets = time.monotonic() + 60, []
        while not targets and time.monotonic() < deadline:  # service discovery runs shortly after /-/ready
            with urllib.request.urlopen(prom_url + "/api/v1/targets", timeout=10) as resp:
                targets = json.loads(resp.read())["data"]["activeTargets"]
            time.sleep(0.3)
        assert {t["labels"]["job"] for t in targets} == {"loco-operator"}  # no worker pods yet
        assert targets[0]["scrapeUrl"] == "http://127.0.0.1:19999/metrics"
        assert (state / "prometheus" / "workers.json").read_text().strip() == "[]"
        # Loco's alerting rules are loaded (docs/helm.md, "Alerts"), and the output says where to see them
        with urllib.request.urlopen(prom_url + "/api/v1/rules?type=alert", timeout=10) as resp:
            groups = json.loads(resp.read())["data"]["groups"]
        alerts = {rule["name"] for group in groups for rule in group["rules"]}
        assert {"LocoWorkerFault", "LocoTrainingJobFailed", "LocoCheckpointStale"} <= alerts, alerts
        assert f"alerts:     {prom_url}/alerts" in up.stdout, up.stdout
    finally:
        down = subprocess.run([*loco, "down", "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    with pytest.raises(OSError):  # Prometheus went down with the cluster
        urllib.request.urlopen(prom_url + "/-/ready", timeout=5)
