"""Comm: results of the collectives, byte accounting against the cost model, the flight recorder."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import free_port, rank_pool, run_ranks
from loco_trainer.comm import Comm, all_reduce_flat, buckets


def _collectives(rank: int, world_size: int) -> dict:
    comm = Comm()
    n = world_size
    t = torch.full((10,), float(rank + 1))  # 40 bytes
    comm.all_reduce(t, op="avg")
    s = torch.full((10,), float(rank + 1))
    comm.all_reduce(s, op="sum")
    b = torch.full((4,), float(rank))  # 16 bytes
    comm.broadcast(b, src=1)
    gathered = comm.all_gather(torch.tensor([float(rank)] * 2))  # 8 bytes in, 8n out
    h = comm.all_reduce(torch.ones(3), op="sum", async_op=True)
    async_result = h.wait()
    # ring p2p: send to the right, receive from the left, posted together
    got = torch.zeros(5)
    handles = comm.batch_isend_irecv([("send", torch.full((5,), float(rank)), (rank + 1) % n), ("recv", got, (rank - 1) % n)])
    for handle in handles:
        handle.wait()
    comm.barrier()
    return {
        "avg": t.tolist(),
        "sum": s.tolist(),
        "bcast": b.tolist(),
        "gathered": [g.tolist() for g in gathered],
        "async": async_result.tolist(),
        "p2p": got.tolist(),
        "stats": comm.stats(),
        "records": [(r.seq, r.kind, r.nbytes, r.enter_ns, r.exit_ns, r.peer) for r in comm.records()],
    }


@pytest.mark.multiproc
@pytest.mark.parametrize("n", [2, 3])
def test_collectives_give_right_results_and_bytes_follow_cost_model(rank_pool, n: int) -> None:
    results = rank_pool.run(_collectives, n)
    mean = sum(range(1, n + 1)) / n
    for rank, res in enumerate(results):
        assert res["avg"] == pytest.approx([mean] * 10)
        assert res["sum"] == pytest.approx([mean * n] * 10)
        assert res["bcast"] == [1.0] * 4
        assert res["gathered"] == [[float(r)] * 2 for r in range(n)]
        assert res["async"] == [float(n)] * 3
        assert res["p2p"] == [float((rank - 1) % n)] * 5

        kinds = res["stats"]["by_kind"]
        ring = 2 * (n - 1) / n
        ar_sent = round(ring * 40) * 2 + round(ring * 12)
        assert kinds["all_reduce"] == {"calls": 3, "bytes_sent": ar_sent, "bytes_received": ar_sent}
        if rank == 1:
            assert kinds["broadcast"] == {"calls": 1, "bytes_sent": (n - 1) * 16, "bytes_received": 0}
        else:
            assert kinds["broadcast"] == {"calls": 1, "bytes_sent": 0, "bytes_received": 16}
        ag = round((n - 1) / n * 8 * n)
        assert kinds["all_gather"] == {"calls": 1, "bytes_sent": ag, "bytes_received": ag}
        assert kinds["send"] == {"calls": 1, "bytes_sent": 20, "bytes_received": 0}
        assert kinds["recv"] == {"calls": 1, "bytes_sent": 0, "bytes_received": 20}
        assert kinds["barrier"]["calls"] == 1 and kinds["barrier"]["bytes_sent"] == 0
        assert res["stats"]["bytes_sent"] == sum(k["bytes_sent"] for k in kinds.values())

        # the flight recorder: every call, in issue order, completed, with monotonic times
        records = res["records"]
        assert [r[1] for r in records] == [
            "all_reduce", "all_reduce", "broadcast", "all_gather", "all_reduce", "send", "recv", "barrier",
        ]
        assert [r[0] for r in records] == list(range(len(records)))
        assert [r[2] for r in records][:5] == [40, 40, 16, 8 * n, 12]
        assert records[2][5] == 1 and records[5][5] == (rank + 1) % n and records[6][5] == (rank - 1) % n
        assert all(r[4] is not None and r[4] >= r[3] for r in records)
        assert all(a[3] <= b[3] for a, b in zip(records, records[1:]))


def test_single_rank_issues_nothing_and_counts_nothing() -> None:
    comm = Comm()  # torch.distributed not initialised: a group of one
    assert (comm.rank, comm.world_size) == (0, 1)
    t = torch.arange(4.0)
    assert comm.all_reduce(t, op="avg") is t and t.tolist() == [0, 1, 2, 3]
    assert comm.all_reduce(t, op="sum", async_op=True).wait() is t
    assert comm.broadcast(t, src=0) is t
    assert [g.tolist() for g in comm.all_gather(t)] == [[0, 1, 2, 3]]
    assert comm.all_reduce_future(t).wait() is t
    assert [c.tolist() for c in comm.exchange_chunks([t])] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="needs 1 chunks"):
        comm.exchange_chunks([t, t])
    comm.barrier()
    all_reduce_flat(comm, [t])
    assert comm.records() == []
    assert comm.stats()["bytes_sent"] == 0 and comm.stats()["calls"] == 0


def test_bad_arguments_are_refused_with_the_argument_named() -> None:
    comm = Comm()
    with pytest.raises(ValueError, match="op must be one of"):
        comm.all_reduce(torch.ones(1), op="mean")
    with pytest.raises(ValueError, match="src=3"):
        comm.broadcast(torch.ones(1), src=3)
    with pytest.raises(ValueError, match="dst=0 is this rank"):
        comm.isend(torch.ones(1), dst=0)
    with pytest.raises(ValueError, match="history"):
        Comm(history=0)


def test_buckets_respect_the_cap_and_keep_order() -> None:
    ts = [torch.zeros(n) for n in (10, 10, 30, 5, 5)]  # 40, 40, 120, 20, 20 bytes
    assert buckets(ts, 80) == [[0, 1], [2], [3, 4]]
    assert buckets(ts, 1) == [[0], [1], [2], [3], [4]]
    assert [i for b in buckets(ts, 1000) for i in b] == [0, 1, 2, 3, 4]


def _ring_buffer(rank: int, world_size: int) -> tuple[int, list[int], dict]:
    comm = Comm(history=4)
    for _ in range(10):
        comm.all_reduce(torch.ones(2))
    sub = Comm.from_ranks([0, 1])
    sub_stats = None
    if sub.is_member:
        sub.all_reduce(torch.ones(8), op="sum")
        sub_stats = (sub.world_size, sub.stats()["by_kind"]["all_reduce"])
    return len(comm.records()), [r.seq for r in comm.records()], sub_stats


@pytest.mark.multiproc
def test_ring_buffer_is_bounded_and_subgroups_count_their_own_bytes(rank_pool) -> None:
    results = rank_pool.run(_ring_buffer, 3)
    for rank, (count, seqs, sub_stats) in enumerate(results):
        assert count == 4 and seqs == [6, 7, 8, 9]
        if rank in (0, 1):
            assert sub_stats == (2, {"calls": 1, "bytes_sent": 32, "bytes_received": 32})
        else:
            assert sub_stats is None


def _rejoin(rank: int, world_size: int, port: int) -> dict:
    old = Comm()
    old.all_reduce(torch.ones(4))
    # the worker set changed: ranks swap places in a new default group (the elastic path)
    new = Comm.new_membership(rank=world_size - 1 - rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    t = torch.tensor([float(rank)])
    new.broadcast(t, src=0)  # new rank 0 is old rank world_size-1
    return {"new_rank": new.rank, "value": t.item(), "new_calls": new.stats()["calls"], "old_calls": old.stats()["calls"]}


@pytest.mark.multiproc
def test_new_membership_reforms_the_default_group_with_fresh_counters() -> None:
    results = run_ranks(_rejoin, 2, args=(free_port(),))
    for rank, res in enumerate(results):
        assert res["new_rank"] == 1 - rank
        assert res["value"] == 1.0
        assert (res["old_calls"], res["new_calls"]) == (1, 1)


class _ProbeHook:
    """A fault hook for the probe test: rank 0 is slow to post its probe send (a CPU-starved
    sender: the delay falls before the send is stamped), rank 1's sends to rank 0 cross a slow
    connection (an injected transfer delay, after the stamp)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def before_enter(self, seq: int, kind: str, peer: int | None) -> None:
        pass

    def holds_send(self, seq: int, kind: str, peer: int) -> bool:
        if self.rank == 0:
            import time

            time.sleep(0.3)
        return False

    def transfer_delay_s(self, kind: str, peer: int) -> float:
        return 0.3 if self.rank == 1 else 0.0

    def hold(self) -> None:  # pragma: no cover - nothing is held here
        raise AssertionError("not held")


def _probe_timing(rank: int, world_size: int) -> dict:
    import time

    comm = Comm(fault_hook=_ProbeHook(rank), probe_wait_s=1.0)
    t0 = time.monotonic()
    comm.probe()
    inline = time.monotonic() - t0
    done_inline = not any(t.is_alive() for t in comm._prober.threads)
    comm.finish_probe()
    return {"inline_s": inline, "done_inline": done_inline, "links": comm.export_links()}


@pytest.mark.multiproc
def test_probe_times_the_connection_not_the_senders_scheduling(rank_pool) -> None:
    """0 -> 1: the sender posted 0.3 s late (its own scheduling): the sample leaves that out.
    1 -> 0: the connection itself takes 0.3 s: the sample shows it. Within probe_wait_s both
    transfers finish before probe() returns, so no rank trains while a peer still measures."""
    results = rank_pool.run(_probe_timing, 2)
    samples = {(x.src, x.dst): x.seconds for r in results for x in r["links"]}
    assert set(samples) == {(0, 1), (1, 0)}, samples
    assert samples[(0, 1)] < 0.15, samples  # 0.3 s of sender lateness subtracted
    assert samples[(1, 0)] >= 0.3, samples  # a slow connection stays slow
    assert all(r["done_inline"] for r in results), results
    assert all(r["inline_s"] >= 0.3 for r in results), results  # the trailing barrier: everyone waited


def _probe_resync(rank: int, world_size: int, links: bool) -> dict:
    import time

    comm = Comm(clock_resync_probes=2)
    comm.sync_clock()
    offsets = [comm.clock_offset_s]
    for _ in range(5):
        comm.probe(links=links)
        offsets.append(comm.clock_offset_s)
    comm.finish_probe()
    return {"syncs": comm.clock_syncs, "offsets": offsets, "wall_minus_common": time.time() - (time.monotonic() + comm.clock_offset_s),
            "links": len(comm.export_links())}


@pytest.mark.multiproc
@pytest.mark.parametrize("links", [True, False])
def test_probes_re_estimate_the_clock_offset_every_n_probes(rank_pool, links: bool) -> None:
    """With clock_resync_probes=2 the 3rd and 5th probe first re-run sync_clock (collectively, so
    the ranks stay aligned and every probe still yields its sample); ``links=False`` keeps that
    cadence and sends nothing."""
    results = rank_pool.run(_probe_resync, 2, args=(links,))
    for r in results:
        assert r["syncs"] == 1 + 2, r  # the initial sync and probes #2 and #4 (counted from 0)
        assert r["links"] == (5 if links else 0), r
        assert abs(r["wall_minus_common"]) < 0.05, r  # one host: the common clock is rank 0's wall clock
    with pytest.raises(ValueError, match="clock_resync_probes"):
        Comm(clock_resync_probes=-1)


def _probe_schedule(rank: int, world_size: int, interval_s: float, probes: int, nbytes: int = 4096) -> dict:
    comm = Comm(probe_interval_s=interval_s)
    comm.sync_clock()
    per_probe = []
    for _ in range(probes):
        before = len(comm.export_links())
        comm.probe(nbytes)
        comm.finish_probe()
        links = comm.export_links()
        per_probe.append([(x.src, x.dst) for x in links[before:]])
    sizes = {x.nbytes for x in comm.export_links()}
    barriers = [r for r in comm.export_records() if r.kind == "barrier"]
    return {"per_probe": per_probe, "barriers": len(barriers), "closed": all(r.exit_s is not None for r in barriers),
            "sizes": sizes}


@pytest.mark.multiproc
def test_every_transfer_probe_samples_the_ring_and_rotates_over_the_other_pairs(rank_pool) -> None:
    """4 ranks, probe_interval_s 0: each probe samples every ring connection r -> r + 1 (the
    connections the outer ring all-reduce uses) and one rotating shift (2, then 3), so two probes
    cover every ordered pair; every probe is also a timing point (a closed barrier record)."""
    n = 4
    results = rank_pool.run(_probe_schedule, n, args=(0.0, 4))
    ring = {(r, (r + 1) % n) for r in range(n)}
    for k in range(4):
        sampled = [pair for res in results for pair in res["per_probe"][k]]
        assert len(sampled) == len(set(sampled)) == 2 * n, (k, sampled)  # each rank receives twice
        rotating = {(r, (r + 2 + k % 2) % n) for r in range(n)}
        assert set(sampled) == ring | rotating, (k, sorted(sampled))
    first_two = {pair for res in results for pair in res["per_probe"][0] + res["per_probe"][1]}
    assert first_two == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert all(res["barriers"] == 4 and res["closed"] for res in results), results


@pytest.mark.multiproc
def test_probe_interval_bounds_the_transfers_not_the_timing_points(rank_pool) -> None:
    """probe_interval_s 60: the first probe transfers (nothing was sampled yet), the next ones are
    timing points only; all ranks agree (no rank posts a transfer its peer does not). The payload
    is the one asked for (faultDetection.probeBytes)."""
    results = rank_pool.run(_probe_schedule, 2, args=(60.0, 3, 1 << 16))
    for res in results:
        assert [len(p) for p in res["per_probe"]] == [1, 0, 0], res
        assert res["sizes"] == {1 << 16}, res
        assert res["barriers"] == 3 and res["closed"], res
    with pytest.raises(ValueError, match="probe_interval_s"):
        Comm(probe_interval_s=-1.0)


def _ring(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    comm = Comm(ring_p2p=True)
    n = world_size
    t = torch.arange(11, dtype=torch.float32) * (rank + 1)  # 11 elements: uneven chunks over 3 or 4 ranks
    expected = t.clone()
    dist.all_reduce(expected)  # the reference, outside the counting layer
    comm.ring_all_reduce(t, op="sum")
    a = torch.full((3, 5), float(rank))
    comm.ring_all_reduce(a, op="avg")
    tiny = torch.tensor([float(rank)])  # fewer elements than ranks: falls back to all_reduce
    comm.ring_all_reduce(tiny, op="sum")
    flat_pair = [torch.full((7,), float(rank)), torch.full((2, 2), 1.0)]
    all_reduce_flat(comm, flat_pair, op="avg")  # ring_p2p routes the flat all-reduce through the ring
    stats = comm.stats()
    return {"sum": t, "expected": expected, "avg": a, "tiny": tiny.item(), "flat": [x.clone() for x in flat_pair],
            "bytes_sent": stats["by_kind"]["send"]["bytes_sent"], "links": comm.export_links(),
            "peers": {(r.kind, r.peer) for r in comm.records() if r.peer is not None}}


@pytest.mark.multiproc
@pytest.mark.parametrize("n", [3, 4])
def test_ring_all_reduce_matches_all_reduce_bytes_and_fills_the_ring_cells(rank_pool, n: int) -> None:
    results = rank_pool.run(_ring, n)
    mean = sum(range(n)) / n
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["sum"], r["expected"], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(r["avg"], torch.full((3, 5), mean))
        assert r["tiny"] == sum(range(n))
        torch.testing.assert_close(r["flat"][0], torch.full((7,), mean))
        torch.testing.assert_close(r["flat"][1], torch.ones(2, 2))
        # only ring neighbours: send to the right, receive from the left
        assert r["peers"] == {("send", (rank + 1) % n), ("recv", (rank - 1) % n)}
        # the chunks this rank sent: 2(n-1) steps of about 1/n of each ringed tensor (44 + 60 + 44 bytes)
        sent_chunks = 0
        for numel in (11, 15, 11):
            sizes = [len(c) for c in torch.tensor_split(torch.empty(numel), n)]
            sent_chunks += sum(sizes[(rank - s) % n] for s in range(n - 1)) + sum(sizes[(rank + 1 - s) % n] for s in range(n - 1))
        assert r["bytes_sent"] == 4 * sent_chunks
        assert {(x.src, x.dst) for x in r["links"]} == {((rank - 1) % n, rank)}  # its ring cell, from real traffic
    with pytest.raises(ValueError, match="op"):
        Comm().ring_all_reduce(torch.ones(4), op="max")


def _interrupted_recv(rank: int, world_size: int) -> dict:
    """Rank 0 waits for a transfer rank 1 posts only 3 s later; a timer interrupts rank 0's Comm
    after 0.3 s (as the trainer does just before it aborts a group it is leaving)."""
    import threading
    import time

    from loco_trainer.comm import CommInterrupted

    comm = Comm(interruptible=True)
    t = torch.zeros(4)
    if rank == 1:
        time.sleep(3.0)
        comm.isend(torch.full((4,), 7.0), 0).wait()
        return {}
    handle = comm.irecv(t, 1)
    threading.Timer(0.3, comm.interrupt).start()
    start = time.monotonic()
    try:
        handle.wait()
        outcome = "completed"
    except CommInterrupted as exc:
        outcome = str(exc)
    given_up_after = time.monotonic() - start
    deadline = time.monotonic() + 30  # the transfer itself still completes, in the helper thread
    while t[0] != 7.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"outcome": outcome, "given_up_after": given_up_after, "received": t.tolist(),
            "still_interrupted": comm.interrupted.is_set()}


def _interrupted_collective(rank: int, world_size: int, kind: str) -> dict:
    """Rank 0 enters a collective rank 1 enters only 3 s later; a timer interrupts rank 0's Comm
    after 0.3 s. (A survivor blocked in the outer all-reduce of a group whose lost peer's connection
    was already closed waited out gloo's whole timeout, 120 s, before the interrupt covered it.)"""
    import threading
    import time

    import torch.distributed as dist

    from loco_trainer.comm import CommInterrupted

    # a group of its own: the calls rank 0 gives up still complete later, in the background, when
    # rank 1 makes the same calls; nothing is left pending on the pool's default group
    comm = Comm(dist.new_group(ranks=[0, 1]), interruptible=True, probe_wait_s=0.0)
    t = torch.ones(4)

    def enter() -> None:
        if kind == "probe" and rank == 1:
            comm.agree(torch.zeros(1), "max")  # the probe's timing point (rank 0 gives up before its transfers)
        elif kind == "all_reduce":
            comm.all_reduce(t, op="sum")
        elif kind == "async_all_reduce":
            comm.all_reduce(t, op="sum", async_op=True).wait()
        elif kind == "barrier":
            comm.barrier()
        elif kind == "agree":
            comm.agree(t, "max")
        elif kind == "probe":
            comm.probe(64)

    if rank == 1:
        time.sleep(3.0)
        enter()
        return {}
    threading.Timer(0.3, comm.interrupt).start()
    start = time.monotonic()
    try:
        enter()
        outcome = "completed"
    except CommInterrupted as exc:
        outcome = str(exc)
    given_up_after = time.monotonic() - start
    try:  # once interrupted, the Comm refuses every later call before issuing it
        comm.all_reduce(torch.ones(1))
        later = "completed"
    except CommInterrupted:
        later = "interrupted"
    return {"outcome": outcome, "given_up_after": given_up_after, "later": later}


@pytest.mark.parametrize("kind", ["all_reduce", "async_all_reduce", "barrier", "agree", "probe"])
def test_interrupt_gives_up_a_pending_collective_at_once(rank_pool, kind) -> None:
    result = rank_pool.run(_interrupted_collective, 2, args=(kind,))[0]
    assert "communicator was aborted" in result["outcome"], result
    assert result["given_up_after"] < 2.0, result  # not the 3 s until the peer enters
    assert result["later"] == "interrupted", result


def _completed_then_interrupted(rank: int, world_size: int) -> dict:
    """An async all-reduce that completed before the interrupt still returns its result (CO2 waits
    for its previous round one round later: that round is not lost to an interrupt)."""
    import time

    import torch.distributed as dist

    comm = Comm(dist.new_group(ranks=[0, 1]), interruptible=True)
    t = torch.full((4,), float(rank + 1))
    handle = comm.all_reduce(t, op="sum", async_op=True)
    deadline = time.monotonic() + 30
    while not handle.is_completed() and time.monotonic() < deadline:
        time.sleep(0.01)
    comm.interrupt()
    return {"result": handle.wait().tolist()}


def test_a_collective_completed_before_the_interrupt_keeps_its_result(rank_pool) -> None:
    results = rank_pool.run(_completed_then_interrupted, 2)
    assert [r["result"] for r in results] == [[3.0] * 4] * 2


def test_interrupt_gives_up_a_pending_point_to_point_wait_at_once(rank_pool) -> None:
    """gloo's abort of a group does not wake this process's own pending transfers (measured: the
    wait returned only when the peer exited); Comm.interrupt does, so a live survivor regroups."""
    result = rank_pool.run(_interrupted_recv, 2)[0]
    assert "communicator was aborted" in result["outcome"], result  # the marker the trainer's live path knows
    assert result["given_up_after"] < 2.0, result  # not the 3 s until the peer's send
    assert result["received"] == [7.0] * 4 and result["still_interrupted"]
