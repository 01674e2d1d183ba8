"""When the loop may skip the connection probe: only when the algorithm's own point-to-point
traffic samples every ordered pair of ranks in every outer step (NoLoCo with one gossip group);
collective-only algorithms, and NoLoCo's random groups over more ranks, keep probing."""

from __future__ import annotations

import itertools

import pytest
import torch

from dist_helpers import tiny_model
from loco_trainer.algorithms import NoLoCo, make_strategy
from loco_trainer.comm import Comm
from loco_contract.config import AlgorithmSpec


class _RecordingComm:
    """Stands in for one rank's :class:`Comm`: records the gossip's point-to-point ops, moves no data."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.ops: list[tuple[str, int]] = []

    def batch_isend_irecv(self, ops):  # noqa: ANN001,ANN201 - Comm's signature
        class _Done:
            def wait(self) -> None:
                pass

        for kind, buf, peer in ops:
            if kind == "recv":
                buf.zero_()
            self.ops.append((kind, peer))
        return [_Done() for _ in ops]


def _sampled_pairs(world_size: int, group_size: int, seed: int, rounds: int) -> list[set[tuple[int, int]]]:
    """Per round, the ordered pairs (src, dst) that got a connection sample: every completed
    receive from ``src`` on rank ``dst`` (Comm.scan_p2p), from NoLoCo.gossip run on every rank."""
    ranks = []
    for r in range(world_size):
        comm = _RecordingComm(r, world_size)
        strategy = NoLoCo(tiny_model(0), None, comm, sync_every=1, outer_lr=0.7, outer_momentum=0.5,
                          group_size=group_size, seed=seed, init_sync=False)
        per_round = []
        for k in range(1, rounds + 1):
            comm.ops.clear()
            strategy.gossip(k)
            per_round.append({(peer, r) for kind, peer in comm.ops if kind == "recv"})
        ranks.append(per_round)
    return [set().union(*(ranks[r][k] for r in range(world_size))) for k in range(rounds)]


@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_noloco_claims_coverage_exactly_when_each_round_samples_every_ordered_pair(group_size: int) -> None:
    """For every world size up to 8: covered (no probe) iff each of the rounds, whatever the seed,
    gave every ordered pair a sample; the bound is one outer step."""
    for n, seed in itertools.product(range(2, 9), (0, 7)):
        everything = set(itertools.permutations(range(n), 2))
        rounds = _sampled_pairs(n, group_size, seed, rounds=4)
        claims = NoLoCo(tiny_model(0), None, _RecordingComm(0, n), sync_every=1, outer_lr=0.7, outer_momentum=0.5,
                        group_size=group_size, seed=seed).p2p_covers_links(n)
        assert claims == (n <= group_size + 1), (n, group_size)
        if claims:
            assert all(r == everything for r in rounds), (n, group_size, seed)
        else:  # several groups: every single round misses the pairs between them
            assert all(r < everything for r in rounds), (n, group_size, seed)


def test_random_pairs_leave_some_pair_unsampled_for_many_rounds() -> None:
    """Why NoLoCo over more than G+1 ranks keeps probing: with random pairs, some ordered pair goes
    unsampled for longer than the n-1 log intervals in which the probe ring covers every pair."""
    n, rounds = 8, 40
    seen = _sampled_pairs(n, 2, seed=0, rounds=rounds)
    longest_gap = max(
        max(len(list(g)) for missed, g in itertools.groupby(pair not in s for s in seen) if missed)
        for pair in itertools.permutations(range(n), 2)
    )
    assert longest_gap > n - 1, longest_gap


@pytest.mark.parametrize("name", ["ddp", "diloco", "streaming-diloco", "co2"])
def test_collective_algorithms_keep_probing(name: str) -> None:
    model = tiny_model(0)
    strategy = make_strategy(AlgorithmSpec.model_validate({"name": name}), model,
                             torch.optim.SGD(model.parameters(), lr=0.1), Comm())
    assert not any(strategy.p2p_covers_links(n) for n in range(1, 17))


def test_noloco_of_one_rank_claims_nothing() -> None:
    """A single rank has no connection to sample (its probe is a no-op): nothing to skip."""
    model = tiny_model(0)
    strategy = make_strategy(AlgorithmSpec.model_validate({"name": "noloco"}), model,
                             torch.optim.SGD(model.parameters(), lr=0.1), Comm())
    assert not strategy.p2p_covers_links(1)
    assert strategy.p2p_covers_links(2) and strategy.p2p_covers_links(3) and not strategy.p2p_covers_links(4)


@pytest.mark.parametrize("covered", [False, True])
def test_loop_probes_unless_covered_and_keeps_the_periodic_clock_resync(tmp_path, monkeypatch, covered: bool) -> None:
    """The training loop probes at every log interval but the last; when the strategy's traffic
    covers the links the probe keeps only its cadence (``links=False``: the periodic clock
    re-estimate, tested in tests/test_comm.py), with no transfer."""
    from loco_contract.config import RuntimeEnv, TrainerConfig
    from loco_trainer.rendezvous import RankInfo
    from loco_trainer.train import Trainer

    calls = {"probe": 0, "cadence only": 0}

    def counting_probe(self, nbytes=4096, *, links=True):  # noqa: ANN001,ANN202
        calls["probe" if links else "cadence only"] += 1

    monkeypatch.setattr(Comm, "probe", counting_probe)

    def factory(spec, model, optimizer, comm):  # noqa: ANN001,ANN202
        comm.clock_resync_probes = 2
        strategy = make_strategy(spec, model, optimizer, comm)
        monkeypatch.setattr(strategy, "p2p_covers_links", lambda world_size: covered)
        return strategy

    config = TrainerConfig.model_validate({
        "jobName": "probe", "namespace": "test",
        "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
        "data": {"maxBytes": 50_000},
        "training": {"steps": 6, "batchSize": 2, "seqLen": 32, "warmupSteps": 1, "logEvery": 1, "evalEvery": 0,
                     "evalBatches": 1},
        "algorithm": {"name": "noloco", "syncEvery": 2},
        "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 0},
    })
    env = RuntimeEnv.from_environ({}).model_copy(update={"job_name": "probe", "namespace": "test"})
    Trainer(config, env, RankInfo(0, 0, 1, 0, 1), torch.device("cpu"), strategy_factory=factory).run()
    # 6 log intervals; none after the last. Covered: no transfer, the cadence kept at every interval.
    assert calls == ({"probe": 0, "cadence only": 5} if covered else {"probe": 5, "cadence only": 0}), calls
