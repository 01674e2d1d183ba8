"""Training data: the token stream, the held-out split and deterministic, resumable sampling.

Token stream
    ``builtin``: the running interpreter's own standard library ``.py`` files (sorted paths,
    ``site-packages``/``dist-packages`` excluded), concatenated as bytes; one token per byte
    (vocabulary 256). ``max_bytes`` caps it. ``shards``: every ``*.bin`` file under ``path``
    (sorted), little-endian uint16 tokens.

Split
    The tail ``eval_fraction`` of the stream is held out for eval; the head is for training.

Sampling (the contract the elastic/resume logic relies on)
    The training stream is cut into ``W`` non-overlapping windows of ``seq_len + 1`` tokens
    (window ``i`` starts at token ``i * seq_len``; inputs are its first ``seq_len`` tokens, targets
    the last ``seq_len``). Epoch ``e`` visits the windows in the order of a permutation seeded by
    ``(seed, e)``. The *data position* is the number of sequences consumed globally: sequence
    number ``g`` is window ``perm_{g // W}[g % W]``. A step with global batch ``B`` starting at
    position ``p`` hands rank ``r`` the sequences ``p + offset_r .. p + offset_r + count_r`` (ranks
    take consecutive slices in rank order), then the position becomes ``p + B``. So resuming at
    ``p`` reproduces the uninterrupted run, and changing the worker count neither skips nor
    repeats a sequence.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from loco_contract.config import DataSpec


class DataError(ValueError):
    """The data section cannot be used (the message names the field)."""


# ------------------------------------------------------------------------------- token stream


def stdlib_source_files() -> list[str]:
    """Sorted paths of the running interpreter's standard-library ``.py`` files."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def builtin_corpus(max_bytes: int | None = None) -> np.ndarray:
    """The built-in corpus as a uint8 array (byte-level tokens), at most ``max_bytes`` long."""
    chunks: list[bytes] = []
    total = 0
    for path in stdlib_source_files():
        with open(path, "rb") as fh:
            blob = fh.read()
        if max_bytes is not None and total + len(blob) > max_bytes:
            blob = blob[: max_bytes - total]
        chunks.append(blob)
        total += len(blob)
        if max_bytes is not None and total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def shard_tokens(path: str) -> np.ndarray:
    """All ``*.bin`` shards under ``path`` (sorted), little-endian uint16, concatenated."""
    if not os.path.isdir(path):
        raise DataError(f"data.path {path!r} is not a directory: point it at the directory of *.bin token shards")
    files = sorted(glob.glob(os.path.join(path, "*.bin")))
    if not files:
        raise DataError(f"data.path {path!r} holds no *.bin files: write little-endian uint16 token shards there")
    arrays = [np.fromfile(f, dtype="<u2") for f in files]
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


def load_tokens(spec: DataSpec, resolve_path=lambda p: p) -> np.ndarray:
    """The whole token stream described by ``spec`` (uint8 or uint16 array)."""
    if spec.source == "builtin":
        return builtin_corpus(spec.max_bytes)
    return shard_tokens(resolve_path(spec.path or ""))


def split_tokens(tokens: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): the eval part is the tail ``eval_fraction`` of the stream."""
    n_eval = int(len(tokens) * eval_fraction)
    return tokens[: len(tokens) - n_eval], tokens[len(tokens) - n_eval :]


# ----------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class DataPosition:
    """How far the global data stream has been consumed: ``sequences`` sequences in all ranks."""

    sequences: int = 0

    def advance(self, global_batch: int) -> "DataPosition":
        return DataPosition(self.sequences + global_batch)

    def state_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "DataPosition":
        return cls(int(state["sequences"]))


def rank_slice(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, count) of ``rank``'s share of a global batch; the remainder goes to the low ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    base, extra = divmod(global_batch, world_size)
    count = base + (1 if rank < extra else 0)
    offset = rank * base + min(rank, extra)
    return offset, count


@lru_cache(maxsize=4)
def _epoch_permutation(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=gen)


class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens over one token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, what: str = "train") -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"the {what} split has {len(tokens)} tokens, fewer than one sequence of training.seqLen+1 = "
                f"{seq_len + 1}: raise data.maxBytes (or data.evalFraction for eval) or lower training.seqLen"
            )

    def batch(self, window_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (len(window_ids), seq_len) int64: inputs and next-token targets."""
        rows = [
            torch.from_numpy(self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1].astype(np.int64))
            for i in window_ids.tolist()
        ]
        data = torch.stack(rows)  # (B, T+1)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()


class TrainSampler:
    """Maps global sequence numbers to training windows (see the module docstring)."""

    def __init__(self, windows: TokenWindows, seed: int) -> None:
        self.windows = windows
        self.seed = seed

    def window_ids(self, start: int, count: int) -> torch.Tensor:
        """Window indices of global sequences ``start .. start + count``."""
        n = self.windows.num_windows
        out = []
        for g in range(start, start + count):
            out.append(int(_epoch_permutation(n, self.seed, g // n)[g % n]))
        return torch.tensor(out, dtype=torch.long)

    def batch(self, position: DataPosition, global_batch: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) for the step that starts at ``position``."""
        offset, count = rank_slice(global_batch, rank, world_size)
        return self.windows.batch(self.window_ids(position.sequences + offset, count))


class Dataset:
    """Train sampler and eval batches of one :class:`DataSpec` (loaded once per process)."""

    def __init__(self, spec: DataSpec, seq_len: int, seed: int, resolve_path=lambda p: p) -> None:
        tokens = load_tokens(spec, resolve_path)
        train, held_out = split_tokens(tokens, spec.eval_fraction)
        self.num_tokens = len(tokens)
        self.train = TokenWindows(train, seq_len, "train")
        self.eval = TokenWindows(held_out, seq_len, "eval")
        self.sampler = TrainSampler(self.train, seed)
        self.max_token = int(tokens.max()) if len(tokens) else 0

    def train_batch(self, position: DataPosition, global_batch: int, rank: int, world_size: int):
        return self.sampler.batch(position, global_batch, rank, world_size)

    def eval_batch(self, index: int, batch_size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval batch ``index`` of ``rank``: consecutive held-out windows, the same for every run
        with the same world size, different across ranks (wrapping around the eval split)."""
        start = (index * world_size + rank) * batch_size
        ids = torch.arange(start, start + batch_size) % self.eval.num_windows
        return self.eval.batch(ids)
