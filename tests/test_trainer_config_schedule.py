"""Config loading (errors name the field), overrides, the lr schedule, fault decisions."""

from __future__ import annotations

import json

import pytest

from loco_contract.config import FaultInjection, TrainingSpec
from loco_trainer.faults import crash_step
from loco_trainer.launcher import ConfigError, apply_overrides, load_config
from loco_trainer.train import global_batch_size, lr_at, format_progress_line


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    tr = TrainingSpec(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, tr) == pytest.approx(0.1)
    assert lr_at(4, tr) == pytest.approx(0.5)
    assert lr_at(9, tr) == pytest.approx(1.0)
    assert lr_at(10, tr) == pytest.approx(1.0)
    assert lr_at(60, tr) == pytest.approx(0.55)  # half-way through the cosine: the midpoint
    assert lr_at(109, tr) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(500, tr) == pytest.approx(0.1)
    values = [lr_at(s, tr) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_a_part_of_a_longer_run_continues_the_runs_schedule():
    """scheduleSteps: a job ending at step 40 of a 110-step run (a Population round) decays like the whole run."""
    whole = TrainingSpec(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    part = TrainingSpec(steps=40, schedule_steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    alone = TrainingSpec(steps=40, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert [lr_at(s, part) for s in range(40)] == [lr_at(s, whole) for s in range(40)]
    assert lr_at(39, alone) == pytest.approx(0.1, abs=1e-2)  # without it the part decays to the floor
    assert lr_at(39, part) > 0.7


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, TrainingSpec(steps=10, warmup_steps=0, lr=0.5)) == pytest.approx(0.5)


def test_yaml_and_json_configs_load(tmp_path):
    (tmp_path / "c.yaml").write_text("jobName: j\ntraining: {steps: 7, seqLen: 16}\nalgorithm: {name: ddp}\n")
    (tmp_path / "c.json").write_text(json.dumps({"jobName": "j", "training": {"steps": 7}}))
    assert load_config(str(tmp_path / "c.yaml")).training.seq_len == 16
    assert load_config(str(tmp_path / "c.json")).training.steps == 7


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("training: {steps: 0}", ["training.steps", "greater than or equal to 1", "got 0"]),
        ("training: {seqLen: 512}\nmodel: {gpt: {blockSize: 64}}", ["seqLen (512) exceeds model.gpt.blockSize"]),
        ("training: {stpes: 3}", ["training.stpes", "Extra inputs are not permitted"]),
        ("algorithm: {name: ddp, syncEvery: 5}", ["algorithm", "'syncEvery' does not apply to algorithm 'ddp'"]),
        ("[1, 2]", ["must hold a mapping"]),
        ("training: {steps: [", ["neither JSON nor YAML"]),
    ],
)
def test_config_errors_name_the_field_and_file(tmp_path, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_config_file_says_how_to_pass_one(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(str(tmp_path / "nope.json"))


def test_overrides_accept_both_spellings_and_parse_values():
    wire = {"training": {"seqLen": 64, "steps": 5}}
    out = apply_overrides(wire, ["training.seq_len=32", "training.steps=10", "faultInjection.ranks=[1, 2]"])
    assert out == {"training": {"seqLen": 32, "steps": 10}, "faultInjection": {"ranks": [1, 2]}}
    assert wire["training"]["seqLen"] == 64  # input untouched
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(wire, ["training.steps"])


def test_override_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("jobName: j\n")
    with pytest.raises(ConfigError, match="training.lr"):
        load_config(str(path), ["training.lr=-1"])


def test_crash_applies_to_listed_ranks_on_the_first_attempt_only():
    fault = FaultInjection(crash_at_step=5, ranks=[1])
    assert crash_step(fault, rank=1, restart_count=0) == 5
    assert crash_step(fault, rank=0, restart_count=0) is None
    assert crash_step(fault, rank=1, restart_count=1) is None
    assert crash_step(FaultInjection(crash_at_step=5, only_first_attempt=False), rank=3, restart_count=2) == 5
    assert crash_step(None, 0, 0) is None


def test_global_batch_follows_the_batch_rule():
    assert global_batch_size(TrainingSpec(batch_size=4), world_size=3, reference_world_size=2) == 12
    keep_global = TrainingSpec(batch_size=4, batch_rule="keepGlobalBatch")
    assert global_batch_size(keep_global, world_size=3, reference_world_size=2) == 8


def test_progress_line_format():
    assert format_progress_line(40, 200, 2.34561, 2.4, 12345.4, 55.2) == (
        "step 40/200 | loss 2.3456 | eval 2.4000 | 12,345 tok/s | 55 ms/step"
    )
