"""``bench/gpu_checks.py``, the one command a lent GPU machine runs: its smoke configs must stay valid
trainer configs (a renamed field would otherwise surface only on the GPU, costing device time), and its
smoke check must tell a run that resumed from its checkpoint from one that did not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import gpu_checks as gc  # noqa: E402
from loco_contract.config import TrainerConfig  # noqa: E402


@pytest.mark.parametrize("algorithm", gc.ALGORITHMS)
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_smoke_config_is_a_valid_trainer_config(algorithm: str, device: str, tmp_path: Path) -> None:
    cfg = TrainerConfig.model_validate(gc.smoke_config(algorithm, device, 30, tmp_path))
    assert cfg.algorithm.name.value == algorithm
    assert cfg.training.steps == 30 and cfg.checkpoint.every_steps == 10
    assert cfg.training.dtype == ("bfloat16" if device == "cuda" else "float32")


def test_the_smoke_check_passes_a_resumed_run_and_fails_one_that_started_over(tmp_path: Path, monkeypatch) -> None:
    def fake_run(first_step: int):
        def run(config, workdir, name, timeout_s):
            steps = config["training"]["steps"]
            start = 1 if name.endswith("-1") else first_step
            records = [{"step": s, "loss": 3.0, "wallS": 0.1 * s} for s in range(start, steps + 1)]
            return {"code": 0, "wall_s": 1.0, "records": records + [{"step": steps, "evalLoss": 2.5, "final": True}],
                    "tail": ""}
        return run

    monkeypatch.setattr(gc, "run_trainer", fake_run(31))
    assert gc.smoke("diloco", "cpu", tmp_path)["ok"]
    monkeypatch.setattr(gc, "run_trainer", fake_run(1))
    row = gc.smoke("diloco", "cpu", tmp_path)
    assert not row["ok"] and "did not start at step 31" in row["why"]


def test_the_benchmarks_and_cuda_are_refused_without_a_gpu(monkeypatch, capsys) -> None:
    monkeypatch.setattr(gc, "machine", lambda: {"torch": "2.13.0+cpu", "python": "3.11", "cuda": False})
    with pytest.raises(SystemExit):
        gc.main(["--device", "cpu", "--skip-smoke"])
    assert "the benchmarks need a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gc.main(["--device", "cuda"])
    assert "torch sees no GPU" in capsys.readouterr().err
