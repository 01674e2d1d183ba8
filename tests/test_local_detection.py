"""Fault detection without the operator (issue 29 #4): the local launcher (``--nproc``) runs the detector over
its own ranks. A rank frozen from outside with SIGSTOP (the operating system's fault, not the trainer's own
injection) is blamed live, the run stops with 75 when asked to, and ``loco diagnose`` on the launcher's trace
blames the same rank; a clean run gets no verdict."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from click.testing import CliRunner

from loco_detector.cli import diagnose
from loco_local.os_faults import StopCycler, cpu_cap, cpu_cap_unavailable, stop_launcher
from loco_trainer.launcher import EXIT_FAULT

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240)]

#: the detector's settings for these runs: a short hang floor so the test is quick (the default is 10 s)
DETECTOR = {"hangTimeoutFloorSeconds": 3.0, "warmupHangTimeoutSeconds": 60.0, "minLatenessSeconds": 0.8,
            "minLinkExcessSeconds": 0.1}


def config(tmp_path, steps: int, every: int = 1_000_000, algorithm: dict | None = None) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "jobName": "local", "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 200_000},
        "training": {"steps": steps, "batchSize": 4, "seqLen": 32, "lr": 3e-3, "warmupSteps": 2, "logEvery": 4,
                     "evalEvery": 1_000_000, "evalBatches": 1},
        "algorithm": algorithm or {"name": "ddp"},
        "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": every},
    }))
    return str(path)


def launch(tmp_path, steps: int, *args: str, every: int = 1_000_000, nproc: int = 2, algorithm: dict | None = None,
           detector: dict | None = None) -> subprocess.Popen:
    settings = tmp_path / "detector.yaml"
    settings.write_text(yaml.safe_dump(detector or DETECTOR))
    cmd = [sys.executable, "-m", "loco_trainer", "--config", config(tmp_path, steps, every, algorithm), "--nproc",
           str(nproc), "--history", str(tmp_path / "history.jsonl"), "--detector-config", str(settings),
           "--fault-trace", str(tmp_path / "trace.jsonl"), *args]
    return subprocess.Popen(cmd, stdout=open(tmp_path / "launcher.log", "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})


def steps_done(tmp_path) -> int:
    path = tmp_path / "history.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()), default=0)


def rank_process(launcher: subprocess.Popen, replica: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("LOCO_REPLICA_INDEX") == str(replica):
            return child
    raise AssertionError(f"no child process for replica {replica}")


def freeze_rank_1_when_running(tmp_path, launcher: subprocess.Popen, min_steps: int, timeout_s: float
                               ) -> tuple[int, float]:
    """Wait for ``min_steps`` and a few polling rounds (the detector's warm-up behind it), SIGSTOP rank 1, wait
    for the launcher; returns its exit code and the seconds from the freeze to its exit. Kills what is left."""
    try:
        deadline = time.monotonic() + 120
        while steps_done(tmp_path) < min_steps:
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.3)
        time.sleep(5)
        rank_process(launcher, 1).send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        code = launcher.wait(timeout=timeout_s)
        return code, time.monotonic() - frozen_at
    finally:
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()


def test_a_rank_stopped_with_sigstop_is_blamed_live_and_the_run_stops(tmp_path):
    launcher = launch(tmp_path, 1_000_000, "--on-fault", "stop")
    code, stopped_after = freeze_rank_1_when_running(tmp_path, launcher, 40, timeout_s=90)
    log = (tmp_path / "launcher.log").read_text()
    assert code == EXIT_FAULT, log[-3000:]
    verdicts = [line for line in log.splitlines() if "fault detector:" in line and "evidence" in line]
    assert verdicts and "hang" in verdicts[0] and "ranks [1]" in verdicts[0], log[-3000:]
    # the floor (3 s) plus a poll round and the stop: well inside the hang floor of a default job (10 s) twice
    assert stopped_after < 20, stopped_after

    # offline, with the same settings, the trace says the same
    result = CliRunner().invoke(diagnose, [str(tmp_path / "trace.jsonl"), "--json", "--config", str(tmp_path / "detector.yaml")])
    assert result.exit_code == 3, result.output  # verdicts found
    replayed = json.loads(result.output)["verdicts"]
    assert replayed and replayed[0]["kind"].startswith("hang") and replayed[0]["ranks"] == [1], replayed


def first_verdict_while_slowed(tmp_path, slow_down) -> list[str]:
    """Three DiLoCo ranks (an outer all-reduce every 10 steps waits for the slowed rank's share of them); once
    they run, ``slow_down(rank 1's process)`` (a context manager) until the first verdict (or 60 s); returns the
    verdict lines. Stops the run."""
    launcher = launch(tmp_path, 1_000_000, nproc=3, algorithm={"name": "diloco", "syncEvery": 10},
                      detector={**DETECTOR, "minLatenessSeconds": 0.15})  # on a fault: report; the run goes on
    verdicts: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while steps_done(tmp_path) < 40:
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.3)
        time.sleep(5)
        with slow_down(rank_process(launcher, 1)):
            began = time.monotonic()
            while not verdicts and time.monotonic() - began < 60:
                time.sleep(0.5)
                verdicts = [line for line in (tmp_path / "launcher.log").read_text().splitlines()
                            if "fault detector:" in line and "evidence" in line]
    finally:
        stop_launcher(launcher)
    assert verdicts, (tmp_path / "launcher.log").read_text()[-3000:]
    return verdicts


def test_a_rank_cycled_through_sigstop_and_sigcont_is_blamed_as_a_straggler(tmp_path):
    """The operating system's straggler: rank 1 of 3 frozen 0.4 s out of every 0.6 s. The detector must call it
    slow (slow-noncomm) and name rank 1 alone, not hung (each stop is far shorter than the 3 s floor). Three
    ranks: with two, both are equally far from their median, and lateness by MAD cannot say which one is late."""
    verdicts = first_verdict_while_slowed(tmp_path, lambda proc: StopCycler([proc], stop_s=0.4, run_s=0.2))
    assert "[slow-noncomm, ranks [1]]" in verdicts[0], verdicts


@pytest.mark.skipif(bool(cpu_cap_unavailable()), reason=f"no CPU-share cap here: {cpu_cap_unavailable()}")
def test_a_rank_capped_to_a_sliver_of_a_core_is_blamed_as_a_straggler(tmp_path):
    """A slow machine, made by the kernel: rank 1's process gets a cgroup CPU quota of 2% of one core. It is slow in
    everything, its share of each transfer too, so the first verdict names it as a straggler or as one end of a slow
    connection (docs/fault-detection.md, Limits: 1 of 3 benchmark trials); either way, slow and rank 1."""
    verdicts = first_verdict_while_slowed(tmp_path, lambda proc: cpu_cap([proc.pid], 0.02))
    assert ("[slow-noncomm, ranks [1]]" in verdicts[0] or re.search(r"\[slow-comm-(link|node), ranks \[(1, \d|\d, 1)\]\]",
                                                                 verdicts[0])), verdicts


def test_on_fault_restart_restarts_every_rank_from_the_last_checkpoint_and_the_run_finishes(tmp_path):
    """What the operator does with a hang verdict, without it: every rank again, in a new epoch, from the newest
    committed checkpoint; the run then finishes."""
    launcher = launch(tmp_path, 2000, "--on-fault", "restart", "--max-restarts", "1", every=50)
    code, _ = freeze_rank_1_when_running(tmp_path, launcher, 60, timeout_s=180)  # a checkpoint at 50 by then
    log = (tmp_path / "launcher.log").read_text()
    assert code == 0, log[-3000:]
    assert "restarting every rank from the last checkpoint (restart 1/1, epoch 1)" in log, log[-3000:]
    assert "resuming from" in log and steps_done(tmp_path) == 2000, log[-3000:]
    assert (tmp_path / "trace.jsonl").exists() and (tmp_path / "trace.restart-1.jsonl").exists()


def test_a_clean_local_run_gets_no_verdict(tmp_path):
    launcher = launch(tmp_path, 1500, "--on-fault", "stop")  # long enough for several polling rounds
    code = launcher.wait(timeout=180)
    log = (tmp_path / "launcher.log").read_text()
    assert code == 0, log[-3000:]
    assert "fault detector: watching 2 pods" in log
    assert not [line for line in log.splitlines() if "fault detector:" in line and "evidence" in line], log[-3000:]
    result = CliRunner().invoke(diagnose, [str(tmp_path / "trace.jsonl"), "--json", "--config", str(tmp_path / "detector.yaml")])
    assert result.exit_code == 0 and json.loads(result.output)["records"] > 0, result.output
