"""Offline tools over universal checkpoints: inspect, verify, convert (used by ``loco ckpt``).

Every function takes a directory that is either a job's checkpoint root (holding ``step-N``
directories) or one ``step-N`` directory, as a local path or fsspec URL.
"""

from __future__ import annotations

import posixpath
from typing import Any

import torch

from . import tree
from .catalog import CheckpointInfo, list_checkpoints, read_info
from .format import (
    LATEST_FILE, MANIFEST_FILE, TMP_PREFIX, Manifest, WorldLayout, data_file_name, manifest_summary,
    parse_step_dir, replica_atom, step_dir_name,
)
from .layout import FragmentReader
from .storage import Storage
from .tensorio import dtype_name, write_safetensors
from .verify import VerifyReport, check_one, verify_checkpoint


def open_target(url: str) -> tuple[Storage, list[CheckpointInfo], list[str]]:
    """``(root storage, committed checkpoints, incomplete directory names)`` for a root or a step dir."""
    storage = Storage(url)
    if storage.exists(MANIFEST_FILE):
        parent, name = posixpath.split(storage.root.rstrip("/"))
        root = Storage(parent, storage.fs)
        return root, [read_info(root, name)], []
    if not storage.exists(""):
        raise FileNotFoundError(f"{url}: no such checkpoint directory")
    incomplete = [n for n in storage.listdir("") if n.startswith(TMP_PREFIX)]
    invalid = [n for n in storage.listdir("") if parse_step_dir(n) is not None]
    committed = list_checkpoints(storage)
    good = {c.dir for c in committed}
    incomplete += [n for n in invalid if n not in good]
    return storage, committed, incomplete


def inspect(url: str) -> dict[str, Any]:
    """JSON-ready description: every committed checkpoint's summary, the ``latest`` pointer and
    incomplete directories (which are never loaded)."""
    storage, committed, incomplete = open_target(url)
    latest = None
    if storage.exists(LATEST_FILE):
        latest = storage.read_bytes(LATEST_FILE).decode().strip()
    return {
        "root": storage.path(),
        "latest": latest,
        "checkpoints": [{"dir": c.dir, "valid": True, "checksumsVerified": False, **manifest_summary(c.manifest)} for c in committed],
        "incomplete": incomplete,
    }


def verify(url: str) -> list[VerifyReport]:
    """Verify every committed checkpoint under ``url`` (or the one it names), by step. A ``step-N``
    whose manifest exists but is refused (not parseable, an unsafe file name) is reported too."""
    storage, committed, incomplete = open_target(url)
    reports = [verify_checkpoint(storage, c) for c in committed]
    for name in incomplete:
        if parse_step_dir(name) is None or not storage.exists(f"{name}/{MANIFEST_FILE}"):
            continue  # never committed: inspect lists it as incomplete
        _, why = check_one(storage, name, checksums=False)
        if why is not None:
            reports.append(VerifyReport(name, why.step, [why.message], [why.reason]))
    return sorted(reports, key=lambda r: r.step)


def pick(url: str, step: int | None = None) -> tuple[Storage, CheckpointInfo]:
    """The checkpoint to convert: ``step`` or the newest committed one."""
    storage, committed, _ = open_target(url)
    if not committed:
        raise FileNotFoundError(f"{url}: no committed checkpoint")
    if step is None:
        return storage, committed[-1]
    for c in committed:
        if c.step == step:
            return storage, c
    raise FileNotFoundError(f"{url}: no committed checkpoint of step {step} (have {[c.step for c in committed]})")


def consolidated_state(storage: Storage, info: CheckpointInfo, verify_crc: bool = True) -> dict[str, Any]:
    """One plain state dict for use outside Loco::

        {"step": int, "algorithm": str, "layout": {...},
         "model": {fqn: tensor}, "optim": {"state": {fqn: {name: value}}, "param_groups": [...]},
         "algorithm_state": ..., "extra_state": ..., "rank_states": {rank: ...},
         "replicas": {k: {"model": {...}, "optim": {"state": {...}}}}}

    ``model``/``optim`` are replica 0's (the shared atoms); ``replicas`` holds the own model and
    inner optimizer state of every other replica saved with ``per_replica`` (empty otherwise).
    ``optim`` has the shape of ``torch.distributed.checkpoint.state_dict.get_state_dict``'s
    optimizer dict (FQN keys), so ``set_state_dict`` takes it back.
    """
    m = info.manifest
    reader = FragmentReader(storage, info.dir, m, verify=verify_crc)
    return {
        "step": m.step, "algorithm": m.algorithm, "layout": m.layout.to_json(),
        "model": {fqn: reader.read_full(f"model/{fqn}") for fqn in m.model_atoms()},
        "optim": {"state": tree.decode(m.optim_state, reader.read_full) or {}, "param_groups": m.param_groups},
        "algorithm_state": tree.decode(m.algorithm_state, reader.read_full),
        "extra_state": tree.decode(m.extra, reader.read_full),
        "rank_states": {r: tree.decode(s, reader.read_full) for r, s in m.rank_states.items()},
        "replicas": {
            k: {"model": {fqn: reader.read_full(replica_atom(k, f"model/{fqn}")) for fqn in m.model_atoms()},
                "optim": {"state": tree.decode(m.optim_state, lambda n, _k=k: reader.read_full(replica_atom(_k, n))) or {}}}
            for k in m.saved_replicas() if k > 0
        },
    }


def to_torch(url: str, out_path: str, step: int | None = None) -> CheckpointInfo:
    """Write the consolidated state of the newest (or ``step``) checkpoint with ``torch.save``."""
    storage, info = pick(url, step)
    state = consolidated_state(storage, info)
    with Storage(out_path).fs.open(out_path, "wb") as fh:
        torch.save(state, fh)
    return info


def write_consolidated(out_url: str, step: int, model: dict[str, torch.Tensor], optim: dict[str, Any] | None = None,
                       extra: Any = None, algorithm: str = "", algorithm_state: Any = None, meta: dict[str, Any] | None = None) -> CheckpointInfo:
    """Write full (unsharded) tensors as a committed single-file checkpoint ``step`` under ``out_url``.

    Used by the importers; the result loads into any layout like any other checkpoint.
    """
    from .engine import _json_safe
    from .format import Fragment, atoms_from_fragments, tmp_dir_name
    import datetime as dt

    storage = Storage(out_url)
    storage.makedirs("")
    _, model_tensors = tree.encode(model, "model")
    optim_tree, optim_tensors = tree.encode((optim or {}).get("state", {}), "optim")
    algo_tree, algo_tensors = tree.encode(algorithm_state, "algorithm")
    extra_tree, extra_tensors = tree.encode(extra, "extra")
    tensors = {**model_tensors, **optim_tensors, **algo_tensors, **extra_tensors}
    tmp = tmp_dir_name(step)
    storage.remove(tmp)
    storage.makedirs(f"{tmp}/data")
    rel = data_file_name(0)
    items = [(f"{n}@" + ",".join("0" for _ in t.shape), t.detach().cpu().contiguous()) for n, t in tensors.items()]
    fh = storage.open_write(f"{tmp}/{rel}")
    try:
        blocks = write_safetensors(fh, items, {"format": "loco-ucp", "step": str(step), "rank": "0"})
    finally:
        storage.close_durable(fh)
    storage.sync_dir(f"{tmp}/data")
    storage.sync_dir(tmp)  # data durable before the manifest says the checkpoint is whole
    records = []
    for (name, t), b in zip(tensors.items(), blocks):
        zeros = tuple(0 for _ in t.shape)
        records.append((name, tuple(t.shape), dtype_name(t.dtype), "replicated",
                        Fragment(rel, b.key, zeros, tuple(t.shape), b.byte_offset, b.nbytes, b.crc32, 0)))
    manifest = Manifest(
        step=step, layout=WorldLayout(1, 1, "consolidated"), atoms=atoms_from_fragments(records), algorithm=algorithm,
        param_groups=_json_safe((optim or {}).get("param_groups", [])), optim_state=optim_tree,
        algorithm_state=algo_tree, extra=extra_tree, files={rel: storage.size(f"{tmp}/{rel}")},
        time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"), meta=meta or {},
    )
    storage.write_bytes(f"{tmp}/{MANIFEST_FILE}", manifest.dumps())
    storage.commit(tmp, step_dir_name(step))
    storage.write_bytes(LATEST_FILE, (step_dir_name(step) + "\n").encode())
    return read_info(storage, step_dir_name(step))


def from_dcp(dcp_dir: str, out_url: str, step: int | None = None) -> CheckpointInfo:
    """Import a ``torch.distributed.checkpoint`` directory as a committed UCP checkpoint.

    The DCP state is read with :func:`.dcpsafe.load_state` (what torch's ``dcp_to_torch_save`` gives,
    but refusing any pickled object other than tensors and plain values, with
    :class:`.dcpsafe.UnsafePickleError`, a ValueError). Recognised layouts:
    ``{"model": {fqn: tensor}, "optim"|"optimizer": {...}, ...}`` (what ``get_state_dict`` gives;
    the rest becomes extra state, an integer ``step`` sets the step) or a flat ``{fqn: tensor}``
    model state dict. An optimizer dict keyed by parameter index (``optimizer.state_dict()``) is
    re-keyed by FQN using the model's key order when the counts agree.
    """
    import os

    from .dcpsafe import METADATA_FILE, load_state

    local = Storage(dcp_dir)
    if not local.is_local:
        raise ValueError(f"--from-dcp needs a local directory (got {dcp_dir}); copy it locally first")
    if not os.path.isfile(os.path.join(dcp_dir, METADATA_FILE)):
        raise FileNotFoundError(f"{dcp_dir}: no .metadata file, so it is not a torch.distributed.checkpoint directory")
    # never unpickle code: restricted metadata, torch.load(weights_only=True) for non-tensor entries
    state = load_state(dcp_dir)
    if not isinstance(state, dict):
        raise ValueError(f"{dcp_dir}: the checkpoint holds a {type(state).__name__}, expected a dict")
    if isinstance(state.get("model"), dict):
        model = _flatten(state.pop("model"))
        optim = state.pop("optim", None) or state.pop("optimizer", None)
    elif all(isinstance(v, torch.Tensor) for v in state.values()):
        model, optim, state = state, None, {}
    else:
        raise ValueError(
            f"{dcp_dir}: expected top-level keys 'model' (and optionally 'optim') or a flat model state dict; "
            f"found {sorted(state)[:8]}"
        )
    if optim is not None:
        optim = _fqn_keyed_optim(optim, list(model))
    if step is None:
        saved_step = state.get("step")
        step = int(saved_step) if isinstance(saved_step, (int, torch.Tensor)) else 0
    return write_consolidated(out_url, step, model, optim, extra=state or None, meta={"importedFrom": f"dcp:{os.path.abspath(dcp_dir)}"})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = v
        else:
            raise ValueError(f"model entry {key!r} is a {type(v).__name__}, expected a tensor")
    return out


def _fqn_keyed_optim(optim: dict[str, Any], fqns: list[str]) -> dict[str, Any]:
    state = dict(optim.get("state", {}))
    groups = [dict(g) for g in optim.get("param_groups", [])]
    if state and all(isinstance(k, int) for k in state):
        n_params = sum(len(g.get("params", [])) for g in groups)
        param_fqns = [f for f in fqns]
        if n_params != len(param_fqns):
            raise ValueError(
                f"optimizer state is keyed by index over {n_params} parameters but the model has {len(param_fqns)} "
                "tensors; save the optimizer with get_state_dict (FQN keys) instead"
            )
        state = {param_fqns[k]: v for k, v in state.items()}
        for g in groups:
            g["params"] = [param_fqns[i] for i in g["params"]]
    return {"state": state, "param_groups": groups}
