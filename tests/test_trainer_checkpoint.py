"""The training loop on the universal checkpoint: commit, latest, keep, cleaning, ``loco ckpt ls``,
and a failed background save (reported in the progress report and a metric, never committed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from click.testing import CliRunner

from loco_trainer.ckpt_cli import ckpt as ckpt_cli
from loco_contract.config import RuntimeEnv, TrainerConfig
from loco_contract.protocol import ProgressReport, WorkerState


def tiny(tmp_path, steps: int = 6, keep: int = 2) -> dict:
    return {
        "jobName": "tiny", "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 50_000},
        "training": {"steps": steps, "batchSize": 2, "seqLen": 32, "warmupSteps": 1, "logEvery": 2, "evalEvery": 0,
                     "evalBatches": 1},
        "algorithm": {"name": "ddp"},
        "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 2, "keep": keep},
    }


def test_loop_commits_universal_checkpoints_keeps_the_newest_and_cleans_incomplete(tmp_path):
    job = tmp_path / "ckpt" / "test" / "tiny"
    (job / ".tmp-step-00000099" / "data").mkdir(parents=True)  # a save a crash interrupted
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path)))
    result = subprocess.run([sys.executable, "-m", "loco_trainer", "--config", str(path), "--nproc", "1"],
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(os.listdir(job)) == ["fence", "latest", "step-00000004", "step-00000006"]  # keep=2, .tmp removed
    assert (job / "latest").read_text().strip() == "step-00000006"
    assert sorted(os.listdir(job / "step-00000006")) == ["data", "index", "manifest.json"]
    manifest = json.loads((job / "step-00000006" / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["algorithm"] == "ddp"
    assert manifest["extra"]["data"] == {"sequences": 12}  # 6 steps x 2 sequences: the data position

    out = CliRunner().invoke(ckpt_cli, ["ls", str(job), "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["checkpoints"]
    assert [(r["step"], r["worldSize"], r["algorithm"]) for r in rows] == [(4, 1, "ddp"), (6, 1, "ddp")]
    assert all(r["bytes"] > 0 for r in rows)
    table = CliRunner().invoke(ckpt_cli, ["ls", str(job)])
    assert "step-00000006" in table.output and "1x1" in table.output


def test_failed_background_save_is_reported_and_never_committed(tmp_path, monkeypatch):
    """Step 2's background write fails: the run goes on, the pod's report and the metric say so, no
    step-2 directory (complete or temporary) exists, and the later saves commit."""
    from loco_trainer import ucp
    from loco_trainer.metrics import TrainerMetrics
    from loco_trainer.progress import ProgressState
    from loco_trainer.rendezvous import RankInfo
    from loco_trainer.train import Trainer

    real_write = ucp.CheckpointEngine._write_local

    def failing_write(self, tmp, staged):
        if staged.step == 2:
            raise OSError(28, "No space left on device")
        return real_write(self, tmp, staged)

    monkeypatch.setattr(ucp.CheckpointEngine, "_write_local", failing_write)
    config = TrainerConfig.model_validate(tiny(tmp_path, steps=4, keep=3))
    env = RuntimeEnv.from_environ({}).model_copy(update={"job_name": "tiny", "namespace": "test"})
    progress = ProgressState(ProgressReport(job_name="tiny", namespace="test", replica_index=0, state=WorkerState.starting))
    metrics = TrainerMetrics("tiny", "test", 0, 0)
    import torch

    result = Trainer(config, env, RankInfo(0, 0, 1, 0, 1), torch.device("cpu"), progress=progress, metrics=metrics).run()
    report = progress.snapshot()
    assert report.checkpoint_failures == 1
    assert "step 2" in report.checkpoint_error and "No space left on device" in report.checkpoint_error
    assert report.last_checkpoint.step == 4 and result.last_checkpoint.step == 4
    job = tmp_path / "ckpt" / "test" / "tiny"
    assert sorted(os.listdir(job)) == ["fence", "latest", "step-00000004"]
    text = metrics.render().decode()
    assert 'loco_checkpoint_saves_total{outcome="failed"} 1.0' in text
    assert 'loco_checkpoint_saves_total{outcome="committed"} 1.0' in text


def _run(config: dict, tmp_path, name: str, nproc: int, **env: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "loco_trainer", "--config", str(path), "--nproc", str(nproc)],
                          capture_output=True, text=True, timeout=150, env={**os.environ, **env})


def test_init_from_starts_from_another_jobs_checkpoint_at_another_size_and_algorithm_and_leaves_it_untouched(tmp_path):
    """checkpoint.initFrom (LOCO_INIT_FROM): DDP on 2 ranks saves; a DiLoCo job on 1 rank starts from its step-4
    checkpoint (model, optimizer, data position, step) and trains on in its own directory; the source is only read.
    A source that is not there is a configuration error (exit 2) naming the field, never a fresh start."""
    source = {**tiny(tmp_path, steps=6, keep=3), "jobName": "source"}
    result = _run(source, tmp_path, "source", 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    src_dir = tmp_path / "ckpt" / "test" / "source"
    before = {p: p.stat().st_mtime_ns for p in src_dir.rglob("*")}

    branch = {**tiny(tmp_path, steps=8), "jobName": "branch", "algorithm": {"name": "diloco", "syncEvery": 2}}
    result = _run(branch, tmp_path, "branch", 1, LOCO_INIT_FROM=str(src_dir / "step-00000004"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checkpoint.initFrom" in result.stderr + result.stdout
    dst_dir = tmp_path / "ckpt" / "test" / "branch"
    assert (dst_dir / "latest").read_text().strip() == "step-00000008"
    assert not (dst_dir / "step-00000002").exists()  # it started at step 4: its first save is step 6
    manifest = json.loads((dst_dir / "step-00000006" / "manifest.json").read_text())
    # the source's data position (4 steps x 2 ranks x 2 sequences) and 2 more steps of the same global batch (the
    # batch rule keeps the reference world the source saved at)
    assert manifest["algorithm"] == "diloco" and manifest["extra"]["data"] == {"sequences": 20}
    assert {p: p.stat().st_mtime_ns for p in src_dir.rglob("*")} == before  # read only

    missing = _run({**branch, "jobName": "typo"}, tmp_path, "typo", 1, LOCO_INIT_FROM=str(src_dir / "step-00000099"))
    assert missing.returncode == 2, missing.stdout[-3000:] + missing.stderr[-3000:]
    assert "spec.checkpoint.initFrom: cannot start from" in missing.stdout + missing.stderr
    assert not (tmp_path / "ckpt" / "test" / "typo" / "latest").exists()
