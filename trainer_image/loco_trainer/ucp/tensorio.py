"""Tensor bytes in and out: host staging buffers, the safetensors data-file writer, fragment reads.

Data files are standard safetensors files (``safetensors.safe_open`` reads them). They are
written by :func:`write_safetensors` as a stream (header first, then each fragment's bytes), so
no second in-memory copy of the checkpoint is made and any fsspec file object works; the crc32
of each fragment is computed on the way out.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Sequence

import torch
# zlib-ng's crc32: the same CRC-32 as zlib's (the format is unchanged), about 6x faster (SIMD): a checkpoint's
# checksums keep pace with the disk
from zlib_ng.zlib_ng import crc32

from .format import DTYPES, Atom, Fragment

#: keep the data section 8-byte aligned, like the safetensors library does
_ALIGN = 8


class CorruptCheckpointError(RuntimeError):
    """A fragment's bytes do not match its checksum or size (the message names file and atom)."""


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"tensors of dtype {dtype} cannot be checkpointed (supported: {', '.join(DTYPES)})")
    return name


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw row-major bytes of a contiguous CPU tensor, without a copy."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class StagingPool:
    """Host buffers reused across saves (pinned when the source lives on an accelerator).

    ``stage(key, t)`` copies ``t`` into the buffer kept for ``key`` (reallocated only when the
    shape or dtype changed) and returns it. The engine waits for the previous save before
    staging again, so a buffer is never overwritten while it is being written out.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def stage(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            self._buffers[key] = buf
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        return buf

    def retain_only(self, keys: set[str]) -> None:
        """Free buffers whose key was not staged by the latest save."""
        for k in [k for k in self._buffers if k not in keys]:
            del self._buffers[k]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


@dataclass(frozen=True)
class WrittenBlock:
    """Where :func:`write_safetensors` put one tensor."""

    key: str
    byte_offset: int
    nbytes: int
    crc32: int


def write_safetensors(fh: IO[bytes], tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> list[WrittenBlock]:
    """Stream ``tensors`` (contiguous CPU tensors, unique keys) to ``fh`` in safetensors layout.

    Returns each tensor's absolute byte range and crc32, in input order.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for key, t in tensors:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPES[dtype_name(t.dtype)], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    base = 8 + len(raw)
    # zlib.crc32 and file writes both release the GIL: checksum each block on a helper thread
    # while it is being written, so the checksum costs (almost) no wall time
    views = [tensor_bytes(t.contiguous()) for _, t in tensors]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ucp-crc") as pool:
        crcs = [pool.submit(crc32, v) for v in views]
        for v in views:
            fh.write(v)
        blocks = []
        offset = base
        for (key, _), v, crc in zip(tensors, views, crcs):
            blocks.append(WrittenBlock(key, offset, len(v), crc.result()))
            offset += len(v)
    return blocks


def check_fragment(data: memoryview | bytes, frag: Fragment, atom: Atom, where: str) -> None:
    """Raise CorruptCheckpointError unless ``data`` has the fragment's length and crc32."""
    if len(data) != frag.nbytes:
        raise CorruptCheckpointError(
            f"{where}/{frag.file}: fragment {frag.key} of {atom.name} is {len(data)} bytes, the manifest says {frag.nbytes}"
        )
    crc = crc32(data)
    if crc != frag.crc32:
        raise CorruptCheckpointError(
            f"{where}/{frag.file}: checksum mismatch in fragment {frag.key} of {atom.name} "
            f"(crc32 {crc:#010x}, manifest {frag.crc32:#010x}); the file is corrupt. Run 'loco ckpt verify {where}' "
            "and load an older checkpoint"
        )
