"""Progress endpoint, metrics and the termination message (in-process, no training)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loco_contract.config import RuntimeEnv
from loco_trainer.metrics import TrainerMetrics
from loco_trainer.progress import ProgressServer, ProgressState, termination_message_path, write_termination_message
from loco_contract.protocol import READY_PATH, ProgressReport, WorkerState


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


def _post_membership(base: str, body: bytes, headers: dict[str, str], path: str = "/membership") -> tuple[int, str]:
    request = urllib.request.Request(base + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


UPDATE = json.dumps({"epoch": 1, "rank": 0, "worldSize": 2, "masterAddr": "10.0.0.1", "masterPort": 29500}).encode()


@pytest.fixture()
def guarded():
    state = ProgressState(ProgressReport(job_name="job-a", replica_index=0, state=WorkerState.running, total_steps=10))
    server = ProgressServer(state, lambda: b"", "127.0.0.1", 0, membership_token="s3cret-token").start()
    yield state, f"http://127.0.0.1:{server.port}"
    server.stop()


def test_a_membership_update_needs_the_jobs_token(guarded):
    state, base = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Basic s3cret-token"}):
        code, body = _post_membership(base, UPDATE, headers)
        assert code == 401 and "membership token" in body, headers
    assert state.snapshot().epoch == 0 and state.pending_membership() is None
    code, _ = _post_membership(base, UPDATE, {"Authorization": "Bearer s3cret-token"})
    assert code == 202 and state.pending_membership().epoch == 1


def test_a_membership_body_is_bounded(guarded):
    _, base = guarded
    code, body = _post_membership(base, b"{" + b" " * (64 * 1024) + b"}", {"Authorization": "Bearer s3cret-token"})
    assert code == 413 and "at most" in body


def test_a_worker_without_a_token_takes_no_membership_update(served):
    _, _, base = served
    code, body = _post_membership(base, UPDATE, {"Authorization": "Bearer anything"})
    assert code == 403 and "LOCO_MEMBERSHIP_TOKEN_FILE" in body


def test_a_checkpoint_request_needs_the_token_and_one_id_is_one_request(guarded, served):
    state, base = guarded
    ask = json.dumps({"id": "e0-s37", "reason": "runPolicy.suspend"}).encode()
    code, body = _post_membership(base, ask, {"Authorization": "Bearer wrong"}, "/checkpoint")
    assert code == 401 and "a checkpoint request needs the job's membership token" in body
    assert state.take_checkpoint_request() is None
    token = {"Authorization": "Bearer s3cret-token"}
    code, body = _post_membership(base, json.dumps({"id": "has space"}).encode(), token, "/checkpoint")
    assert code == 400 and "invalid checkpoint request: id:" in body
    assert _post_membership(base, ask, token, "/checkpoint")[0] == 202
    assert _post_membership(base, ask, token, "/checkpoint")[0] == 200  # held already: still one request
    taken = state.take_checkpoint_request()
    assert taken is not None and (taken.id, taken.reason) == ("e0-s37", "runPolicy.suspend")
    assert state.take_checkpoint_request() is None
    assert _post_membership(base, ask, token, "/checkpoint")[0] == 200  # taken already: not asked twice
    assert state.take_checkpoint_request() is None
    code, body = _post_membership(served[2], ask, {"Authorization": "Bearer anything"}, "/checkpoint")
    assert code == 403 and "takes no checkpoint requests" in body


def test_the_token_is_read_from_the_file_the_operator_mounts(tmp_path):
    from loco_trainer.progress import read_membership_token

    (tmp_path / "root" / "var" / "run").mkdir(parents=True)
    (tmp_path / "root" / "var" / "run" / "token").write_text("abc\n")
    env = RuntimeEnv(membership_token_file="/var/run/token", local_root=str(tmp_path / "root"))
    assert read_membership_token(env) == "abc"
    assert read_membership_token(RuntimeEnv()) is None
    with pytest.raises(RuntimeError, match="LOCO_MEMBERSHIP_TOKEN_FILE"):
        read_membership_token(RuntimeEnv(membership_token_file="/nope"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(RuntimeError, match="empty"):
        read_membership_token(RuntimeEnv(membership_token_file=str(tmp_path / "empty")))
