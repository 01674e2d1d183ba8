"""Token stream, held-out split and deterministic, resumable sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loco_contract.config import DataSpec
from loco_trainer.data import (
    DataError,
    Dataset,
    DataPosition,
    TokenWindows,
    TrainSampler,
    builtin_corpus,
    rank_slice,
    split_tokens,
    stdlib_source_files,
)


def test_builtin_corpus_is_the_stdlib_source_deterministic_and_capped():
    files = stdlib_source_files()
    assert files == sorted(files)
    assert any(f.endswith("/os.py") for f in files)
    assert not any("site-packages" in f for f in files)
    a, b = builtin_corpus(50_000), builtin_corpus(50_000)
    assert a.dtype == np.uint8 and len(a) == 50_000
    assert np.array_equal(a, b)
    with open(files[0], "rb") as fh:
        head = fh.read(100)
    assert bytes(a[: len(head)]) == head


def test_eval_split_is_the_disjoint_tail():
    tokens = np.arange(1000) % 251
    train, held_out = split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(held_out) == 100
    assert np.array_equal(np.concatenate([train, held_out]), tokens)


def test_dataset_train_and_eval_windows_do_not_share_tokens():
    ds = Dataset(DataSpec(max_bytes=20_000, eval_fraction=0.1), seq_len=32, seed=1)
    assert len(ds.train.tokens) + len(ds.eval.tokens) == ds.num_tokens == 20_000
    x, y = ds.eval_batch(0, 4, rank=0, world_size=1)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def _sampler(n_tokens=32 * 50 + 1, seq_len=32, seed=7):
    return TrainSampler(TokenWindows(np.arange(n_tokens) % 256, seq_len), seed)


def test_sampling_is_deterministic_and_covers_every_window_once_per_epoch():
    s = _sampler()
    n = s.windows.num_windows
    ids = s.window_ids(0, n)
    assert sorted(ids.tolist()) == list(range(n))
    assert torch.equal(ids, _sampler().window_ids(0, n))
    assert not torch.equal(ids, _sampler(seed=8).window_ids(0, n))
    assert not torch.equal(s.window_ids(n, n), ids)  # next epoch: another order


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_split_the_global_batch_without_overlap_or_gap(world_size):
    global_batch = 7
    slices = [rank_slice(global_batch, r, world_size) for r in range(world_size)]
    covered = [o + i for o, c in slices for i in range(c)]
    assert covered == list(range(global_batch))


def test_resuming_at_a_position_reproduces_the_uninterrupted_run():
    s = _sampler()
    pos = DataPosition()
    uninterrupted = []
    for _ in range(6):
        uninterrupted.append(s.batch(pos, 6, rank=1, world_size=2))
        pos = pos.advance(6)
    resumed_pos = DataPosition.from_state_dict(DataPosition(3 * 6).state_dict())
    for step in range(3, 6):
        x, y = s.batch(resumed_pos, 6, rank=1, world_size=2)
        assert torch.equal(x, uninterrupted[step][0]) and torch.equal(y, uninterrupted[step][1])
        resumed_pos = resumed_pos.advance(6)


def test_changing_the_worker_count_neither_skips_nor_repeats_sequences():
    s = _sampler()
    seen = []
    pos = DataPosition()
    for world in [2, 2, 3, 1, 3]:  # the job is resized between steps
        global_batch = 2 * world
        for r in range(world):
            off, cnt = rank_slice(global_batch, r, world)
            seen += s.window_ids(pos.sequences + off, cnt).tolist()
        pos = pos.advance(global_batch)
    assert seen == s.window_ids(0, pos.sequences).tolist()
    assert len(set(seen)) == len(seen)  # within one epoch: no repeats


def test_shard_source_reads_little_endian_uint16(tmp_path):
    (tmp_path / "a.bin").write_bytes(np.array([1, 2, 300], dtype="<u2").tobytes())
    (tmp_path / "b.bin").write_bytes(np.array(list(range(400, 700)), dtype="<u2").tobytes())
    ds = Dataset(DataSpec(source="shards", path=str(tmp_path), eval_fraction=0.1), seq_len=8, seed=0)
    assert ds.num_tokens == 303 and ds.max_token == 699
    assert list(ds.train.tokens[:4]) == [1, 2, 300, 400]


def test_shard_errors_name_data_path(tmp_path):
    with pytest.raises(DataError, match="data.path .* no \\*.bin"):
        Dataset(DataSpec(source="shards", path=str(tmp_path)), seq_len=8, seed=0)
    with pytest.raises(DataError, match="data.path .* not a directory"):
        Dataset(DataSpec(source="shards", path=str(tmp_path / "nope")), seq_len=8, seed=0)


def test_too_small_corpus_names_the_fields():
    with pytest.raises(DataError, match="seqLen"):
        Dataset(DataSpec(max_bytes=2000, eval_fraction=0.01), seq_len=512, seed=0)
