"""A worker blocked in rendezvous stops promptly on SIGTERM (issue 4).

The operator deletes every pod of a job for a restart or resize; a rank still waiting in
``init_process_group`` for peers that will never come must exit with 143 right away, not sit in
C++ until the kubelet's grace period kills it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from loco_trainer.interruptible import Terminated, call_interruptibly, raise_terminated
from loco_trainer.launcher import EXIT_SIGTERM
from loco_contract.protocol import ProgressReport, WorkerState
from loco_trainer.rendezvous import RendezvousError

pytestmark = pytest.mark.timeout(120)

#: how long a blocked rank may take to stop after SIGTERM (the kubelet would wait 30 s)
STOP_WITHIN_S = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def testcall_interruptibly_returns_the_value_and_reraises_the_threads_error_unchanged():
    assert call_interruptibly(lambda a, b: a + b, 2, 3) == 5
    cause = OSError("connection refused")

    def fail():
        raise RendezvousError("rank 1: joining the process group at 10.0.0.1:29500 failed") from cause

    with pytest.raises(RendezvousError, match=r"^rank 1: joining the process group at 10.0.0.1:29500 failed$") as info:
        call_interruptibly(fail)
    assert info.value.__cause__ is cause


def test_sigterm_interrupts_the_main_thread_while_the_call_blocks():
    never = threading.Event()
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with pytest.raises(Terminated):
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            call_interruptibly(never.wait, 60)  # a call that would block for a minute
    finally:
        signal.signal(signal.SIGTERM, previous)
        never.set()  # let the abandoned thread end


def test_rank_waiting_in_rendezvous_for_a_missing_peer_exits_143_promptly_on_sigterm(tmp_path):
    root = tmp_path / "podroot"
    (root / "etc" / "loco").mkdir(parents=True)
    (root / "etc" / "loco" / "config.yaml").write_text(yaml.safe_dump({"jobName": "tiny", "namespace": "test"}))
    master_port = _free_port()
    # replica 0 of 2, as the operator starts it; replica 1 never comes, so rank 0 waits in its TCP
    # store (C++) for the peer until the rendezvous timeout (minutes)
    env = {
        "LOCO_LOCAL_ROOT": str(root), "LOCO_STATUS_PORT": "-1", "POD_IP": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "LOCO_REPLICA_INDEX": "0",
        "LOCO_NUM_REPLICAS": "2", "LOCO_NPROC_PER_WORKER": "1", "LOCO_JOB_NAME": "tiny",
        "LOCO_NAMESPACE": "test", "LOCO_EPOCH": "1",
    }
    proc = subprocess.Popen([sys.executable, "-m", "loco_trainer", "--config", "/etc/loco/config.yaml"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # rank 0 listens on MASTER_PORT right before it enters the blocking store constructor
        deadline = time.monotonic() + 90
        while not _accepts_connections(master_port):
            assert proc.poll() is None, f"rank exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "rank 0 never started listening on MASTER_PORT"
            time.sleep(0.1)
        time.sleep(0.5)  # only so the signal lands while the store blocks; the fix does not need it
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank still running {STOP_WITHIN_S:.0f}s after SIGTERM (blocked in rendezvous)")
        took_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_SIGTERM, out[-3000:]
    assert "SIGTERM" in out and took_s < STOP_WITHIN_S
    report = ProgressReport.model_validate_json((root / "dev" / "termination-log").read_text())
    assert report.state == WorkerState.failed and "SIGTERM" in report.message
