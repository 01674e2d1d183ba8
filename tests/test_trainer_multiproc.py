"""End-to-end trainer runs with real local ranks (``python -m loco_trainer --nproc N``).

Tiny model and corpus so each run takes a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loco_trainer import ucp
from loco_contract.protocol import ProgressReport, WorkerState

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(180)]

RUN_TIMEOUT_S = 150


def tiny_config(tmp_path, algorithm: dict, **training) -> dict:
    return {
        "jobName": "tiny",
        "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 200_000},
        "training": {"steps": 24, "batchSize": 4, "seqLen": 32, "lr": 3e-3, "warmupSteps": 2,
                     "logEvery": 4, "evalEvery": 12, "evalBatches": 2, **training},
        "algorithm": algorithm,
        "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 8},
    }


def write_config(tmp_path, config: dict, name="config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def write_pod_config(root, config: dict) -> str:
    """Put the config where a pod sees its ConfigMap (/etc/loco under the emulated container root)
    and return the container path, as the operator passes it."""
    path = root / "etc" / "loco" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return "/etc/loco/config.yaml"


def train(config_path: str, *args: str, env: dict | None = None, history=None, timeout=RUN_TIMEOUT_S):
    cmd = [sys.executable, "-m", "loco_trainer", "--config", config_path, *args]
    if history:
        cmd += ["--history", str(history)]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def read_history(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


def committed(directory) -> list:
    """The committed universal checkpoints under a job's checkpoint directory, oldest first."""
    return ucp.list_checkpoints(ucp.Storage(str(directory)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "nproc, algorithm",
    [(2, {"name": "ddp"}), (3, {"name": "diloco", "syncEvery": 6})],
    ids=["ddp-2ranks", "diloco-3ranks"],
)
def test_local_run_learns_and_checkpoints(tmp_path, nproc, algorithm):
    cfg = tiny_config(tmp_path, algorithm)
    history = tmp_path / "history.jsonl"
    result = train(write_config(tmp_path, cfg), "--nproc", str(nproc), history=history)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = read_history(history)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 0.5, losses
    assert "step 24/24 | loss" in result.stdout
    found = committed(tmp_path / "ckpt" / "test" / "tiny")
    assert [c.step for c in found] == [8, 16, 24]
    assert found[-1].layout.world_size == nproc and found[-1].manifest.algorithm == algorithm["name"]
    assert sorted(os.listdir(found[-1].url)) == ["data", "index", "manifest.json"]
    assert sorted(os.listdir(os.path.join(found[-1].url, "data"))) == [f"rank-{r:05d}.safetensors" for r in range(nproc)]


def test_crash_then_rerun_resumes_and_reproduces_the_uninterrupted_run(tmp_path):
    algorithm = {"name": "diloco", "syncEvery": 3}

    def config(root, **extra):
        cfg = tiny_config(root, algorithm, steps=12, evalEvery=0)
        cfg["checkpoint"]["everySteps"] = 4
        # synchronous saves: step 4 is committed before the crash at step 7 (an async save may still be
        # writing when the process dies, and then correctly never commits)
        cfg["checkpoint"]["asyncSave"] = False
        return {**cfg, **extra}

    reference = tmp_path / "reference.jsonl"
    result = train(write_config(tmp_path, config(tmp_path / "a")), "--nproc", "2", history=reference)
    assert result.returncode == 0, result.stderr[-3000:]

    crashing = config(tmp_path / "b", faultInjection={"crashAtStep": 7, "exitCode": 7, "ranks": [1]})
    path = write_config(tmp_path, crashing, "crash.yaml")
    first = tmp_path / "first.jsonl"
    result = train(path, "--nproc", "2", history=first)
    assert result.returncode == 7, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt_dir = str(tmp_path / "b" / "ckpt" / "test" / "tiny")
    assert committed(ckpt_dir)[-1].step == 4
    assert max(read_history(first)) < 12  # rank 0 may run ahead to the next DiLoCo sync, never to the end

    second = tmp_path / "second.jsonl"
    result = train(path, "--nproc", "2", history=second, env={"LOCO_RESTART_COUNT": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from" in result.stdout and "step-00000004" in result.stdout
    resumed, expected = read_history(second), read_history(reference)
    assert sorted(resumed) == list(range(5, 13))
    assert [resumed[s] for s in range(5, 13)] == [expected[s] for s in range(5, 13)]


def test_resume_into_another_model_is_refused_naming_the_tensor(tmp_path):
    """Any layout loads into any other, but not into another model: the error names the tensor and shapes."""
    from loco_trainer.model import build_model
    from loco_contract.config import ModelSpec

    cfg = tiny_config(tmp_path, {"name": "ddp"}, steps=8, evalEvery=0)
    other = build_model(ModelSpec.model_validate({"gpt": {**cfg["model"]["gpt"], "nEmbd": 16}}))
    ucp.CheckpointEngine(str(tmp_path / "ckpt" / "test" / "tiny"), algorithm="ddp").save(4, other)
    result = train(write_config(tmp_path, cfg), "--nproc", "1")
    assert result.returncode == 1
    assert "model/" in result.stdout and "16" in result.stdout and "32" in result.stdout, result.stdout[-3000:]


def _poll(predicate, timeout_s=120.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return None


def _pod_env(tmp_path, status_port: int) -> dict:
    """The environment the operator gives a single-process worker pod, in the embedded cluster's style."""
    return {
        "LOCO_LOCAL_ROOT": str(tmp_path / "podroot"), "LOCO_STATUS_PORT": str(status_port),
        "POD_IP": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "LOCO_REPLICA_INDEX": "0", "LOCO_NUM_REPLICAS": "1", "LOCO_NPROC_PER_WORKER": "1",
        "LOCO_EPOCH": "3", "LOCO_JOB_NAME": "tiny", "LOCO_NAMESPACE": "test",
    }


def test_pod_serves_progress_and_metrics_while_training_and_writes_termination_message(tmp_path):
    cfg = tiny_config(tmp_path, {"name": "ddp"}, steps=30, logEvery=2, evalEvery=0)
    cfg["checkpoint"]["path"] = "/checkpoints"  # a container path: lands under LOCO_LOCAL_ROOT
    cfg["faultInjection"] = {"stepDelayS": 0.1}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loco_trainer", "--config", write_pod_config(tmp_path / "podroot", cfg)],
                            env={**os.environ, **_pod_env(tmp_path, port)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def running_report():
            body = _get(base + "/status")
            report = body and ProgressReport.model_validate_json(body)
            return report if report and report.state == WorkerState.running and report.step >= 2 else None

        report = _poll(running_report, what="a running report")
        assert report.job_name == "tiny" and report.epoch == 3 and report.total_steps == 30
        assert report.loss is not None and report.tokens_per_second > 0 and report.algorithm == "ddp"
        text = _get(base + "/metrics")
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert {"loco_trainer_step", "loco_trainer_loss", "loco_trainer_tokens_per_second",
                "loco_trainer_step_seconds_bucket"} <= names
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    final = ProgressReport.model_validate_json((tmp_path / "podroot" / "dev" / "termination-log").read_text())
    assert final.state == WorkerState.finished and final.step == 30 and final.eval_loss is not None
    assert final.last_checkpoint.step == 30
    assert os.path.isdir(tmp_path / "podroot" / "checkpoints" / "test" / "tiny" / "step-00000030")


def test_sigterm_stops_all_local_ranks_with_143(tmp_path):
    cfg = tiny_config(tmp_path, {"name": "ddp"}, steps=10_000, evalEvery=0)
    cfg["faultInjection"] = {"stepDelayS": 0.05}
    history = tmp_path / "h.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "loco_trainer", "--config", write_config(tmp_path, cfg),
                             "--nproc", "2", "--history", str(history)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _poll(lambda: history.exists() and history.stat().st_size > 0, what="the first step")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM" in out


def test_bad_config_in_a_pod_exits_2_and_reports_the_field(tmp_path):
    path = write_pod_config(tmp_path / "podroot", {"training": {"steps": -1}})
    result = train(path, env=_pod_env(tmp_path, free_port()))
    assert result.returncode == 2
    assert "training.steps" in result.stderr
    report = ProgressReport.model_validate_json((tmp_path / "podroot" / "dev" / "termination-log").read_text())
    assert report.state == WorkerState.failed and "training.steps" in report.message


def test_two_pods_rendezvous_through_the_hosts_file_and_bind_their_own_ips(tmp_path):
    """Like the embedded cluster: each pod has its own loopback IP, the same status port, and
    finds replica 0 by its DNS name in the LOCO_LOCAL_HOSTS file."""
    cfg = tiny_config(tmp_path, {"name": "ddp"}, steps=6, evalEvery=0, logEvery=2)
    cfg["checkpoint"]["path"] = "/checkpoints"
    hosts = tmp_path / "hosts"
    ips = ["127.0.77.2", "127.0.77.3"]
    hosts.write_text("".join(f"{ip} tiny-worker-{i}.tiny.test.svc tiny-worker-{i}.tiny\n" for i, ip in enumerate(ips)))
    status_port, master_port = free_port(), free_port()
    # another job's master on another IP of this host, same port: must not collide
    blocker = socket.socket()
    blocker.bind(("127.0.77.9", master_port))
    blocker.listen(1)
    shared = tmp_path / "pvc"
    procs = []
    for i, ip in enumerate(ips):
        root = tmp_path / f"pod{i}"
        (root / "checkpoints").parent.mkdir(parents=True)
        shared.mkdir(exist_ok=True)
        (root / "checkpoints").symlink_to(shared)  # the PVC both pods mount
        path = write_pod_config(root, cfg)  # the ConfigMap both pods mount
        env = {**_pod_env(tmp_path, status_port), "LOCO_LOCAL_ROOT": str(root), "POD_IP": ip,
               "LOCO_LOCAL_HOSTS": str(hosts), "MASTER_ADDR": "tiny-worker-0.tiny.test.svc",
               "MASTER_PORT": str(master_port), "LOCO_REPLICA_INDEX": str(i), "LOCO_NUM_REPLICAS": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "loco_trainer", "--config", path],
                                      env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=RUN_TIMEOUT_S)[0])
    finally:
        blocker.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert f"http://{ips[0]}:{status_port}/status" in outs[0] and f"http://{ips[1]}:{status_port}/status" in outs[1]
    for i in range(2):
        report = ProgressReport.model_validate_json((tmp_path / f"pod{i}" / "dev" / "termination-log").read_text())
        assert (report.state, report.replica_index, report.step) == (WorkerState.finished, i, 6)
    assert committed(shared / "test" / "tiny")[-1].layout.world_size == 2


def test_a_failing_local_rank_stops_the_pod_and_is_named_in_the_report(tmp_path):
    cfg = tiny_config(tmp_path, {"name": "ddp"}, steps=20, evalEvery=0)
    cfg["faultInjection"] = {"crashAtStep": 2, "exitCode": 9, "ranks": [1]}
    env = {**_pod_env(tmp_path, free_port()), "LOCO_NPROC_PER_WORKER": "2"}
    result = train(write_pod_config(tmp_path / "podroot", cfg), env=env)
    assert result.returncode == 9, result.stdout[-3000:]
    report = ProgressReport.model_validate_json((tmp_path / "podroot" / "dev" / "termination-log").read_text())
    assert report.state == WorkerState.failed and "local rank 1 exited with code 9" in report.message
