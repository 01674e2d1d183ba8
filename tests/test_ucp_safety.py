"""Universal checkpoint safety: a corrupt newest checkpoint is skipped on resume (findings 10), the commit
survives a kill -9 at every step (11), fragment file names cannot leave the checkpoint (12), and a DCP
import never unpickles code (13)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from loco_trainer.ckpt_cli import ckpt
from loco_trainer.ucp import CheckpointEngine, FormatError, Reason, Storage, load_into, read_info, tools
from loco_trainer.ucp.format import step_dir_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def saved_steps(tmp_path, steps=(1, 2, 3), events=None) -> CheckpointEngine:
    engine = CheckpointEngine(str(tmp_path), keep=5, on_event=(lambda r, m: events.append((r, m))) if events is not None else None)
    for step in steps:
        engine.save(step, make_model(step))
    return engine


def weight_file(tmp_path, step: int):
    info = read_info(Storage(str(tmp_path)), step_dir_name(step))
    atoms = info.manifest.atoms
    atom = atoms.get("model/0.weight") or max(atoms.values(), key=lambda a: a.nbytes)  # the GPT has other names
    frag = atom.fragments[0]
    return tmp_path / info.dir / frag.file, frag


# ------------------------------------------------------------------ 10: fall back past a corrupt newest


def flip_byte(tmp_path, step: int) -> None:
    path, frag = weight_file(tmp_path, step)
    raw = bytearray(path.read_bytes())
    raw[frag.byte_offset + 3] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(tmp_path, step: int) -> None:
    path, _ = weight_file(tmp_path, step)
    path.write_bytes(path.read_bytes()[:-7])


def remove_data(tmp_path, step: int) -> None:
    path, _ = weight_file(tmp_path, step)
    path.unlink()


def flip_header_byte(tmp_path, step: int) -> None:
    """A byte of the safetensors header flipped: the fragments' bytes and crc32s are untouched (issue 29)."""
    path, _ = weight_file(tmp_path, step)
    raw = bytearray(path.read_bytes())
    raw[8 + 5] ^= 0xFF
    path.write_bytes(bytes(raw))


def retype_in_header(tmp_path, step: int) -> None:
    """The header still parses but says float16 where the manifest (and the bytes) say float32."""
    path, _ = weight_file(tmp_path, step)
    raw = path.read_bytes()
    assert b'"F32"' in raw[:200]
    path.write_bytes(raw.replace(b'"F32"', b'"F16"', 1))


def break_manifest(tmp_path, step: int) -> None:
    (tmp_path / step_dir_name(step) / "manifest.json").write_text('{"format": "loco-ucp", "formatVersion": 1, "st')


@pytest.mark.parametrize("damage, reason", [(flip_byte, "checksum"), (truncate, "size"), (remove_data, "missing_file"),
                                            (break_manifest, "manifest"), (flip_header_byte, "header"),
                                            (retype_in_header, "header")])
def test_resume_skips_a_corrupt_newest_checkpoint_and_names_it(tmp_path, damage, reason):
    events: list[tuple[str, str]] = []
    engine = saved_steps(tmp_path, events=events)
    damage(tmp_path, 3)
    selection = engine.newest_valid()
    assert selection.info is not None and selection.info.step == 2
    assert [(s.step, s.dir, s.reason) for s in selection.skipped] == [(3, step_dir_name(3), reason)]
    assert step_dir_name(3) in selection.skipped[0].message
    skipped_events = [m for r, m in events if r == Reason.SKIPPED]
    assert len(skipped_events) == 1 and step_dir_name(3) in skipped_events[0] and reason in skipped_events[0]
    model = make_model(9)
    load_into(engine.storage, selection.info, model, None)  # the chosen one loads
    assert torch.equal(model[0].weight, make_model(2)[0].weight)


def test_resume_walks_past_several_bad_checkpoints_and_returns_none_when_all_are_bad(tmp_path):
    engine = saved_steps(tmp_path)
    flip_byte(tmp_path, 3)
    remove_data(tmp_path, 2)
    selection = engine.newest_valid()
    assert selection.info.step == 1 and [s.step for s in selection.skipped] == [3, 2]
    break_manifest(tmp_path, 1)
    selection = engine.newest_valid()
    assert selection.info is None and [s.reason for s in selection.skipped] == ["checksum", "missing_file", "manifest"]


def test_manifest_without_file_sizes_still_verifies(tmp_path):
    """Older manifests may lack ``files``: verification falls back to the fragments' byte ranges."""
    saved_steps(tmp_path, steps=(1, 2))
    for step in (1, 2):
        path = tmp_path / step_dir_name(step) / "manifest.json"
        doc = json.loads(path.read_text())
        del doc["files"]
        path.write_text(json.dumps(doc))
    truncate(tmp_path, 2)
    selection = CheckpointEngine(str(tmp_path)).newest_valid()
    assert selection.info.step == 1 and [(s.step, s.reason) for s in selection.skipped] == [(2, "size")]


def test_retention_after_a_fallback_never_deletes_the_new_checkpoint(tmp_path):
    """keep=1, resumed from step 2 past a corrupt step 4: saving step 3 must keep step 3 (the corrupt
    newer one is not counted), and saving step 4 again replaces the corrupt copy."""
    saved_steps(tmp_path, steps=(2, 4))
    flip_byte(tmp_path, 4)
    engine = CheckpointEngine(str(tmp_path), keep=1)
    assert engine.newest_valid().info.step == 2
    engine.save(3, make_model(3))
    assert engine.newest_valid().info.step == 3
    engine.save(4, make_model(44))
    selection = engine.newest_valid()
    assert selection.info.step == 4 and selection.skipped == []
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("step-")) == [step_dir_name(4)]


def test_skipped_checkpoint_metric():
    from loco_trainer.metrics import TrainerMetrics

    from loco_trainer.metrics import CHECKPOINT_SKIP_REASONS
    from loco_trainer.ucp import SkipReason

    assert CHECKPOINT_SKIP_REASONS == SkipReason.ALL
    metrics = TrainerMetrics("j", "ns", 0, 0)
    labels = {"job": "j", "namespace": "ns", "replica": "0", "rank": "0"}
    assert all(metrics.registry.get_sample_value("loco_trainer_checkpoint_skipped_total", {**labels, "reason": r}) == 0
               for r in SkipReason.ALL)  # every reason exists at 0 from the start
    metrics.checkpoint_skipped("checksum")
    metrics.checkpoint_skipped("checksum")
    assert metrics.registry.get_sample_value(
        "loco_trainer_checkpoint_skipped_total", {"job": "j", "namespace": "ns", "replica": "0", "rank": "0", "reason": "checksum"}) == 2


def test_progress_report_skipped_checkpoints_is_optional_on_the_wire():
    from loco_contract.protocol import ProgressReport, SkippedCheckpoint, WorkerState

    plain = ProgressReport(job_name="j", replica_index=0, state=WorkerState.running)
    assert "skippedCheckpoints" not in json.loads(plain.model_dump_json(by_alias=True))  # old readers see nothing new
    report = plain.model_copy(update={"skipped_checkpoints": [
        SkippedCheckpoint(step=3, path="/checkpoints/ns/j/step-00000003", reason="checksum", message="crc32 mismatch")]})
    wire = json.loads(report.model_dump_json(by_alias=True))
    assert wire["skippedCheckpoints"] == [{"step": 3, "path": "/checkpoints/ns/j/step-00000003", "reason": "checksum",
                                           "message": "crc32 mismatch"}]
    assert ProgressReport.model_validate(wire).skipped_checkpoints[0].step == 3


def test_trainer_resumes_from_the_newest_valid_checkpoint_and_reports_the_skipped_one(tmp_path):
    from loco_contract.config import RuntimeEnv, TrainerConfig
    from loco_trainer.metrics import TrainerMetrics
    from loco_trainer.progress import ProgressState
    from loco_contract.protocol import ProgressReport, WorkerState
    from loco_trainer.rendezvous import RankInfo
    from loco_trainer.train import Trainer

    def config(steps: int) -> TrainerConfig:
        return TrainerConfig.model_validate({
            "jobName": "tiny", "namespace": "test",
            "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
            "data": {"maxBytes": 50_000},
            "training": {"steps": steps, "batchSize": 2, "seqLen": 32, "warmupSteps": 1, "logEvery": 2, "evalEvery": 0,
                         "evalBatches": 1},
            "algorithm": {"name": "ddp"},
            "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 2, "keep": 3},
        })

    env = RuntimeEnv.from_environ({}).model_copy(update={"job_name": "tiny", "namespace": "test"})

    def run(steps: int):
        progress = ProgressState(ProgressReport(job_name="tiny", namespace="test", replica_index=0, state=WorkerState.starting))
        metrics = TrainerMetrics("tiny", "test", 0, 0)
        result = Trainer(config(steps), env, RankInfo(0, 0, 1, 0, 1), torch.device("cpu"), progress=progress,
                         metrics=metrics).run()
        return result, progress.snapshot(), metrics

    run(4)
    job = tmp_path / "ckpt" / "test" / "tiny"
    flip_byte(job, 4)
    result, report, metrics = run(6)
    assert result.resumed_from.endswith(step_dir_name(2)) and result.step == 6
    assert [(s.step, s.reason) for s in report.skipped_checkpoints] == [(4, "checksum")]
    assert step_dir_name(4) in report.skipped_checkpoints[0].path
    assert metrics.registry.get_sample_value(
        "loco_trainer_checkpoint_skipped_total",
        {"job": "tiny", "namespace": "test", "replica": "0", "rank": "0", "reason": "checksum"}) == 1


# ------------------------------------------------------------------ 11: the commit survives kill -9 anywhere

CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from loco_trainer.ucp import CheckpointEngine

    root, step, phase, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    def hook(name):
        if name == phase:
            os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(100)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    CheckpointEngine(root, keep=keep, fault_hook=hook).save(step, model)
""")

#: rank 0's hook points in the order a save passes them; the rename of the directory is the commit point
BEFORE_COMMIT = ["before_stage", "after_data", "before_commit", "moved_aside"]
AFTER_COMMIT = ["renamed", "root_synced", "committed", "latest_written", "retired", "before_broadcast"]


def test_the_kill_test_covers_every_phase_of_a_save():
    from loco_trainer.ucp.engine import COMMIT_POINT, SAVE_PHASES

    assert BEFORE_COMMIT + AFTER_COMMIT == list(SAVE_PHASES) and AFTER_COMMIT[0] == COMMIT_POINT


#: the phases each scenario passes through: a new step moves nothing aside; replacing the same step under
#: keep=1 retires nothing
KILL_POINTS = [(phase, scenario) for scenario in ("next", "same") for phase in BEFORE_COMMIT + AFTER_COMMIT
               if (scenario, phase) not in {("next", "moved_aside"), ("same", "retired")}]


@pytest.mark.parametrize("phase, scenario", KILL_POINTS)
def test_kill_at_every_commit_step_leaves_a_loadable_checkpoint(tmp_path, phase, scenario):
    """``next``: step 2 is saved over a root holding step 1 (keep=1, so step 1 is retired after the
    commit). ``same``: step 1 is saved again over itself (e.g. after a fallback). The child is killed
    with SIGKILL at ``phase``; a restarted engine then resumes the way the trainer does."""
    CheckpointEngine(str(tmp_path), keep=1).save(1, make_model(1))
    step = 2 if scenario == "next" else 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "trainer_image"), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(step), phase, "1"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, f"the child never reached {phase!r}: rc {child.returncode}\n{child.stderr[-2000:]}"

    engine = CheckpointEngine(str(tmp_path), keep=1)  # as at a restart: cleans and recovers
    selection = engine.newest_valid()
    assert selection.skipped == [], selection.skipped
    assert selection.info is not None
    committed = phase in AFTER_COMMIT
    assert selection.info.step == (step if committed else 1)
    model = make_model(50)
    load_into(engine.storage, selection.info, model, None)
    torch.manual_seed(100)
    new = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    expected = new if committed else make_model(1)
    assert torch.equal(model[0].weight, expected[0].weight)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == [], leftovers  # nothing half-done survives the restart


def test_a_failed_rename_while_replacing_keeps_the_previous_copy(tmp_path, monkeypatch):
    """Saving a step that exists already must not delete the old copy before the new one is in place."""
    engine = CheckpointEngine(str(tmp_path), keep=1)
    engine.save(1, make_model(1))
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(str(src)).startswith(".tmp-step"):
            raise OSError(5, "I/O error (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(Exception):
        engine.save(1, make_model(2))
    monkeypatch.setattr(os, "replace", real_replace)
    selection = CheckpointEngine(str(tmp_path), keep=1).newest_valid()
    assert selection.info is not None and selection.info.step == 1
    model = make_model(50)
    load_into(Storage(str(tmp_path)), selection.info, model, None)
    assert torch.equal(model[0].weight, make_model(1)[0].weight)


def test_data_and_its_directories_are_fsynced_before_the_manifest(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    CheckpointEngine(str(tmp_path)).save(1, make_model(1))
    tmp = str(tmp_path / ".tmp-step-00000001")
    manifest_at = next(i for i, p in enumerate(synced) if os.path.basename(p).startswith("manifest.json"))
    before = synced[:manifest_at]
    for needed in (f"{tmp}/data/rank-00000.safetensors", f"{tmp}/data", f"{tmp}/index", tmp):
        assert needed in before, (needed, before)
    assert any(p.startswith(f"{tmp}/index/rank-00000.json") for p in before), before  # under its temporary name
    assert str(tmp_path) in synced[manifest_at:]  # the root, after the rename


# ------------------------------------------------------------------ 12: fragment file names stay inside


def rewrite_fragment_file(tmp_path, step: int, new_name: str) -> None:
    path = tmp_path / step_dir_name(step) / "manifest.json"
    doc = json.loads(path.read_text())
    old = doc["atoms"]["model/0.weight"]["fragments"][0]["file"]
    for atom in doc["atoms"].values():
        for frag in atom["fragments"]:
            if frag["file"] == old:
                frag["file"] = new_name
    doc["files"] = {new_name if k == old else k: v for k, v in doc["files"].items()}
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("bad", ["../outside.safetensors", "data/../../outside.safetensors", "/abs/outside.safetensors"])
def test_fragment_file_outside_the_checkpoint_is_refused(tmp_path, bad):
    root = tmp_path / "root"
    engine = saved_steps(root, steps=(1, 2))
    data, _ = weight_file(root, 2)
    shutil.copy(data, root / "outside.safetensors")  # a readable target: only the name check stops it
    shutil.copy(data, tmp_path / "outside.safetensors")
    if bad.startswith("/"):
        bad = str(tmp_path / "outside.safetensors")
    rewrite_fragment_file(root, 2, bad)
    with pytest.raises(FormatError) as err:
        load_into(engine.storage, read_info(engine.storage, step_dir_name(2)), make_model(0), None)
    assert ".fragments[0].file is" in str(err.value) and bad in str(err.value) and "atoms['model/0." in str(err.value)
    selection = engine.newest_valid()
    assert selection.info.step == 1 and [(s.step, s.reason) for s in selection.skipped] == [(2, "unsafe_path")]


def test_cli_verify_names_an_unsafe_fragment_file(tmp_path):
    saved_steps(tmp_path, steps=(1, 2))
    rewrite_fragment_file(tmp_path, 2, "../../etc/passwd")
    result = CliRunner().invoke(ckpt, ["verify", str(tmp_path), "--json"])
    assert result.exit_code == 1, result.output
    reports = json.loads(result.output)
    assert [(r["step"], r["ok"]) for r in reports] == [(1, True), (2, False)]
    assert reports[1]["reasons"] == ["unsafe_path"] and "'../../etc/passwd'" in reports[1]["problems"][0]


@pytest.mark.parametrize("damage, says", [(flip_header_byte, "does not parse"), (retype_in_header, '"F16"')])
def test_cli_verify_reads_every_safetensors_header(tmp_path, damage, says):
    saved_steps(tmp_path, steps=(1, 2))
    damage(tmp_path, 2)
    result = CliRunner().invoke(ckpt, ["verify", str(tmp_path), "--json"])
    assert result.exit_code == 1, result.output
    reports = json.loads(result.output)
    assert [(r["step"], r["ok"]) for r in reports] == [(1, True), (2, False)]
    assert reports[1]["reasons"] == ["header"] and says in reports[1]["problems"][0], reports[1]


def test_fragment_file_symlinked_outside_the_checkpoint_is_refused(tmp_path):
    root = tmp_path / "root"
    engine = saved_steps(root, steps=(1, 2))
    data, frag = weight_file(root, 2)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(data, outside)
    os.symlink(outside, data)
    with pytest.raises(FormatError) as err:
        load_into(engine.storage, read_info(engine.storage, step_dir_name(2)), make_model(0), None)
    assert "symlink" in str(err.value) and frag.file in str(err.value)
    selection = engine.newest_valid()
    assert selection.info.step == 1 and [(s.step, s.reason) for s in selection.skipped] == [(2, "unsafe_path")]


def test_symlink_inside_the_checkpoint_is_fine(tmp_path):
    root = tmp_path / "root"
    engine = saved_steps(root, steps=(1,))
    data, _ = weight_file(root, 1)
    os.rename(data, data.parent / "real.safetensors")
    os.symlink("real.safetensors", data)
    model = make_model(0)
    load_into(engine.storage, read_info(engine.storage, step_dir_name(1)), model, None)
    assert torch.equal(model[0].weight, make_model(1)[0].weight)


# ------------------------------------------------------------------ 13: DCP import never runs pickled code


class Evil:
    """Unpickling it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def dcp_checkpoint(path, extra=None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(1, 6)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": 2, **(extra or {})}, checkpoint_id=str(path))


def test_dcp_import_refuses_a_pickled_object_in_the_state(tmp_path):
    marker = tmp_path / "pwned"
    dcp_checkpoint(tmp_path / "dcp", {"payload": Evil(str(marker))})
    assert not marker.exists()
    result = CliRunner().invoke(ckpt, ["convert", "--from-dcp", str(tmp_path / "dcp"), str(tmp_path / "ucp")])
    assert result.exit_code == 1, result.output
    assert not marker.exists(), "the import executed pickled code"
    assert "weights_only" in result.output and "payload" in result.output
    assert not (tmp_path / "ucp" / step_dir_name(2)).exists()


def test_dcp_import_refuses_a_metadata_file_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    dcp_checkpoint(tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil(str(marker))))
    with pytest.raises(ValueError, match=r"\.metadata.*refus|refus.*\.metadata") as err:
        tools.from_dcp(str(tmp_path / "dcp"), str(tmp_path / "ucp"))
    assert not marker.exists(), "the import executed pickled code"
    assert "builtins" in str(err.value) or "open" in str(err.value)


def test_dcp_import_of_plain_state_still_works(tmp_path):
    dcp_checkpoint(tmp_path / "dcp", {"note": {"lr_scale": 0.5, "tag": "x", "ids": [1, 2]}})
    info = tools.from_dcp(str(tmp_path / "dcp"), str(tmp_path / "ucp"))
    assert info.step == 2 and tools.verify(str(tmp_path / "ucp"))[0].ok
    loaded = tools.consolidated_state(Storage(str(tmp_path / "ucp")), info)
    assert loaded["extra_state"]["note"] == {"lr_scale": 0.5, "tag": "x", "ids": [1, 2]}


def test_an_imported_checkpoint_records_its_absolute_source_and_loading_it_says_so(tmp_path, monkeypatch):
    """Issue 29: the load said 'rank 0 did not exist at save (1x1 (consolidated))' and importedFrom held the
    path as typed (relative to wherever the command ran)."""
    dcp_checkpoint(tmp_path / "dcp")
    monkeypatch.chdir(tmp_path)
    info = tools.from_dcp("dcp", str(tmp_path / "ucp"))
    assert info.manifest.meta["importedFrom"] == f"dcp:{tmp_path / 'dcp'}"
    loaded = load_into(Storage(str(tmp_path / "ucp")), info, make_model(0), None)
    assert not any("did not exist at save" in n for n in loaded.notes), loaded.notes
    assert any(n.startswith(f"the checkpoint holds no per-rank state (imported from dcp:{tmp_path / 'dcp'}")
               for n in loaded.notes), loaded.notes
