"""Map tensors of the current layout to global blocks: what each rank writes, what it reads.

A tensor is one of
* a DTensor (FSDP2 ``fully_shard``, HSDP, tensor parallel): its block is given by its placements
  (``Shard(d)`` splits dim d, ``Replicate()`` copies; ``Partial`` is refused). Of the ranks holding
  the same block, only the one at coordinate 0 on every replicated mesh dimension writes it;
* a plain tensor: the same on every rank (DDP, or a replica's state at a sync point); exactly one
  rank, chosen by :func:`assign_owners`, writes it whole.

Reading is the same in reverse: a rank asks for its block (DTensor) or the whole tensor (plain)
and :class:`FragmentReader` intersects it with the stored fragments.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .format import Atom, Fragment, Manifest, UnsafePathError
from .storage import RangeReader, Storage
from .tensorio import CorruptCheckpointError, check_fragment, tensor_bytes, torch_dtype

try:  # DTensor exists in every torch >= 2.4; keep plain tensors working without it
    from torch.distributed.tensor import DTensor, Partial, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class Block:
    """A rank's block of an atom: global ``offsets``/``shape`` and the live local tensor."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    local: torch.Tensor
    layout: str


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_block(name: str, t: torch.Tensor) -> tuple[Block | None, bool]:
    """``(block, writes)``: this rank's block of ``t`` (None when it holds none) and whether it is
    the one rank among the block's holders that writes it. Plain tensors return the whole tensor
    with ``writes=True`` (the caller decides ownership)."""
    if not is_dtensor(t):
        return Block(tuple(0 for _ in t.shape), tuple(t.shape), t.detach(), "replicated"), True
    mesh, placements = t.device_mesh, t.placements
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(
            f"{name}: a DTensor with a Partial placement {placements} cannot be checkpointed; "
            "reduce it (redistribute to Shard/Replicate) before saving"
        )
    coord = mesh.get_coordinate()
    if coord is None:
        return None, False
    shape, offsets = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    local = t.to_local().detach()
    if tuple(local.shape) != tuple(shape):  # padded shard (uneven split): keep the real rows
        for dim, size in enumerate(shape):
            local = local.narrow(dim, 0, size)
    writes = all(c == 0 for c, p in zip(coord, placements) if isinstance(p, Replicate))
    layout = "sharded(" + ",".join(str(p) for p in placements) + ")"
    return Block(tuple(offsets), tuple(shape), local, layout), writes


def assign_owners(sizes: Iterable[tuple[str, int]], world_size: int) -> dict[str, int]:
    """Spread whole-tensor writes over ranks: largest first onto the least loaded rank.

    Pure and deterministic, so every rank computes the same assignment from the same names.
    """
    load = [0] * world_size
    owners: dict[str, int] = {}
    for name, nbytes in sorted(sizes, key=lambda x: (-x[1], x[0])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += nbytes
    return owners


def _intersect(a_off, a_shape, b_off, b_shape):
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + s, y + t) for x, s, y, t in zip(a_off, a_shape, b_off, b_shape)]
    if any(h <= l for h, l in zip(hi, lo)):
        return None
    return lo, [h - l for h, l in zip(hi, lo)]


class FragmentReader:
    """Reads blocks of atoms from one committed checkpoint directory (``step_dir`` under ``storage``).

    Each needed fragment is read once per call, checked against its crc32 and copied into place.

    ``overlap_checks``: a fragment's crc32 is computed on a helper thread while the next fragment is read (both
    release the GIL), so a load runs at the disk's speed rather than read + checksum in turn; :meth:`finish`
    waits for them and raises the first mismatch. Until then the data read is unverified: call it before using
    the data (a load calls it before handing the state to the model and optimizer).
    """

    def __init__(self, storage: Storage, step_dir: str, manifest: Manifest, verify: bool = True,
                 overlap_checks: bool = False) -> None:
        self.storage = storage
        self.step_dir = step_dir
        self.manifest = manifest
        self.verify = verify
        self.bytes_read = 0
        self._inside: set[str] = set()  # files already checked not to lead out of step_dir
        self._checker: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ucp-verify") if verify and overlap_checks else None)
        self._checks: list[Future[None]] = []
        self._files: dict[str, RangeReader] = {}  # kept open from one fragment to the next

    def close(self) -> None:
        """Close the data files kept open (a later read opens them again)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def finish(self) -> None:
        """Wait for the checksums still running and raise the first mismatch; later reads are checked at once."""
        checker, checks = self._checker, self._checks
        self._checker, self._checks = None, []
        self.close()
        if checker is None:
            return
        try:
            for check in checks:
                check.result()
        finally:
            checker.shutdown(wait=True, cancel_futures=True)

    def _check_inside(self, atom: Atom, frag: Fragment) -> None:
        """Refuse a fragment file that is (or sits under) a symlink pointing out of the checkpoint;
        the manifest's names themselves were checked when it was parsed."""
        if frag.file in self._inside:
            return
        if not self.storage.resolves_inside(f"{self.step_dir}/{frag.file}", self.step_dir):
            index = atom.fragments.index(frag)
            raise UnsafePathError(
                f"{self.storage.path(self.step_dir)}: atoms[{atom.name!r}].fragments[{index}].file is {frag.file!r}, "
                "a symlink that resolves outside the checkpoint directory; refusing to read it"
            )
        self._inside.add(frag.file)

    def _read_fragment_into(self, atom: Atom, frag: Fragment, dst: torch.Tensor) -> None:
        """Read ``frag`` straight into ``dst`` (contiguous CPU, fragment's shape and dtype), then check it."""
        self._check_inside(atom, frag)
        view = tensor_bytes(dst)
        if len(view) != frag.nbytes:
            raise CorruptCheckpointError(
                f"{self.storage.path(self.step_dir)}/{frag.file}: fragment {frag.key} of {atom.name} should be "
                f"{len(view)} bytes, the manifest says {frag.nbytes}"
            )
        if frag.nbytes:
            reader = self._files.get(frag.file)
            if reader is None:
                reader = self._files[frag.file] = self.storage.range_reader(f"{self.step_dir}/{frag.file}")
            reader.read_into(frag.byte_offset, view)
        self.bytes_read += frag.nbytes
        if self.verify and self._checker is not None:
            self._checks.append(self._checker.submit(check_fragment, view, frag, atom, self.storage.path(self.step_dir)))
        elif self.verify:
            check_fragment(view, frag, atom, self.storage.path(self.step_dir))

    def read_into(self, atom: Atom, offsets: tuple[int, ...], out: torch.Tensor) -> None:
        """Fill ``out`` (CPU, the atom's dtype) with the block of ``atom`` starting at global
        ``offsets`` (``out.shape`` long). A fragment that lands whole on a contiguous part of
        ``out`` is read into it directly; others go through one scratch buffer each."""
        dtype = torch_dtype(atom.dtype)
        shape = tuple(out.shape)
        covered = 0
        for frag in atom.fragments:
            hit = _intersect(frag.offsets, frag.shape, offsets, shape)
            if hit is None:
                continue
            lo, size = hit
            dst = out
            for dim, (l, s) in enumerate(zip(lo, size)):
                dst = dst.narrow(dim, l - offsets[dim], s)
            if tuple(size) == frag.shape and dst.is_contiguous() and out.dtype == dtype:
                self._read_fragment_into(atom, frag, dst)
            else:
                src = torch.empty(frag.shape, dtype=dtype)
                self._read_fragment_into(atom, frag, src)
                for dim, (l, s) in enumerate(zip(lo, size)):
                    src = src.narrow(dim, l - frag.offsets[dim], s)
                dst.copy_(src)
            n = 1
            for s in size:
                n *= s
            covered += n
        if covered != out.numel():
            raise ValueError(f"{atom.name}: the stored fragments cover {covered} of the {out.numel()} elements requested")

    def read_full(self, name: str) -> torch.Tensor:
        """The whole atom ``name`` as a plain CPU tensor."""
        atom = self.manifest.atoms[name]
        out = torch.empty(atom.shape, dtype=torch_dtype(atom.dtype))
        if out.numel():
            self.read_into(atom, tuple(0 for _ in atom.shape), out)
        return out


def fill_tensor(name: str, target: torch.Tensor, atom: Atom, reader: FragmentReader,
                note: Callable[[str], None]) -> None:
    """Load ``atom`` into ``target`` (plain tensor or DTensor) in place.

    Raises ValueError naming the key and both shapes when the global shapes differ.
    """
    if tuple(target.shape) != atom.shape:
        raise ValueError(
            f"{name}: checkpoint shape {list(atom.shape)} does not match the model's {list(target.shape)}; "
            "the checkpoint belongs to a different model configuration"
        )
    block, _ = local_block(name, target)
    if block is None or block.local.numel() == 0:
        return
    if str(block.local.dtype).removeprefix("torch.") != atom.dtype:
        note(f"{name}: stored as {atom.dtype}, loaded into {block.local.dtype}")
    if block.local.is_contiguous() and block.local.device.type == "cpu" and str(block.local.dtype).removeprefix("torch.") == atom.dtype:
        with torch.no_grad():
            reader.read_into(atom, block.offsets, block.local)
        return
    tmp = torch.empty(block.shape, dtype=torch_dtype(atom.dtype))
    reader.read_into(atom, block.offsets, tmp)
    with torch.no_grad():
        block.local.copy_(tmp)
