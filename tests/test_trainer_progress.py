"""Progress endpoint, metrics and the termination message (in-process, no training)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loco_trainer.config import RuntimeEnv
from loco_trainer.metrics import TrainerMetrics
from loco_trainer.progress import ProgressServer, ProgressState, termination_message_path, write_termination_message
from loco_trainer.protocol import READY_PATH, ProgressReport, WorkerState


@pytest.fixture()
def served():
    metrics = TrainerMetrics("job-a", "ns", replica=1, rank=2)
    state = ProgressState(ProgressReport(job_name="job-a", replica_index=1, state=WorkerState.starting, total_steps=10))
    server = ProgressServer(state, metrics.render, "127.0.0.1", 0).start()
    yield state, metrics, f"http://127.0.0.1:{server.port}"
    server.stop()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type"), resp.read().decode()


def test_status_serves_the_current_report(served):
    state, _, base = served
    state.update(state=WorkerState.running, step=3, loss=2.5)
    code, ctype, body = _get(base + "/status")
    report = ProgressReport.model_validate_json(body)
    assert code == 200 and ctype == "application/json"
    assert (report.state, report.step, report.loss, report.total_steps) == (WorkerState.running, 3, 2.5, 10)
    assert json.loads(body)["jobName"] == "job-a" and report.time.endswith("Z")


def test_ready_answers_200_only_while_the_worker_trains(served):
    state, _, base = served

    def ready_code() -> int:
        try:
            return _get(base + READY_PATH)[0]
        except urllib.error.HTTPError as exc:
            assert "not training: " + state.worker_state().value in exc.read().decode()
            return exc.code

    assert ready_code() == 503  # starting: rendezvous, model build, resume
    state.update(state=WorkerState.running, step=1)
    assert ready_code() == 200
    for done in (WorkerState.finished, WorkerState.failed):
        state.update(state=done)
        assert ready_code() == 503


def test_metrics_serve_prometheus_text_with_labels(served):
    _, metrics, base = served
    metrics.step.set(7)
    metrics.loss.set(1.25)
    metrics.step_seconds.observe(0.02)
    metrics.set_comm_bytes({"all_reduce": 1000})
    metrics.set_comm_bytes({"all_reduce": 1500, "broadcast": 10})
    metrics.set_algorithm_metrics({"outer_rounds": 3})
    _, _, text = _get(base + "/metrics")
    samples = {(s.name, s.labels.get("kind")): s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("loco_trainer_step", None)].value == 7
    assert samples[("loco_trainer_step", None)].labels == {"job": "job-a", "namespace": "ns", "replica": "1", "rank": "2"}
    assert samples[("loco_trainer_loss", None)].value == 1.25
    assert samples[("loco_trainer_step_seconds_count", None)].value == 1
    assert samples[("loco_trainer_comm_bytes_sent_total", "all_reduce")].value == 1500
    assert samples[("loco_trainer_comm_bytes_sent_total", "broadcast")].value == 10
    algo = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "loco_trainer_algorithm_metric"]
    assert [(s.labels["metric"], s.value) for s in algo] == [("outer_rounds", 3.0)]


def test_unknown_path_is_404(served):
    _, _, base = served
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(base + "/nope")
    assert info.value.code == 404


def test_termination_message_goes_under_the_local_root(tmp_path):
    env = RuntimeEnv(local_root=str(tmp_path))
    report = ProgressReport(job_name="j", replica_index=0, state=WorkerState.finished, step=5)
    path = write_termination_message(report, env)
    assert path == str(tmp_path / "dev" / "termination-log")
    assert ProgressReport.model_validate_json(open(path).read()).step == 5


def test_termination_message_skipped_when_its_directory_is_missing(tmp_path):
    env = RuntimeEnv()
    assert termination_message_path(env, str(tmp_path / "missing" / "termination-log")) is None
    assert termination_message_path(env, str(tmp_path / "termination-log")) == str(tmp_path / "termination-log")
