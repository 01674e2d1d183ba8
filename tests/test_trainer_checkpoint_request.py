"""``POST /checkpoint`` (the operator is about to stop the workers: a suspend, a Kueue eviction), with real worker
processes. The test plays the operator: two DDP pods (``python -m loco_trainer``, their own progress endpoints) train
with no periodic checkpoint; only pod 1 is asked; both save at the same step (the ranks agree at a ``logEvery``
boundary), a checkpoint the operator can wait for, and training goes on to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from dist_helpers import free_port_block

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240)]

STEPS, LOG_EVERY = 60, 4
TOKEN = "test-membership-token"


def _start(config: Path, index: int, port: int, status_port: int, log_path: Path) -> subprocess.Popen:
    token_file = config.parent / "membership-token"
    token_file.write_text(TOKEN)
    env = {**os.environ, "LOCO_REPLICA_INDEX": str(index), "LOCO_NUM_REPLICAS": "2",
           "LOCO_MEMBERSHIP_TOKEN_FILE": str(token_file), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "loco_trainer", "--config", str(config), "--status-port", str(status_port),
           "--status-host", "127.0.0.1", "--no-termination-message"]
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _status(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return {}


def _post(port: int, body: bytes, token: str = TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/checkpoint", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait(predicate, timeout_s: float, what: str, procs, logs):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p, log in zip(procs, logs):
            assert p.poll() in (None, 0), f"a worker exited with {p.returncode} waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_one_asked_worker_makes_every_rank_save_at_the_same_step_and_training_goes_on(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "jobName": "asked", "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 100_000},
        "training": {"steps": STEPS, "batchSize": 4, "seqLen": 32, "warmupSteps": 2, "logEvery": LOG_EVERY,
                     "evalEvery": 0, "evalBatches": 1},
        "algorithm": {"name": "ddp"},
        "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 0, "keep": 5},  # only the final one, unasked
        "faultInjection": {"stepDelayS": 0.1},
    }))
    base = free_port_block(3)
    status = [base + 1, base + 2]
    logs = [tmp_path / f"pod{i}.log" for i in range(2)]
    pods = [_start(config, i, base, status[i], logs[i]) for i in range(2)]
    try:
        _wait(lambda: _status(status[0]).get("step", 0) >= 6, 120, "training under way", pods, logs)
        # the token and the body are checked before anything is held
        assert _post(status[1], b'{"id": "stop-1"}', token="wrong")[0] == 401
        code, answer = _post(status[1], b'{"reason": "runPolicy.suspend"}')
        assert code == 400 and "id" in answer["error"], answer
        assert _post(status[1], json.dumps({"id": "stop-1", "reason": "runPolicy.suspend"}).encode())[0] == 202
        assert _post(status[1], json.dumps({"id": "stop-1", "reason": "runPolicy.suspend"}).encode())[0] == 200
        # pod 0 was never asked, yet it commits the same checkpoint: the ranks agreed on one step
        saved = _wait(lambda: (_status(status[0]).get("lastCheckpoint") or {}).get("step"), 60,
                      "the asked-for checkpoint", pods, logs)
        assert saved % LOG_EVERY == 0 and 6 < saved < STEPS, saved
        assert all(p.wait(timeout=150) == 0 for p in pods), [log.read_text()[-2000:] for log in logs]
    finally:
        for p in pods:
            if p.poll() is None:
                p.kill()
    job = tmp_path / "ckpt" / "test" / "asked"
    assert sorted(d for d in os.listdir(job) if d.startswith("step-")) == [f"step-{saved:08d}", f"step-{STEPS:08d}"]
    manifest = json.loads((job / f"step-{saved:08d}" / "manifest.json").read_text())
    assert manifest["step"] == saved and sorted(manifest["rankStates"]) == ["0", "1"], manifest  # both ranks saved
    assert f"saving at step {saved}: the operator asked for a checkpoint" in logs[0].read_text()
    assert f"saving at step {saved}: the operator asked for a checkpoint (runPolicy.suspend)" in logs[1].read_text()
