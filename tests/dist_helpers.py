"""Run functions on N local ``torch.distributed`` (gloo) ranks and collect what each returns.

    def test_something(rank_pool):                       # the fixture, imported into the test module
        results = rank_pool.run(fn, 2, args=(...))       # results[r] is fn(r, 2, *args)'s value

``fn`` must be a module-level function (it is pickled by reference into ``spawn``-ed processes); it is
called as ``fn(rank, world_size, *args)`` inside an initialised default group (gloo on 127.0.0.1, a
free port) and its return value travels back pickled by value (tensors included). An exception in
any rank is re-raised in the caller with that rank's traceback; ranks that do not finish within
``timeout_s`` fail the test instead of hanging it.

Starting a rank costs seconds (a fresh interpreter importing torch), so :class:`RankPool` keeps one
set of ranks per world size alive for a test module and runs one function after another on them.
After a failure or a timeout the ranks are killed (a rank may be stuck in a collective) and the next
``run`` starts fresh ones. Functions must not rely on state left by an earlier function beyond the
default group itself (seed RNGs explicitly, build their own ``Comm``).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import random
import socket
import time
import traceback
from typing import Any, Callable, Iterator

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports on ``host``, all free a moment ago and all below the
    ephemeral range, so that no connection or gloo listener opened later takes one of them: a live
    job's epochs use ``epoch_master_port(base, e)`` = base + 1 + e, and a base from :func:`free_port`
    (inside the ephemeral range) once lost its epoch-2 port to such a socket in CI."""
    from loco_trainer.rendezvous import ephemeral_port_range

    low = (ephemeral_port_range() or (32768, 60999))[0]
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, low - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host} between 20000 and {low}")


def _serve(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    """A rank: join the group, then run every task from ``tasks`` until ``None`` arrives."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, -1, False, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args = task
        try:
            value = fn(rank, world_size, *args)
            # plain pickle (not multiprocessing's) so tensors are copied by value, not shared memory
            results.put((rank, task_id, True, pickle.dumps(value)))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            results.put((rank, task_id, False, traceback.format_exc()))
    dist.destroy_process_group()


class _Ranks:
    """One live set of ``world_size`` ranks."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world_size, port, self.tasks[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.next_task = 0

    def run(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> list[Any]:
        task_id = self.next_task
        self.next_task += 1
        for q in self.tasks:
            q.put((task_id, fn, args))
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(self.world_size)) - set(out))
                raise AssertionError(f"{fn.__name__}: ranks {missing} did not finish within {timeout_s}s")
            try:
                rank, got_id, ok, payload = self.results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(self.procs) if r not in out and not p.is_alive()]
                if dead:
                    codes = [self.procs[r].exitcode for r in dead]
                    raise AssertionError(f"{fn.__name__}: rank(s) {dead} died with exit codes {codes}")
                continue
            if not ok:
                raise AssertionError(f"{fn.__name__}: rank {rank} failed:\n{payload}")
            if got_id == task_id:
                out[rank] = pickle.loads(payload)
        return [out[r] for r in range(self.world_size)]

    def close(self, kill: bool) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
        for p in self.procs:
            if kill:
                p.kill()
            p.join(timeout=10 if kill else 3)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


class RankPool:
    """Live rank sets keyed by world size (see the module docstring). Close it when done."""

    def __init__(self) -> None:
        self._sets: dict[int, _Ranks] = {}

    def run(self, fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 180.0) -> list[Any]:
        """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, run on the ranks
        concurrently. Raises ``AssertionError`` naming the rank on a failure or a timeout."""
        ranks = self._sets.get(world_size)
        if ranks is None:
            ranks = self._sets[world_size] = _Ranks(world_size)
        try:
            return ranks.run(fn, args, timeout_s)
        except BaseException:
            del self._sets[world_size]
            ranks.close(kill=True)
            raise

    def close(self) -> None:
        for ranks in self._sets.values():
            ranks.close(kill=False)
        self._sets.clear()


@pytest.fixture(scope="module")
def rank_pool() -> Iterator[RankPool]:
    """A :class:`RankPool` shared by the tests of one module (import it into the test module)."""
    pool = RankPool()
    try:
        yield pool
    finally:
        pool.close()


def run_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 180.0) -> list[Any]:
    """One-off: start ``world_size`` ranks, run ``fn`` on them, stop them."""
    pool = RankPool()
    try:
        return pool.run(fn, world_size, args, timeout_s)
    finally:
        pool.close()


# ------------------------------------------------------------------ tiny training fixtures


def tiny_model(seed: int = 0) -> "torch.nn.Module":
    """A small MLP (8 -> 16 -> 4, 228 parameters), identically initialised for a given seed."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def tiny_batch(step: int, rank: int, batch_size: int = 4) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A deterministic regression batch that differs per (step, rank)."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(batch_size, 8, generator=g)
    y = torch.randn(batch_size, 4, generator=g)
    return x, y


def run_loop(strategy, model, optimizer, rank: int, start: int, stop: int, on_step=None) -> None:
    """The trainer loop's hook order (loco_trainer.algorithms.base) on tiny batches, steps [start, stop)."""
    import torch.nn.functional as F

    net = strategy.wrap(model)
    for step in range(start, stop):
        if not strategy.takes_step(step):  # adaptive local steps: the loop passes over it
            strategy.after_inner_step(step)
            if on_step is not None:
                on_step(step)
            continue
        x, y = tiny_batch(step, rank)
        loss = F.mse_loss(net(x), y)
        loss.backward()
        strategy.after_backward(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        strategy.after_inner_step(step)
        if on_step is not None:
            on_step(step)


def flat_params(model) -> "torch.Tensor":
    import torch

    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def single_process_reference(make_optimizer: Callable[[Any], Any], batch: Callable[[int], tuple], steps: int) -> "torch.Tensor":
    """Parameters of :func:`tiny_model` (seed 0) after ``steps`` plain single-process MSE steps on
    ``batch(step)`` with ``make_optimizer(parameters)``: what a distributed run must equal."""
    import torch.nn.functional as F

    ref = tiny_model(seed=0)
    opt = make_optimizer(ref.parameters())
    for step in range(steps):
        x, y = batch(step)
        F.mse_loss(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
    return flat_params(ref)
