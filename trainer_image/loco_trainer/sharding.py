"""Sharding inside a pod: FSDP2 (``fully_shard``) over the pod's processes, replicas across pods.

With ``nprocPerWorker = p > 1`` and ``n`` pods the world is an ``n x p`` device mesh
``(replicate, shard)``. :func:`shard_model` applies ``fully_shard`` with the pod's 1D ``shard``
sub-mesh: each parameter is a DTensor ``[Shard(0)]`` split over the pod's ``p`` processes; FSDP
reduce-scatters (averages) gradients inside the pod only, and what crosses pods is the algorithm's
business, as without sharding. (HSDP's 2D placement is not used: with its cross-pod all-reduce
switched off, FSDP2 holds the gradients back as if accumulating, and with it on, every algorithm
would be DDP.) Every pod holds its own copy of the shards; the checkpoint engine is told that
only pod 0's copy is written (``CheckpointEngine(dtensor_writer=...)``).

The algorithm sees a :class:`LocalView` of the model: plain parameters aliasing this process's
shards (the same shard on the same local rank of every pod), and its :class:`~loco_trainer.comm.Comm`
runs over the *replicate* group (local rank ``l`` of every pod). Every element-wise algorithm is
then exact on shards: DDP all-reduces local gradient shards, DiLoCo keeps global parameters and
outer momentum per shard. Bytes per rank drop by ``p`` (each process moves its ``1/p``).

Checkpoints: the model and inner optimizer are DTensors, so the universal checkpoint stores their
fragments directly. Algorithm state built from the view (DiLoCo's global parameters and outer
momentum) is re-wrapped as DTensors with the parameter's placement (:func:`state_to_dtensors`) so
that it is saved once, in fragments, and loads into any other layout (:func:`state_to_local`).
Mid-round the pods' local parameters and inner optimizer states differ: each pod ``k >= 1`` also
writes its own shards as ``replica/<k>/*`` atoms (``CheckpointEngine.save_async(per_replica=True)``).

The API refuses ``nprocPerWorker > 1`` with algorithms outside ``loco_contract.config.SHARDABLE_ALGORITHMS``
too; :func:`check_shardable` is the trainer's own guard for configs that did not pass through the API.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from loco_contract.config import SHARDABLE_ALGORITHMS


def check_shardable(algorithm: str, nproc_per_worker: int) -> None:
    """Raise ``ValueError`` naming the fields when ``algorithm`` cannot run sharded inside a pod."""
    if nproc_per_worker > 1 and algorithm not in SHARDABLE_ALGORITHMS:
        raise ValueError(
            f"algorithm.name {algorithm!r} does not support nprocPerWorker > 1 (FSDP sharding inside a pod; got "
            f"{nproc_per_worker}): use one of {', '.join(SHARDABLE_ALGORITHMS)} or set nprocPerWorker to 1"
        )


class Mesh:
    """The ``(replicate, shard)`` device mesh of an ``num_replicas x nproc`` world (collective to build)."""

    def __init__(self, device_type: str, num_replicas: int, nproc: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(device_type, (num_replicas, nproc), mesh_dim_names=("replicate", "shard"))

    @property
    def shard_mesh(self) -> Any:
        """This pod's processes: the mesh FSDP shards over."""
        return self.mesh["shard"]

    @property
    def replicate_group(self) -> Any:
        """Local rank ``l`` of every pod: the algorithm's group."""
        return self.mesh.get_group("replicate")


def shard_model(model: torch.nn.Module, mesh: Mesh) -> torch.nn.Module:
    """``fully_shard`` every transformer block (``transformer.h[i]`` when present) and the root
    over the pod's processes (see module docstring).
    Returns ``model`` (now an FSDPModule)."""
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(getattr(model, "transformer", None), "h", None)
    for block in blocks if isinstance(blocks, torch.nn.ModuleList) else ():
        fully_shard(block, mesh=mesh.shard_mesh)
    fully_shard(model, mesh=mesh.shard_mesh)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's (unpadded) block of a DTensor; the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return t
    local = t._local_tensor
    shape, _ = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    for dim, size in enumerate(shape):
        if local.shape[dim] != size:
            local = local.narrow(dim, 0, size)
    return local


class LocalView(torch.nn.Module):
    """What an algorithm sees of a sharded model: parameters that alias this process's shards.

    ``named_parameters()``/``parameters()`` yield the aliases in the model's order and names,
    ``buffers()`` the model's (unsharded) buffers. :meth:`pull_grads` makes each alias's ``grad``
    alias the local block of the real gradient (call it after backward, before the algorithm's
    ``after_backward``); in-place changes through the aliases change the real parameters/gradients.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._model = [model]  # not a submodule: the view owns nothing
        self._real = [(n, p) for n, p in model.named_parameters()]
        self._aliases = {n: torch.nn.Parameter(_local(p.data), requires_grad=p.requires_grad) for n, p in self._real}

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.nn.Parameter]]:  # type: ignore[override]
        for n, _ in self._real:
            yield prefix + n, self._aliases[n]

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:  # type: ignore[override]
        for _, p in self.named_parameters():
            yield p

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:  # type: ignore[override]
        return self._model[0].buffers(recurse)

    def real(self, name: str) -> torch.Tensor:
        """The model's (DTensor) parameter called ``name``."""
        return dict(self._real)[name]

    def pull_grads(self) -> None:
        for n, p in self._real:
            self._aliases[n].grad = None if p.grad is None else _local(p.grad)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._model[0](*args, **kwargs)


def _as_dtensor(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def _slice_for(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    out = full
    for dim, (off, size) in enumerate(zip(offsets, shape)):
        out = out.narrow(dim, off, size)
    return out.clone()


def _map_state(state: Any, view: LocalView, fn) -> Any:
    """Apply ``fn(tensor, real_param)`` to the per-parameter tensors of an algorithm state:
    values of a dict keyed by exactly the parameter names, and the per-parameter entries of a
    ``torch.optim`` state dict (``{"state": {index: {...}}, "param_groups": [...]}``) whose indices
    follow the view's parameter order. Anything else is returned unchanged."""
    trainable = [n for n, p in view.named_parameters() if p.requires_grad]
    if isinstance(state, dict):
        if state and set(state) == set(trainable) and all(isinstance(v, torch.Tensor) for v in state.values()):
            return {n: fn(v, view.real(n)) for n, v in state.items()}
        if set(state) == {"state", "param_groups"} and isinstance(state["state"], dict):
            new_state = {}
            for idx, entry in state["state"].items():
                real = view.real(trainable[int(idx)])
                new_state[idx] = {k: fn(v, real) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in entry.items()}
            return {"state": new_state, "param_groups": state["param_groups"]}
        return {k: _map_state(v, view, fn) for k, v in state.items()}
    return state


def state_to_dtensors(state: Any, view: LocalView) -> Any:
    """The algorithm state with per-parameter shard tensors wrapped as DTensors (saved in fragments)."""
    return _map_state(state, view, _as_dtensor)


def state_to_local(state: Any, view: LocalView) -> Any:
    """A loaded (full-tensor) algorithm state cut to this process's shards (inverse of the above)."""
    return _map_state(state, view, _slice_for)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


__all__ = ["LocalView", "Mesh", "SHARDABLE_ALGORITHMS", "check_shardable", "is_sharded", "shard_model",
           "state_to_dtensors", "state_to_local"]
