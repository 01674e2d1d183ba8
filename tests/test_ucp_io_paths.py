"""The checkpoint engine's fast paths: a synchronous save writes the CPU tensors in place (no staging copy), a load
reads every fragment of a file through one open file, and a short file is still refused."""

from __future__ import annotations

import fsspec
import pytest
import torch

from loco_trainer.ucp import CheckpointEngine
from loco_trainer.ucp.storage import Storage


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return model, opt


def test_a_synchronous_save_writes_in_place_and_an_asynchronous_one_copies(tmp_path) -> None:
    model, opt = _model()
    engine = CheckpointEngine(str(tmp_path))
    engine.save(1, model, opt)
    assert engine._pool.nbytes == 0  # nothing staged: written from the tensors themselves
    handle = engine.save_async(2, model, opt)
    staged = engine._pool.nbytes
    handle.wait()
    assert staged >= sum(p.numel() * 4 * 3 for p in model.parameters())  # params + 2 AdamW moments copied
    engine.save(3, model, opt)
    assert engine._pool.nbytes == staged  # an in-place save keeps the async saves' buffers
    fresh, fresh_opt = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    engine.load(engine.latest(), fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    saved_moments = [opt.state[p]["exp_avg_sq"] for p in model.parameters()]
    loaded_moments = [fresh_opt.state[p]["exp_avg_sq"] for p in fresh.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(saved_moments, loaded_moments))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_range_reader_reads_ranges_into_buffers_and_refuses_a_short_file(tmp_path, where) -> None:
    if where == "local":
        storage = Storage(str(tmp_path))
    else:
        storage = Storage("/ranges", fs=fsspec.filesystem("memory"))
        storage.makedirs("")
    storage.write_bytes("f.bin", bytes(range(256)) * 4)
    reader = storage.range_reader("f.bin")
    try:
        buf = bytearray(10)
        reader.read_into(250, memoryview(buf))
        assert bytes(buf) == bytes(range(250, 256)) + bytes(range(0, 4))
        reader.read_into(0, memoryview(buf))  # backwards: ranges need not come in order
        assert bytes(buf) == bytes(range(10))
        with pytest.raises(OSError, match=r"wanted 10 bytes at offset 1020, the file ends after 4"):
            reader.read_into(1020, memoryview(buf))
    finally:
        reader.close()
