"""Live resizing in the trainer (docs/elastic.md, "Live resizing"), with real worker processes.

The test plays the operator: three DiLoCo (Streaming DiLoCo, CO2) pods (``python -m loco_trainer``, one process each, their
own progress endpoints) run with ``LOCO_LIVE_RESIZE=1``; pod 2 crashes; the test POSTs the new
membership to the survivors, which regroup and go on without restarting; then a fourth process
joins (``LOCO_JOIN=1``) and the survivors take it in at an outer-step boundary. Every process must
exit 0, the survivors being the same processes throughout, and the final checkpoint must hold the
same model on every replica, at the data position the resizes imply.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from loco_trainer.ucp.tools import consolidated_state, pick
from loco_contract.protocol import epoch_master_port

from dist_helpers import free_port_block

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240)]

STEPS, H, BATCH = 72, 8, 4
TOKEN = "test-membership-token"


def _config(tmp_path, algorithm: dict, crash_at: int = 12) -> str:
    config = {
        "jobName": "live", "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 200_000},
        "training": {"steps": STEPS, "batchSize": BATCH, "seqLen": 32, "lr": 3e-3, "warmupSteps": 2,
                     "logEvery": 4, "evalEvery": 0, "evalBatches": 1},
        "algorithm": algorithm,
        "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 16},
        # a slow trainer (all ranks), so the test can act between steps; rank 2 crashes at step crash_at
        "faultInjection": {"stepDelayS": 0.12, "crashAtStep": crash_at, "ranks": [2], "exitCode": 137},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _start(config: str, index: int, replicas: int, epoch: int, port: int, status_port: int, log_path, join=False):
    token_file = Path(config).parent / "membership-token"  # what the operator mounts from the job's Secret
    token_file.write_text(TOKEN)
    env = {**os.environ, "LOCO_REPLICA_INDEX": str(index), "LOCO_NUM_REPLICAS": str(replicas),
           "LOCO_MEMBERSHIP_TOKEN_FILE": str(token_file),
           "LOCO_EPOCH": str(epoch), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "LOCO_LIVE_RESIZE": "1", "LOCO_JOIN": "1" if join else "0",
           # what the operator sets for live jobs is 120 s: a survivor blocked in a point-to-point wait
           # (NoLoCo) is not woken by the group abort under gloo and recovers at this timeout
           "LOCO_COLLECTIVE_TIMEOUT_S": "30",
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "loco_trainer", "--config", config, "--status-port", str(status_port),
           "--status-host", "127.0.0.1", "--no-termination-message"]
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def _post(port: int, body: dict) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/membership", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait(predicate, timeout_s: float, what: str, procs=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() in (None, 0), f"a worker exited with {p.returncode} while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _tell(status: list[int], epoch: int, world: int, base: int, ranks=(0, 1)) -> list[int]:
    """POST each rank in ``ranks`` its place in ``epoch`` (the operator's job); returns the status codes."""
    return [_post(status[r], {"epoch": epoch, "rank": r, "worldSize": world, "masterAddr": "127.0.0.1",
                              "masterPort": epoch_master_port(base, epoch)}) for r in ranks]


def _shrunk_after_crash(tmp_path, algorithm: dict, crash_at: int = 12):
    """Three pods start; pod 2 crashes at step ``crash_at`` (injected); the survivors are told their
    place in epoch 1 and switch to it. Returns (config path, base port, status ports, log paths, processes)."""
    config = _config(tmp_path, algorithm, crash_at)
    # ports below the ephemeral range, which no outgoing connection or gloo listener takes in the
    # meantime: epochs 0..3 rendezvous on base and base + 2 .. base + 4; then the 4 pods' status ports
    # (the joiner binds its own half a minute after this pick)
    base = free_port_block(9)
    status = [base + 5 + i for i in range(4)]
    logs = [tmp_path / f"pod{i}.log" for i in range(4)]
    pods = [_start(config, i, 3, 0, base, status[i], logs[i]) for i in range(3)]
    try:
        assert pods[2].wait(timeout=120) == 137, logs[2].read_text()[-3000:]
        assert _tell(status, 1, 2, base) == [202, 202]
        # a stale or malformed update is refused with the reason
        assert _tell(status, 1, 2, base, ranks=(0,))[0] in (200, 409)
        assert _post(status[0], {"epoch": 9, "rank": 0, "worldSize": 0}) == 400
        _wait(lambda: all((_status(status[r]) or {}).get("epoch") == 1 for r in (0, 1)), 90, "the survivors in epoch 1",
              pods[:2])
    except BaseException:
        for p in pods:
            if p.poll() is None:
                p.kill()
        raise
    return config, base, status, logs, pods


@pytest.mark.parametrize("algorithm", [
    {"name": "diloco", "syncEvery": H},
    {"name": "streaming-diloco", "syncEvery": H, "fragments": 2, "overlapSteps": 1},
    {"name": "co2", "syncEvery": H},
    {"name": "noloco", "syncEvery": H},
], ids=["diloco", "streaming-diloco", "co2", "noloco"])
def test_survivors_keep_running_through_a_lost_worker_and_a_joiner(tmp_path, algorithm) -> None:
    # Streaming DiLoCo (P = 2, H = 8, τ = 1): the crash before step 18 fails the exchange merged at t = 20,
    # mid-round; the survivors drop it and train on to the boundary t = 24, where they regroup (a survivor
    # on which that exchange completed could not have stopped at 20). The others: the loss is noticed at
    # the round end t = 16.
    streaming = algorithm["name"] == "streaming-diloco"
    config, base, status, logs, pods = _shrunk_after_crash(tmp_path, algorithm, crash_at=18 if streaming else 12)
    try:
        step_at_shrink = min(_status(status[r])["step"] for r in (0, 1))
        assert step_at_shrink < STEPS - 2 * H, "the run ended before the test could grow it: slow it down"

        # a live grow: the joiner starts first (it waits at the epoch-2 rendezvous), then the survivors are told
        pods.append(_start(config, 2, 3, 2, epoch_master_port(base, 2), status[3], logs[3], join=True))
        _wait(lambda: _status(status[3]), 90, "the joiner's progress endpoint", pods[:2] + pods[3:])
        assert _tell(status, 2, 3, base) == [202, 202]
        for i in (0, 1, 3):
            assert pods[i].wait(timeout=180) == 0, logs[i].read_text()[-4000:]
    finally:
        for p in pods:
            if p.poll() is None:
                p.kill()

    text0 = logs[0].read_text()
    # the survivors never restarted: one process each, one "training ..." start line, two regroups
    assert text0.count("training gpt:") == 1, text0[-3000:]
    shrink = re.search(r"membership epoch 1: 2 workers, continuing at step (\d+) \(after a lost peer", text0)
    grow = re.search(r"membership epoch 2: 3 workers, continuing at step (\d+) \(planned", text0)
    assert shrink and grow, text0[-4000:]
    s1, s2 = int(shrink.group(1)), int(grow.group(1))
    assert 12 <= s1 < s2 < STEPS
    if streaming:
        assert s1 == 24 and "a peer was lost at step 20" in text0, text0[-4000:]

    # the final checkpoint: every replica holds the same model (the joiner adopted the global state
    # and every rank ends on the global parameters; NoLoCo's replicas differ by design, but stay close:
    # the joiner adopted a survivor's and gossip keeps pulling them together), at the data position
    # the sizes imply
    state = consolidated_state(*pick(str(tmp_path / "ckpt" / "test" / "live")))
    assert state["step"] == STEPS and state["layout"]["numReplicas"] == 3, state["layout"]
    assert sorted(state["replicas"]) == [1, 2]
    for name, tensor in state["model"].items():
        for r in (1, 2):
            other = state["replicas"][r]["model"][name]
            if algorithm["name"] == "noloco":
                assert torch.isfinite(other).all() and (other - tensor).norm() <= 0.1 * tensor.norm() + 1e-3, (name, r)
            else:
                assert torch.equal(tensor, other), (name, r)
    # steps [0, s1) at 3 workers, [s1, s2) at 2, [s2, STEPS) at 3: nothing skipped or repeated in the stream
    assert state["extra_state"]["data"]["sequences"] == BATCH * (3 * s1 + 2 * (s2 - s1) + 3 * (STEPS - s2))


def test_survivors_leave_a_rendezvous_that_cannot_complete_for_a_newer_membership(tmp_path) -> None:
    """A joiner dies before it reaches the rendezvous of its epoch; the survivors, told of that epoch,
    wait there for it. The operator's next update (the survivors alone) must take them out of that
    rendezvous into the new one, and the run must finish without a restart."""
    _, base, status, logs, pods = _shrunk_after_crash(tmp_path, {"name": "diloco", "syncEvery": H})
    try:
        # epoch 2 announces a joiner that never comes (its process is killed before it rendezvouses)
        assert _tell(status, 2, 3, base) == [202, 202]
        # (not any "waiting": the crash before epoch 1 logged one already, and telling epoch 3 before
        # the survivors reach epoch 2's rendezvous lets them skip epoch 2 at their next boundary)
        # (nor the epoch-0 rendezvous line, also "rank 0/3": the epoch-2 one names epoch 2's port)
        port2 = f":{epoch_master_port(base, 2)} via"
        _wait(lambda: any("rendezvous: rank 0/3" in line and port2 in line
                          for line in logs[0].read_text().splitlines()), 60,
              "the survivors at the epoch-2 rendezvous", pods[:2])
        time.sleep(1.0)
        assert _tell(status, 3, 2, base) == [202, 202]
        for i in (0, 1):
            assert pods[i].wait(timeout=180) == 0, logs[i].read_text()[-4000:]
    finally:
        for p in pods:
            if p.poll() is None:
                p.kill()
    text0 = logs[0].read_text()
    assert "membership epoch 3 arrived while joining epoch 2" in text0, text0[-3000:]
    assert re.search(r"membership epoch 3: 2 workers, continuing at step \d+", text0), text0[-3000:]
    assert text0.count("training gpt:") == 1
