"""Streaming DiLoCo (Douillard et al., 2025, arXiv:2501.18512): DiLoCo with fragments, overlap and
quantised exchange.

Update rule. The parameters are split into P fragments (layers in a strided pattern: layer k goes to
fragment k mod P, see :func:`fragment_assignment`). Fragment p is synchronised once every H inner
steps, at inner-step counts t ≡ (p+1)·H/P (mod H), so only 1/P of the model is exchanged at a time
(peak bandwidth ÷ P). For fragment p with global parameters θ_p and local parameters θᵢ,p:

    at t_send = t_sync − τ:   Δᵢ,p = θ_p − θᵢ,p(t_send)            started asynchronously, in the
                                                                     wire precision q (fp32/bf16/E3M0)
    (τ more inner steps run while the exchange is in flight)
    at t_sync:                Δ_p = (1/n) Σᵢ deq(q(Δᵢ,p))           accumulated in fp32
                              θ_p ← OuterSGD-Nesterov(θ_p, Δ_p)       as in DiLoCo (lr η, momentum μ)
                              θᵢ,p ← (1−α)·θ_p + α·θᵢ,p(t_sync)       merge with the local progress

With P = 1, τ = 0, α = 0 and fp32 exchange this is exactly DiLoCo.

Symbols -> arguments: H -> ``sync_every``, P -> ``fragments``, τ -> ``overlap_steps``, α ->
``mixing_factor``, q -> ``quantization`` (``none`` | ``bf16`` | ``e3m0``), η -> ``outer_lr``,
μ -> ``outer_momentum``. Constraints: H divisible by P, τ < H/P (at most one fragment in flight).

Wire: fp32 outer gradients are averaged with an all-reduce. Quantised (bf16/E3M0) ones, with 2 workers, are
all-gathered and averaged in fp32 on every rank; with n >= 3 workers they go as a reduce-scatter then an
all-gather, so the bytes a rank sends stay bounded as n grows: each rank encodes the n chunks of its outer
gradient and sends chunk j to rank j (an all-to-all), averages in fp32 the n encodings of its own chunk, encodes
that average and all-gathers it. Accumulation is always in fp32, and every rank decodes the same payloads, so
all compute bit-identical global parameters; the price is a second rounding (of the average). E3M0 chunks take
one scale per 128 elements (``quant.pack_flat``). Bytes per inner step per rank (N parameters, T tensors):

    none: 2(n−1)/n · 4N / H
    n = 2:   bf16: 2N / H                 e3m0: (N/2 + 4T) / H                           (+≤1 byte/fragment)
    n >= 3:  bf16: 2(n−1)/n · 2N / H      e3m0: 2(n−1)/n · (N/2 + 4N/128) / H  (< 1.07 N/H for any n)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence, Unpack

import torch

from loco_trainer import quant
from loco_trainer.algorithms._outer import OuterArgs, outer_args
from loco_trainer.algorithms.diloco import DiLoCo
from loco_trainer.comm import Comm, CommHandle, broadcast_flat, flatten, unflatten_into


def fragment_assignment(param_names: Sequence[str], fragments: int) -> list[int]:
    """The fragment of each parameter: parameters are grouped into *layers* (the module path up to
    the first numeric component, e.g. ``transformer.h.3``; otherwise the parameter's module), layers
    are numbered in order of first appearance, and layer k goes to fragment k mod P (strided).
    Pure function of the names, so identical on every rank."""
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1 (got {fragments})")
    layers: dict[str, int] = {}
    out = []
    for name in param_names:
        parts = name.split(".")
        digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        key = ".".join(parts[: digit + 1]) if digit is not None else (".".join(parts[:-1]) or name)
        out.append(layers.setdefault(key, len(layers)) % fragments)
    if len(layers) < fragments:
        raise ValueError(
            f"fragments={fragments} but the model has only {len(layers)} layer groups: lower algorithm.fragments "
            f"to at most {len(layers)}"
        )
    return out


def _chunks(flat: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``flat`` cut into ``n`` chunks of ``ceil(len/n)`` elements, the last zero-padded."""
    length = -(-flat.numel() // n)
    return list(torch.nn.functional.pad(flat, (0, n * length - flat.numel())).view(n, length).unbind(0))


@dataclasses.dataclass
class _Pending:
    """An outer-gradient exchange in flight for one fragment."""

    fragment: int
    sync_t: int
    handle: CommHandle | None
    average: list[torch.Tensor] | None = None  # set once resolved (fp32, one per fragment tensor)


class StreamingDiLoCo(DiLoCo):
    """Streaming DiLoCo (see the module docstring).

    Args (beyond :class:`DiLoCo`'s): fragments (P), overlap_steps (τ), mixing_factor (α),
    quantization (``none`` | ``bf16`` | ``e3m0``).
    """

    name = "streaming-diloco"

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer | None, comm: Comm, *,
                 nesterov: bool = True, fragments: int = 2, overlap_steps: int = 1, mixing_factor: float = 0.5,
                 quantization: str = "e3m0", bucket_mb: float = 32.0, offload: bool = True,
                 **outer: Unpack[OuterArgs]) -> None:
        sync_every = outer["sync_every"]
        if fragments < 1:
            raise ValueError(f"fragments (P) must be >= 1 (got {fragments})")
        if sync_every % fragments != 0:
            raise ValueError(
                f"syncEvery ({sync_every}) must be a multiple of fragments ({fragments}) so fragments sync every "
                f"syncEvery/fragments steps: set syncEvery to {max(1, sync_every // fragments) * fragments}"
            )
        if not 0 <= overlap_steps < sync_every // fragments:
            raise ValueError(
                f"overlapSteps ({overlap_steps}) must be >= 0 and < syncEvery/fragments ({sync_every // fragments}), "
                f"so at most one fragment is in flight"
            )
        if not 0.0 <= mixing_factor <= 1.0:
            raise ValueError(f"mixingFactor must be in [0, 1] (got {mixing_factor})")
        quantization = getattr(quantization, "value", quantization)
        if quantization not in quant.MODES:
            raise ValueError(f"quantization must be one of {', '.join(quant.MODES)} (got {quantization!r})")
        super().__init__(model, inner_optimizer, comm, nesterov=nesterov, bucket_mb=bucket_mb, offload=offload, **outer)
        self.fragments = fragments
        self.overlap_steps = overlap_steps
        self.mixing_factor = mixing_factor
        self.quantization = quantization
        self.fragment_of = fragment_assignment(self.param_names, fragments)
        self.fragment_params = [[i for i, f in enumerate(self.fragment_of) if f == p] for p in range(fragments)]
        #: inner steps taken so far (t)
        self.t = 0
        #: t of each fragment's last merge
        self.last_sync_t = [0] * fragments
        self._pending: dict[int, _Pending] = {}

    @classmethod
    def from_spec(cls, spec: Any, model: torch.nn.Module, inner_optimizer: Any, comm: Comm) -> "StreamingDiLoCo":
        return cls(
            model, inner_optimizer, comm, **outer_args(spec), nesterov=spec.nesterov, fragments=spec.fragments,
            overlap_steps=spec.overlap_steps, mixing_factor=spec.mixing_factor, quantization=spec.quantization,
        )

    # ------------------------------------------------------------------------------ schedule

    def sync_phase(self, fragment: int) -> int:
        """t mod H at which ``fragment`` merges: (p+1)·H/P mod H (the last fragment at t ≡ 0)."""
        return ((fragment + 1) * self.sync_every // self.fragments) % self.sync_every

    def after_inner_step(self, step: int) -> None:
        """Start the exchanges due τ steps before their sync point, then merge the ones due now
        (with τ = 0 a fragment is started and merged in the same call). All ranks, same order."""
        self.t = step + 1
        h = self.sync_every
        for p in range(self.fragments):  # fixed order on every rank, or the collectives deadlock
            if (self.t + self.overlap_steps) % h == self.sync_phase(p) and p not in self._pending:
                self._start(p, self.t + self.overlap_steps)
        for p in range(self.fragments):
            pending = self._pending.get(p)
            if pending is not None and pending.sync_t == self.t:
                self._merge(pending, self.mixing_factor)

    def finish(self) -> None:
        """Leave every rank with the same model, the global parameters: complete the exchange in
        flight (its outer step runs at once), give every fragment with local steps since its last
        merge a final blocking outer step, then adopt the global parameters everywhere (α-mixing
        would keep a rank-specific share of the local parameters, so the end model does not mix)."""
        for p in sorted(self._pending):
            self._merge(self._pending[p], 0.0)
        for p in range(self.fragments):
            if self.last_sync_t[p] < self.t:
                self._start(p, self.t)
                self._merge(self._pending[p], 0.0)
        self._adopt_global()
        self.steps_since_sync = 0

    def sync(self) -> None:
        """A blocking outer step of every fragment (α = 0): what :meth:`finish` ends with."""
        self.finish()

    # ------------------------------------------------------------------------------ exchange

    def _reduce_scatter(self) -> bool:
        """Whether a quantised exchange goes as a reduce-scatter then an all-gather (3 or more workers): each rank
        then sends about 2(n−1)/n of the fragment's encoded size whatever n, where an all-gather sends n−1 times it.
        With 2 workers the all-gather sends no more and quantises once, so it stays."""
        return self.quantization != "none" and self.comm.world_size >= 3

    @torch.no_grad()
    def _start(self, p: int, sync_t: int) -> None:
        idx = self.fragment_params[p]
        deltas = [self.global_params[i] - self.params[i].detach().to(self.global_params[i].device, torch.float32) for i in idx]
        if self.quantization == "none":
            flat = flatten(deltas)
            handle = self.comm.all_reduce(flat, op="avg", async_op=True)
        elif self._reduce_scatter():
            chunks = _chunks(flatten(deltas), self.comm.world_size)
            handle = self.comm.exchange_chunks([quant.pack_flat(c, self.quantization) for c in chunks], async_op=True)
        else:
            handle = self.comm.all_gather(quant.pack(deltas, self.quantization), async_op=True)
        self._pending[p] = _Pending(p, sync_t, handle)

    @torch.no_grad()
    def _resolve(self, pending: _Pending) -> list[torch.Tensor]:
        if pending.average is None:
            idx = self.fragment_params[pending.fragment]
            shapes = [self.global_params[i].shape for i in idx]
            result = pending.handle.wait()
            if self.quantization == "none":
                average = [torch.empty(s, dtype=torch.float32, device=result.device) for s in shapes]
                unflatten_into(result, average)
            elif self._reduce_scatter():
                average = self._gather_chunk_averages(result, shapes)
            else:
                decoded = [quant.unpack(payload, shapes, self.quantization) for payload in result]
                average = [sum(parts[k] for parts in decoded) / len(decoded) for k in range(len(shapes))]
            pending.average, pending.handle = average, None
        return pending.average

    def _gather_chunk_averages(self, received: list[torch.Tensor], shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """The reduce-scatter's second half: average the chunk every rank sent this one (decoded, in fp32), encode
        the average, all-gather every rank's, decode. Every rank decodes the same payloads, its own included, so
        all compute bit-identical global parameters."""
        total = sum(math.prod(s) for s in shapes)
        length = -(-total // len(received))
        mine = sum(quant.unpack_flat(x, length, self.quantization) for x in received) / len(received)
        gathered = self.comm.all_gather(quant.pack_flat(mine, self.quantization))
        flat = torch.cat([quant.unpack_flat(x, length, self.quantization) for x in gathered])[:total]
        average = [torch.empty(s, dtype=torch.float32, device=flat.device) for s in shapes]
        unflatten_into(flat, average)
        return average

    @torch.no_grad()
    def _merge(self, pending: _Pending, alpha: float) -> None:
        idx = self.fragment_params[pending.fragment]
        average = self._resolve(pending)
        for i, d in zip(idx, average):
            self.global_params[i].grad = d.to(self.global_params[i].device)
        self.outer_optimizer.step()  # only this fragment has gradients: the others are skipped
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._mix_into_local(idx, alpha)
        del self._pending[pending.fragment]
        self.last_sync_t[pending.fragment] = self.t
        if pending.fragment == self.fragments - 1:
            self.outer_steps += 1

    @torch.no_grad()
    def _mix_into_local(self, idx: Sequence[int], alpha: float) -> None:
        """θᵢ,p ← (1−α)·θ_p + α·θᵢ,p for the tensors ``idx`` of a fragment (α = 0: adopt θ_p)."""
        for i in idx:
            p, g = self.params[i], self.global_params[i]
            merged = g.to(p.device, p.dtype) if alpha == 0 else torch.lerp(g.to(p.device, torch.float32), p.detach().float(), alpha)
            p.copy_(merged)

    # --------------------------------------------------------------------------- membership

    def at_membership_boundary(self) -> bool:
        """Once per H steps, when no exchange is in flight (the schedule's last fragment merges at t ≡ 0 mod H)."""
        return not self._pending and self.t % self.sync_every == 0

    def drop_lost_exchange(self) -> bool:
        """A lost peer failed a fragment exchange (its start or its wait): drop it here and train on to
        the next boundary (t ≡ 0 mod H), where every survivor stops. Stopping at the failed merge would
        not do: a survivor on which that exchange completed (the peer died in its final hops) notices
        the loss only at its next collective, steps later, so the survivors would not agree on the step.
        The fragment keeps its local progress, as after any abandoned exchange."""
        self._abandon_unresolved()
        return True

    def _abandon_unresolved(self) -> None:
        for p in [p for p, pending in self._pending.items() if pending.average is None]:
            del self._pending[p]

    def continue_after_peer_loss(self, comm: Comm, interrupted: bool) -> None:
        """Survivors go on with ``comm``. Every exchange still in flight (started over the old group,
        its result lost with the peer) is abandoned: its fragment keeps its local progress and
        synchronises at its next turn in the schedule (its pseudo-gradient then covers both
        periods). Exchanges already resolved are merged as scheduled.

        Then the survivors reconcile the fragments: one small ``all_gather`` of every fragment's last
        merge step and the outer-step count. A fragment whose exchange completed on some survivors only
        (the lost peer died in its final hops; the others dropped it, :meth:`drop_lost_exchange`) is
        taken from the lowest group rank with the latest merge: it broadcasts that fragment's global
        parameters and outer momentum, and each of the others merges them into its local parameters
        as the merge would have (θᵢ,p ← (1−α)·θ_p + α·θᵢ,p). Whoever completed an exchange holds every
        survivor's contribution (none completes before all have arrived), so nothing is counted twice."""
        self.comm = comm
        self._abandon_unresolved()
        self._reconcile_fragments(comm)

    @torch.no_grad()
    def _reconcile_fragments(self, comm: Comm) -> None:
        if comm.world_size == 1:
            return
        mine = torch.tensor([*self.last_sync_t, self.outer_steps], dtype=torch.int64)
        rows = [row.tolist() for row in comm.all_gather(mine)]
        for p in range(self.fragments):  # the same order on every rank: every rank sees the same rows
            merged = [row[p] for row in rows]
            latest = max(merged)
            if min(merged) == latest:
                continue
            idx = self.fragment_params[p]
            momentum = self._momentum_buffers()
            tensors = [self.global_params[i] for i in idx] + ([momentum[i] for i in idx] if momentum else [])
            broadcast_flat(comm, tensors, src=merged.index(latest), bucket_bytes=self.bucket_bytes)
            if self.last_sync_t[p] != latest:
                self._mix_into_local(idx, self.mixing_factor)
                self.last_sync_t[p] = latest
        self.outer_steps = max(row[-1] for row in rows)

    def on_membership_change(self, comm: Comm, src: int = 0) -> None:
        """Switch groups when no exchange is in flight: group rank ``src`` broadcasts the global
        parameters and outer momentum, every member adopts them (local progress since each fragment's
        last merge is dropped on every rank alike)."""
        if self._pending:
            raise RuntimeError("on_membership_change: an exchange is in flight; call it between exchanges or after finish()")
        self.comm = comm
        broadcast_flat(comm, list(self.global_params) + self._momentum_buffers(), src=src, bucket_bytes=self.bucket_bytes)
        self._adopt_global()
        self.last_sync_t = [self.t] * self.fragments
        self._loaded = True

    # ---------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """DiLoCo's state plus the schedule position and the pending exchange. An exchange in flight
        is completed first (waiting on a collective all ranks already issued) and its fp32 average
        is saved, so a resumed run merges exactly what the uninterrupted one would have."""
        state = super().state_dict()
        pending = {}
        for p, item in self._pending.items():
            average = self._resolve(item)
            pending[p] = {"sync_t": item.sync_t, "average": [a.clone() for a in average]}
        state.update({"t": self.t, "last_sync_t": list(self.last_sync_t), "pending": pending,
                      "fragments": self.fragments, "quantization": self.quantization})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("algorithm") == self.name and state.get("fragments") != self.fragments:
            raise ValueError(
                f"checkpoint was written with fragments={state.get('fragments')}, this run has {self.fragments}: "
                f"resume with the same algorithm.fragments"
            )
        super().load_state_dict(state)
        self.t = int(state["t"])
        self.last_sync_t = [int(x) for x in state["last_sync_t"]]
        self._pending = {
            int(p): _Pending(int(p), int(item["sync_t"]), None, [a.clone() for a in item["average"]])
            for p, item in state["pending"].items()
        }

    def bytes_per_inner_step(self, num_params: int, world_size: int) -> float:
        n = world_size
        if n <= 1:
            return 0.0
        if self.quantization == "none":
            return 2 * (n - 1) / n * 4 * num_params / self.sync_every
        if n >= 3:  # reduce-scatter then all-gather: each half sends n−1 encoded chunks of each fragment
            sizes = [sum(self.global_params[i].numel() for i in idx) for idx in self.fragment_params]
            chunk_bytes = sum(quant.flat_payload_nbytes(-(-size // n), self.quantization) for size in sizes)
            return 2 * (n - 1) * chunk_bytes / self.sync_every
        if self.quantization == "bf16":
            return (n - 1) * 2 * num_params / self.sync_every
        return (n - 1) * (num_params / 2 + 4 * len(self.params)) / self.sync_every
