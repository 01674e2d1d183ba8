"""Universal checkpoint: single-process behaviour (format, async semantics, failures, tools, CLI)."""

from __future__ import annotations

import json
import os
import random
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from loco_trainer.ckpt_cli import ckpt
from loco_trainer.ucp import (
    CheckpointEngine, CheckpointLoadError, CheckpointSaveError, CorruptCheckpointError, Reason, tools,
)
from loco_trainer.ucp.format import Manifest, step_dir_name


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for name, v in st.items():
            assert torch.equal(v, sb["state"][i][name]), (i, name)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    model, opt = make_model(0), None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 3)
    engine = CheckpointEngine(str(tmp_path), keep=2)
    rng = torch.get_rng_state()
    engine.save(3, model, opt, rank_state={"torch_rng": rng})
    expected = train(model, opt, 3, seed=1)

    model2 = make_model(42)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)  # different hyperparameters are overwritten
    loaded = engine.load(engine.latest(), model2, opt2)
    assert loaded.step == 3
    assert torch.equal(loaded.rank_state["torch_rng"], rng)
    assert train(model2, opt2, 3, seed=1) == expected
    assert_same_state(model, model2, opt, opt2)


def test_algorithm_state_round_trips_and_resets_on_algorithm_change(tmp_path):
    model = make_model(0)
    state = {
        "outer": {"momentum": torch.arange(6.0).reshape(2, 3), "steps": 7},
        "schedule": (1, 2.5, "x", None, True),
        "by_index": {0: torch.ones(2), 3: [torch.zeros(1, dtype=torch.bfloat16)]},
        "blob": b"\x00\x01",
        "np": np.arange(4, dtype=np.int32),
    }
    rank_state = {"py": random.getstate(), "np": np.random.get_state()}
    engine = CheckpointEngine(str(tmp_path), algorithm="diloco")
    engine.save(5, model, None, algorithm_state=state, extra_state={"data": {"epoch": 1, "offset": 1234}}, rank_state=rank_state)

    got = engine.load(engine.latest(), make_model(1))
    assert got.extra_state == {"data": {"epoch": 1, "offset": 1234}}
    a = got.algorithm_state
    assert torch.equal(a["outer"]["momentum"], state["outer"]["momentum"]) and a["outer"]["steps"] == 7
    assert a["schedule"] == state["schedule"] and a["blob"] == b"\x00\x01"
    assert set(a["by_index"]) == {0, 3} and a["by_index"][3][0].dtype == torch.bfloat16
    assert np.array_equal(a["np"], state["np"]) and a["np"].dtype == np.int32
    assert got.rank_state["py"] == rank_state["py"]
    np_state = got.rank_state["np"]
    assert np_state[0] == "MT19937" and np.array_equal(np_state[1], rank_state["np"][1])

    events = []
    other = CheckpointEngine(str(tmp_path), algorithm="ddp", on_event=lambda r, m: events.append((r, m)))
    got = other.load(other.latest(), make_model(1))
    assert got.algorithm_state is None
    assert any("'diloco' to 'ddp'" in n for n in got.notes)
    assert any(r == Reason.STATE_RESET for r, _ in events)


def test_async_save_captures_state_at_call_time_and_next_save_waits(tmp_path):
    model = make_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    release = threading.Event()
    entered = threading.Event()

    def hook(phase: str) -> None:
        if phase == "after_data":
            entered.set()
            assert release.wait(60)

    engine = CheckpointEngine(str(tmp_path), fault_hook=hook)
    handle = engine.save_async(1, model)
    assert entered.wait(60)
    assert not handle.done() and engine.latest() is None  # not committed while the write is held
    with torch.no_grad():  # training goes on and changes the weights
        for p in model.parameters():
            p.add_(1.0)
    release.set()
    info = handle.wait(60)
    assert info.step == 1
    fresh = make_model(3)
    engine.load(info, fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k
    engine.fault_hook = None
    engine.save_async(2, model)
    h3 = engine.save_async(3, model)  # waits for step 2 before staging
    assert [c.step for c in engine.list()][:2] == [1, 2]
    h3.wait(60)


def test_failed_background_write_is_reported_and_never_committed(tmp_path):
    events = []

    def hook(phase: str) -> None:
        if phase == "after_data":
            raise OSError("disk full (injected)")

    engine = CheckpointEngine(str(tmp_path), fault_hook=hook, on_event=lambda r, m: events.append((r, m)))
    handle = engine.save_async(1, make_model(0))
    with pytest.raises(CheckpointSaveError, match="disk full"):
        handle.wait(60)
    assert engine.latest() is None
    assert not any(n.startswith("step-") for n in os.listdir(tmp_path))
    assert any(r == Reason.FAILED and "disk full" in m for r, m in events)
    assert engine.metrics.registry.get_sample_value("loco_checkpoint_saves_total", {"outcome": "failed"}) == 1
    engine.fault_hook = None
    assert engine.save(2, make_model(0)).step == 2
    assert engine.metrics.registry.get_sample_value("loco_checkpoint_saves_total", {"outcome": "committed"}) == 1


def test_retention_keeps_newest_and_latest_pointer(tmp_path):
    engine = CheckpointEngine(str(tmp_path), keep=2)
    model = make_model(0)
    for step in (10, 20, 30, 40):
        engine.save(step, model)
    assert [c.step for c in engine.list()] == [30, 40]
    assert (tmp_path / "latest").read_text().strip() == step_dir_name(40)


def test_incomplete_directory_is_ignored_and_cleaned(tmp_path):
    engine = CheckpointEngine(str(tmp_path))
    engine.save(1, make_model(0))
    partial = tmp_path / ".tmp-step-00000002" / "data"
    partial.mkdir(parents=True)
    (partial / "rank-00000.safetensors").write_bytes(b"half")
    uncommitted = tmp_path / "step-00000003"  # a directory without a manifest is not a checkpoint
    uncommitted.mkdir()
    assert engine.latest().step == 1
    assert tools.inspect(str(tmp_path))["incomplete"] == [".tmp-step-00000002", "step-00000003"]
    restarted = CheckpointEngine(str(tmp_path))
    assert not (tmp_path / ".tmp-step-00000002").exists()
    assert restarted.latest().step == 1


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    engine = CheckpointEngine(str(tmp_path))
    engine.save(1, make_model(0))
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    with pytest.raises(CheckpointLoadError, match=r"model/0.weight: checkpoint shape \[5, 6\] does not match the model's \[4, 6\]"):
        engine.load(engine.latest(), other)


def test_corrupt_data_file_is_named_by_verify_and_refused_by_load(tmp_path):
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 1)
    engine = CheckpointEngine(str(tmp_path))
    info = engine.save(1, model, opt)
    frag = info.manifest.atoms["model/0.weight"].fragments[0]
    data_file = tmp_path / info.dir / frag.file
    raw = bytearray(data_file.read_bytes())
    raw[frag.byte_offset + 5] ^= 0xFF
    data_file.write_bytes(bytes(raw))

    result = CliRunner().invoke(ckpt, ["verify", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "rank-00000.safetensors" in result.output and "model/0.weight" in result.output and "CORRUPT" in result.output
    with pytest.raises(CorruptCheckpointError, match=r"rank-00000.safetensors: checksum mismatch in fragment model/0.weight"):
        fresh = make_model(1)
        engine.load(info, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))


def test_checksums_checked_beside_the_reads_still_refuse_a_corrupt_fragment(tmp_path):
    """load() computes each fragment's crc32 on a helper thread while it reads the next one: a bad byte in the
    last fragments (the optimizer's moments) is still refused, naming the fragment, and the helper is gone after."""
    import threading

    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, opt, 1)
    engine = CheckpointEngine(str(tmp_path))
    info = engine.save(1, model, opt)
    atom = next(name for name in info.manifest.atoms if name.startswith("optim/") and name.endswith("exp_avg_sq"))
    frag = info.manifest.atoms[atom].fragments[0]
    data_file = tmp_path / info.dir / frag.file
    raw = bytearray(data_file.read_bytes())
    raw[frag.byte_offset + frag.nbytes - 1] ^= 0x01
    data_file.write_bytes(bytes(raw))
    fresh = make_model(1)
    with pytest.raises(CorruptCheckpointError, match=f"checksum mismatch in fragment {atom}"):
        engine.load(info, fresh, torch.optim.AdamW(fresh.parameters(), lr=0.01))
    assert not [t for t in threading.enumerate() if t.name.startswith("ucp-verify")]
    raw[frag.byte_offset + frag.nbytes - 1] ^= 0x01  # repaired: loads, equal to the saved model
    data_file.write_bytes(bytes(raw))
    engine.load(info, fresh, torch.optim.AdamW(fresh.parameters(), lr=0.01))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_data_files_are_standard_safetensors(tmp_path):
    from safetensors import safe_open

    model = make_model(0)
    info = CheckpointEngine(str(tmp_path)).save(1, model)
    with safe_open(str(tmp_path / info.dir / "data" / "rank-00000.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("model/0.weight@0,0"), model[0].weight.detach())


def test_cli_inspect_json_and_to_torch(tmp_path):
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, 2)
    CheckpointEngine(str(tmp_path / "ck"), algorithm="ddp").save(2, model, opt, extra_state={"tokens": 99})
    runner = CliRunner()
    result = runner.invoke(ckpt, ["inspect", str(tmp_path / "ck"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    (c,) = doc["checkpoints"]
    assert c["step"] == 2 and c["algorithm"] == "ddp" and c["numParameters"] == sum(p.numel() for p in model.parameters())
    assert {p["name"] for p in c["parameters"]} == set(model.state_dict())
    result = runner.invoke(ckpt, ["inspect", str(tmp_path / "ck"), "--params"])
    assert result.exit_code == 0 and "0.weight" in result.output, result.output

    out = tmp_path / "full.pt"
    result = runner.invoke(ckpt, ["convert", "--to-torch", str(tmp_path / "ck"), str(out)])
    assert result.exit_code == 0, result.output
    full = torch.load(out, weights_only=False)
    assert full["step"] == 2 and full["extra_state"] == {"tokens": 99}
    for k, v in model.state_dict().items():
        assert torch.equal(full["model"][k], v)
    assert torch.equal(full["optim"]["state"]["2.bias"]["exp_avg"], opt.state[model[2].bias]["exp_avg"])
    result = runner.invoke(ckpt, ["convert", str(tmp_path / "ck"), str(out)])
    assert result.exit_code == 2 and "exactly one of" in result.output


def test_dcp_checkpoint_imports_and_resumes(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": 2}, checkpoint_id=str(tmp_path / "dcp"))
    expected = train(model, opt, 2, seed=5)

    result = CliRunner().invoke(ckpt, ["convert", "--from-dcp", str(tmp_path / "dcp"), str(tmp_path / "ucp")])
    assert result.exit_code == 0, result.output
    engine = CheckpointEngine(str(tmp_path / "ucp"))
    info = engine.latest()
    assert info.step == 2 and tools.verify(str(tmp_path / "ucp"))[0].ok
    model2 = make_model(7)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    engine.load(info, model2, opt2)
    assert train(model2, opt2, 2, seed=5) == expected
    assert_same_state(model, model2, opt, opt2)


def test_manifest_refuses_newer_format_version(tmp_path):
    info = CheckpointEngine(str(tmp_path)).save(1, make_model(0))
    doc = json.loads((tmp_path / info.dir / "manifest.json").read_text())
    doc["formatVersion"] = 99
    with pytest.raises(ValueError, match="formatVersion 99 is newer than this reader"):
        Manifest.loads(json.dumps(doc))


def test_fsspec_memory_filesystem_backend():
    import fsspec

    fs = fsspec.filesystem("memory")
    engine = CheckpointEngine("/ucp-test-mem", fs=fs)
    model = make_model(0)
    info = engine.save(4, model)
    fresh = make_model(9)
    engine.load(info, fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    fs.rm("/ucp-test-mem", recursive=True)


def test_lazy_staging_makes_the_next_optimizer_step_wait_for_the_copy(tmp_path):
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order: list[str] = []
    release = threading.Event()

    def hook(phase: str) -> None:
        if phase == "before_stage":
            assert release.wait(60)
            order.append("staging")

    engine = CheckpointEngine(str(tmp_path), fault_hook=hook, staging="lazy")
    handle = engine.save_async(1, model, opt)
    assert not handle.staged()
    opt.register_step_pre_hook(lambda *_: order.append("step"))
    releaser = threading.Timer(0.2, lambda: (order.append("release"), release.set()))
    releaser.start()
    opt.step()  # must not change the parameters before the background copy took them
    releaser.join()
    info = handle.wait(60)
    assert order == ["release", "staging", "step"]
    assert handle.stage_wait_s > 0 and handle.stall_s >= handle.stage_wait_s
    fresh = make_model(3)
    engine.load(info, fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt.step()  # the gate was one-shot: no second wait, no error
    assert order.count("step") == 2
