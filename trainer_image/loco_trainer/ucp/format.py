"""The universal checkpoint (UCP) format: versioned dataclasses keyed by fully qualified name.

This module is pure (no I/O, no torch.distributed): it describes what a committed checkpoint
holds and turns it to and from JSON. ``docs/checkpoint-format.md`` is the human-readable spec;
the two must agree (``FORMAT_VERSION`` is bumped on any incompatible change).

Vocabulary
    atom      one logical tensor at its global (unsharded) shape: a model parameter or buffer
              (``model/<fqn>``), one optimizer state of a parameter (``optim/<fqn>/<state>``), a
              tensor inside the algorithm or extra state (``extra/<path>``), or a tensor of one
              rank's private state (``rank/<r>/<path>``).
    fragment  a rectangular block of an atom (``offsets`` + ``shape`` in global coordinates),
              stored contiguously, row-major, in one safetensors data file under ``key``.

The fragments of an atom tile it exactly once (no gaps, no overlap); a loader intersects the
fragments with the block it needs, so any saved layout loads into any current one.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

#: Version of this format; readers refuse a manifest with a larger major version.
FORMAT_VERSION = 1
#: The ``format`` field of every manifest.
FORMAT_NAME = "loco-ucp"

MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
DATA_DIR = "data"
INDEX_DIR = "index"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"

#: safetensors dtype names <-> torch dtype names (the subset Loco writes)
DTYPES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",  # numpy's RNG state is uint32
}
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,
}


class FormatError(ValueError):
    """A manifest or index that does not follow this format (the message names the field)."""


class UnsafePathError(FormatError):
    """A file a manifest names would be read from outside its checkpoint directory (an absolute
    path, a ``..`` component, or a symlink pointing out); the message names the field and value."""


def check_relative_name(value: str, field_name: str, where: str) -> None:
    """Raise :class:`UnsafePathError` unless ``value`` is a plain relative ``/``-separated path that
    stays inside the checkpoint directory. Pure: symlinks are checked where files are opened.

    Writers only produce ``data/rank-RRRRR.safetensors``; anything not in normal form is refused
    rather than interpreted, so a crafted manifest cannot make a loader read an arbitrary file.
    """
    problem = None
    if not value:
        problem = "is empty"
    elif value.startswith("/") or "\\" in value or ":" in value:
        problem = "is absolute or names a drive/URL"
    elif ".." in value.split("/"):
        problem = "has a '..' component"
    elif posixpath.normpath(value) != value:
        problem = f"is not in normal form (normalised: {posixpath.normpath(value)!r})"
    if problem:
        raise UnsafePathError(
            f"{where}: {field_name} is {value!r}, which {problem}; a fragment file must be a relative path inside "
            "the checkpoint directory (e.g. 'data/rank-00000.safetensors'). Refusing to read this checkpoint"
        )


def check_file_names(manifest: "Manifest", where: str) -> None:
    """Every file ``manifest`` names (``files`` keys, fragment ``file`` fields) passes :func:`check_relative_name`."""
    for atom_name, atom in manifest.atoms.items():
        for i, frag in enumerate(atom.fragments):
            check_relative_name(frag.file, f"atoms[{atom_name!r}].fragments[{i}].file", where)
    for name in manifest.files:
        check_relative_name(name, f"files[{name!r}]", where)


def step_dir_name(step: int) -> str:
    """``step-00000040``: the directory name of the committed checkpoint of ``step``."""
    return f"{STEP_PREFIX}{step:08d}"


def tmp_dir_name(step: int) -> str:
    """``.tmp-step-00000040``: where the checkpoint of ``step`` is written before its commit."""
    return TMP_PREFIX + step_dir_name(step)


def data_file_name(rank: int) -> str:
    """Data file of ``rank`` relative to the checkpoint directory."""
    return f"{DATA_DIR}/rank-{rank:05d}.safetensors"


def index_file_name(rank: int) -> str:
    """Fragment index of ``rank`` relative to the checkpoint directory."""
    return f"{INDEX_DIR}/rank-{rank:05d}.json"


def parse_step_dir(name: str) -> int | None:
    """The step of a committed directory name, or None for anything else."""
    if not name.startswith(STEP_PREFIX):
        return None
    digits = name[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() and len(digits) == 8 else None


@dataclass(frozen=True)
class Fragment:
    """One stored block of an atom."""

    #: data file holding the block, relative to the checkpoint directory
    file: str
    #: tensor name of the block inside that safetensors file
    key: str
    #: global index of the block's first element, one entry per dimension
    offsets: tuple[int, ...]
    #: the block's shape (row-major, contiguous in the file)
    shape: tuple[int, ...]
    #: byte offset of the block inside the file (absolute, header included)
    byte_offset: int
    #: length of the block in bytes
    nbytes: int
    #: zlib.crc32 of the block's bytes
    crc32: int
    #: rank that wrote the block
    rank: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Fragment":
        try:
            return cls(
                file=str(d["file"]), key=str(d["key"]), offsets=tuple(int(x) for x in d["offsets"]),
                shape=tuple(int(x) for x in d["shape"]), byte_offset=int(d["byteOffset"]),
                nbytes=int(d["nbytes"]), crc32=int(d["crc32"]), rank=int(d["rank"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"fragment {d!r}: missing or invalid field ({exc})") from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "key": self.key, "offsets": list(self.offsets), "shape": list(self.shape),
            "byteOffset": self.byte_offset, "nbytes": self.nbytes, "crc32": self.crc32, "rank": self.rank,
        }


@dataclass(frozen=True)
class Atom:
    """One logical tensor at its global shape and the fragments that tile it."""

    #: ``model/<fqn>``, ``optim/<fqn>/<state>``, ``extra/<path>``, ``rank/<r>/<path>`` or
    #: ``replica/<k>/model/<fqn>``, ``replica/<k>/optim/<fqn>/<state>`` (replica ``k``'s own copy)
    name: str
    #: global (unsharded) shape
    shape: tuple[int, ...]
    #: torch dtype name (``float32``, ``bfloat16``, ...)
    dtype: str
    #: the blocks that tile the tensor
    fragments: tuple[Fragment, ...]
    #: how the tensor was laid out at save: ``replicated`` (one copy written) or ``sharded``
    #: (each rank wrote its block), with the DTensor placements when it was one
    layout: str = "replicated"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def check_tiling(self) -> None:
        """Raise :class:`FormatError` unless the fragments tile the atom exactly (sizes, bounds)."""
        total = 0
        for f in self.fragments:
            if len(f.offsets) != len(self.shape) or len(f.shape) != len(self.shape):
                raise FormatError(f"atom {self.name}: fragment {f.key} has rank {len(f.shape)}, atom has {len(self.shape)}")
            for dim, (o, s, g) in enumerate(zip(f.offsets, f.shape, self.shape)):
                if o < 0 or o + s > g:
                    raise FormatError(f"atom {self.name}: fragment {f.key} dim {dim} spans {o}..{o + s}, atom size {g}")
            if f.nbytes != f.numel * ITEMSIZE[self.dtype]:
                raise FormatError(f"atom {self.name}: fragment {f.key} has {f.nbytes} bytes, expected {f.numel * ITEMSIZE[self.dtype]}")
            total += f.numel
        if total != self.numel:
            raise FormatError(f"atom {self.name}: fragments cover {total} elements, the tensor has {self.numel}")

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "Atom":
        try:
            dtype = str(d["dtype"])
            if dtype not in DTYPES:
                raise FormatError(f"atom {name}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
            return cls(
                name=name, shape=tuple(int(x) for x in d["shape"]), dtype=dtype,
                fragments=tuple(Fragment.from_json(f) for f in d["fragments"]), layout=str(d.get("layout", "replicated")),
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"atom {name}: missing or invalid field ({exc})") from exc

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "layout": self.layout,
                "fragments": [f.to_json() for f in self.fragments]}


@dataclass(frozen=True)
class WorldLayout:
    """How the job was laid out when it saved."""

    #: worker pods (replicas)
    num_replicas: int = 1
    #: processes per pod
    nproc_per_worker: int = 1
    #: free-form description of the parallelism (``fsdp``, ``hsdp``, ``ddp``, ``replicated``)
    parallelism: str = "replicated"

    @property
    def world_size(self) -> int:
        return self.num_replicas * self.nproc_per_worker

    def describe(self) -> str:
        return f"{self.num_replicas}x{self.nproc_per_worker} ({self.parallelism})"

    def to_json(self) -> dict[str, Any]:
        return {"numReplicas": self.num_replicas, "nprocPerWorker": self.nproc_per_worker,
                "worldSize": self.world_size, "parallelism": self.parallelism}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WorldLayout":
        try:
            return cls(int(d["numReplicas"]), int(d["nprocPerWorker"]), str(d.get("parallelism", "replicated")))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"layout {d!r}: missing or invalid field ({exc})") from exc


@dataclass(frozen=True)
class Manifest:
    """The commit record of one checkpoint (``manifest.json``, written last)."""

    #: inner step the checkpoint was taken after
    step: int
    #: world layout at save
    layout: WorldLayout
    #: every atom by name
    atoms: dict[str, Atom]
    #: the algorithm that saved (``ddp``, ``diloco``, ...) or "" when unknown
    algorithm: str = ""
    #: optimizer param groups: hyperparameters, with ``params`` as a list of parameter FQNs
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    #: the optimizer's per-parameter state tree (``{fqn: {state: value}}``), tensors replaced by
    #: ``{"__atom__": "optim/<fqn>/<state>"}`` (see tree.py); non-tensor states stay inline
    optim_state: Any = None
    #: the algorithm's own state tree (outer optimizer, global parameters, ...), same encoding
    algorithm_state: Any = None
    #: the caller's extra state tree (same on every rank; rank 0's copy is saved), same encoding
    extra: Any = None
    #: per-rank private state trees (RNG, data position), same encoding, by rank
    rank_states: dict[int, Any] = field(default_factory=dict)
    #: data files with their total size in bytes
    files: dict[str, int] = field(default_factory=dict)
    #: UTC time of the commit, ISO 8601
    time: str = ""
    #: free-form metadata from the caller (job name, config hash, ...)
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "formatVersion": self.format_version, "step": self.step, "time": self.time,
            "algorithm": self.algorithm, "layout": self.layout.to_json(), "meta": self.meta,
            "files": dict(self.files), "paramGroups": self.param_groups, "optimState": self.optim_state,
            "algorithmState": self.algorithm_state, "extra": self.extra,
            "rankStates": {str(r): s for r, s in sorted(self.rank_states.items())},
            "atoms": {name: a.to_json() for name, a in sorted(self.atoms.items())},
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=False).encode()

    @classmethod
    def loads(cls, data: bytes | str, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise FormatError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: 'format' is {d.get('format') if isinstance(d, dict) else None!r}, expected {FORMAT_NAME!r}")
        version = d.get("formatVersion")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FormatError(
                f"{where}: formatVersion {version!r} is newer than this reader ({FORMAT_VERSION}); upgrade loco to read it"
            )
        try:
            manifest = cls(
                step=int(d["step"]), layout=WorldLayout.from_json(d["layout"]),
                atoms={name: Atom.from_json(name, a) for name, a in d["atoms"].items()},
                algorithm=str(d.get("algorithm", "")), param_groups=list(d.get("paramGroups", [])),
                optim_state=d.get("optimState"), algorithm_state=d.get("algorithmState"), extra=d.get("extra"), rank_states={int(r): s for r, s in d.get("rankStates", {}).items()},
                files={str(k): int(v) for k, v in d.get("files", {}).items()}, time=str(d.get("time", "")),
                meta=dict(d.get("meta", {})), format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{where}: missing or invalid field ({exc!r})") from exc
        check_file_names(manifest, where)
        return manifest

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def model_atoms(self) -> dict[str, Atom]:
        return {n[len("model/"):]: a for n, a in self.atoms.items() if n.startswith("model/")}

    def saved_replicas(self) -> list[int]:
        """Replica indices whose own model and inner optimizer state this checkpoint holds: 0 (the
        shared ``model/*``, ``optim/*`` atoms) and every ``k`` with ``replica/<k>/*`` atoms."""
        found = {0}
        for name in self.atoms:
            if name.startswith(REPLICA_PREFIX + "/"):
                found.add(int(name.split("/", 2)[1]))
        return sorted(found)


#: prefix of the atoms holding replica ``k``'s own copy of ``model/*`` and ``optim/*`` (``k >= 1``)
REPLICA_PREFIX = "replica"


def replica_atom(replica: int, name: str) -> str:
    """Atom name of replica ``replica``'s copy of the shared atom ``name`` (``model/...`` or
    ``optim/...``): replica 0's copy is the shared atom itself, replica ``k``'s is
    ``replica/<k>/<name>``. Saved only for algorithms whose replicas differ between syncs."""
    return name if replica == 0 else f"{REPLICA_PREFIX}/{replica}/{name}"


def atoms_from_fragments(
    fragments: list[tuple[str, tuple[int, ...], str, str, Fragment]],
) -> dict[str, Atom]:
    """Group ``(atom name, global shape, dtype, layout, fragment)`` records of every rank into atoms.

    Raises :class:`FormatError` when ranks disagree on an atom's shape or dtype, or when the
    fragments do not tile it exactly.
    """
    grouped: dict[str, list] = {}
    meta: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for name, shape, dtype, layout, frag in fragments:
        if name in meta and meta[name][:2] != (shape, dtype):
            raise FormatError(
                f"atom {name}: rank {frag.rank} saved shape {list(shape)} {dtype}, another rank {list(meta[name][0])} {meta[name][1]}"
            )
        meta.setdefault(name, (shape, dtype, layout))
        grouped.setdefault(name, []).append(frag)
    atoms = {}
    for name, frags in grouped.items():
        shape, dtype, layout = meta[name]
        atom = Atom(name, shape, dtype, tuple(sorted(frags, key=lambda f: f.offsets)), layout)
        atom.check_tiling()
        atoms[name] = atom
    return atoms


def manifest_summary(m: Manifest) -> dict[str, Any]:
    """A compact JSON-ready summary (what ``loco ckpt inspect`` shows)."""
    groups: dict[str, int] = {}
    for name, a in m.atoms.items():
        kind = name.split("/", 1)[0]
        groups[kind] = groups.get(kind, 0) + a.nbytes
    return {
        "step": m.step, "time": m.time, "algorithm": m.algorithm, "layout": m.layout.to_json(),
        "formatVersion": m.format_version, "bytes": m.total_bytes, "bytesByKind": groups,
        "numParameters": sum(a.numel for a in m.model_atoms().values()), "files": len(m.files),
        "parameters": [
            {"name": n, "shape": list(a.shape), "dtype": a.dtype, "fragments": len(a.fragments), "layout": a.layout}
            for n, a in sorted(m.model_atoms().items())
        ],
    }

