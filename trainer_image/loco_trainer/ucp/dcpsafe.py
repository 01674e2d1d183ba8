"""Read a ``torch.distributed.checkpoint`` (DCP) directory without running code from it.

A DCP directory holds two kinds of pickles: ``.metadata`` (plain ``pickle``) and every non-tensor
entry of the state (``torch.save`` bytes). torch's own ``dcp_to_torch_save`` unpickles both with
no restriction, so importing a checkpoint from an untrusted source runs whatever it holds. Here
``.metadata`` goes through an unpickler that only knows DCP's metadata classes, and each
non-tensor entry through ``torch.load(weights_only=True)``; anything else is refused with a
:class:`UnsafePickleError` naming the file or entry.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

#: the DCP metadata file inside a checkpoint directory
METADATA_FILE = ".metadata"


class UnsafePickleError(ValueError):
    """A DCP checkpoint holds a pickled object the import does not allow (the message names it)."""


#: globals ``.metadata`` may name: DCP's own dataclasses and enums, and the torch/pathlib values in them
_METADATA_MODULES = {"torch.distributed.checkpoint.metadata"}
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other global is refused before it is looked up."""

    def __init__(self, fh: Any, where: str) -> None:
        super().__init__(fh)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module in _METADATA_MODULES and "." not in name:
            # only the classes defined there (not what it imports, e.g. dataclasses.field or Enum)
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(
            f"{self.where}: refusing to unpickle global {module}.{name}: a DCP metadata file only holds "
            "torch.distributed.checkpoint metadata; this one would construct or call something else"
        )


def read_metadata(path: str) -> Any:
    """The ``Metadata`` of the DCP file ``path`` (its ``.metadata``), via the restricted unpickler."""
    with open(path, "rb") as fh:
        try:
            return _MetadataUnpickler(fh, path).load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise UnsafePickleError(f"{path}: not a readable DCP metadata file ({type(exc).__name__}: {exc})") from exc


class _SafeReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` goes through :func:`read_metadata`."""

    refusal: UnsafePickleError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        path = os.fspath(self._get_metadata_path(rank))
        try:
            metadata = read_metadata(path)
        except UnsafePickleError as exc:
            self.refusal = exc
            raise
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(_EmptyStateDictLoadPlanner):
    """Loads every entry the checkpoint has; non-tensor entries with ``torch.load(weights_only=True)``."""

    refusal: UnsafePickleError | None = None

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            self.refusal = UnsafePickleError(
                f"{self.where}: refusing to import state entry {fqn!r}: it is a pickled object that "
                f"torch.load(weights_only=True) does not allow ({_why(exc)}). Only tensors and plain "
                "values (numbers, strings, lists, dicts) are imported; save other objects as plain values"
            )
            raise self.refusal from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _why(exc: BaseException) -> str:
    """The line of torch's weights-only error that names the refused global (its first lines are advice)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    named = [line for line in lines if "Unsupported" in line or "WeightsUnpickler error" in line]
    return (named or [line for line in lines if line] or [type(exc).__name__])[0]


def load_state(dcp_dir: str) -> dict[str, Any]:
    """Everything the DCP checkpoint ``dcp_dir`` holds, as a nested dict of CPU tensors and plain
    values (what ``dcp_to_torch_save`` then ``torch.load`` give, without unpickling code)."""
    reader, planner = _SafeReader(dcp_dir), _SafePlanner(dcp_dir)
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    except BaseException:
        # DCP wraps errors of its steps in a CheckpointException (a BaseException): surface the refusal itself
        refusal = reader.refusal or planner.refusal
        if refusal is not None:
            raise refusal from None
        raise
    return state


__all__ = ["METADATA_FILE", "UnsafePickleError", "load_state", "read_metadata"]
