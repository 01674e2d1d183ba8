"""Loco's universal checkpoint (UCP): one format every layout saves to and loads from.

* :mod:`.format`   the versioned, FQN-keyed manifest/atom/fragment dataclasses (pure, no I/O)
* :mod:`.storage`  the fsspec storage layer (local path, PVC, object stores later)
* :mod:`.engine`   :class:`CheckpointEngine`: async sharded save, all-ranks commit, reshard-on-load
* :mod:`.verify`   is a checkpoint whole; the newest valid one to resume from, and the ones skipped
* :mod:`.fence`    who may commit to a checkpoint directory now (the job's uid and newest membership epoch)
* :mod:`.ownership` an earlier job's checkpoints in a new job's directory: set aside, or adopted
* :mod:`.tools`    inspect / verify / convert (DCP import, consolidated torch export)

The format is specified in ``docs/checkpoint-format.md``.
"""

from .catalog import CheckpointInfo, list_checkpoints, read_info
from .engine import (
    CheckpointEngine, CheckpointLoadError, CheckpointSaveError, LoadedState, Reason, SaveHandle, load_into,
    map_algorithm_state, read_rank_state,
)
from .fence import Fence, StaleWriterError, read_fence
from .ownership import PreviousJob
from .format import FORMAT_VERSION, Atom, FormatError, Fragment, Manifest, UnsafePathError, WorldLayout
from .storage import Storage
from .tensorio import CorruptCheckpointError
from .verify import Selection, SkippedCheckpoint, SkipReason, newest_valid, verify_checkpoint

__all__ = [
    "FORMAT_VERSION", "Atom", "CheckpointEngine", "CheckpointInfo", "CheckpointLoadError", "CheckpointSaveError",
    "CorruptCheckpointError", "Fence", "FormatError", "StaleWriterError", "read_fence", "Fragment", "LoadedState", "Manifest", "PreviousJob", "Reason", "SaveHandle", "Storage",
    "Selection", "SkipReason", "SkippedCheckpoint", "UnsafePathError", "WorldLayout", "list_checkpoints", "load_into",
    "map_algorithm_state", "newest_valid", "read_info", "read_rank_state", "verify_checkpoint",
]
