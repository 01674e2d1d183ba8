"""Streaming DiLoCo and the quantised wire formats."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_helpers import rank_pool, flat_params, run_loop, tiny_model
from loco_trainer import quant
from loco_trainer.algorithms import DiLoCo, StreamingDiLoCo, num_parameters
from loco_trainer.algorithms.streaming_diloco import fragment_assignment
from loco_trainer.comm import Comm


def _streaming_equals_diloco(rank: int, world_size: int) -> dict:
    out = {}
    for cls, extra in ((DiLoCo, {}), (StreamingDiLoCo, {"fragments": 1, "overlap_steps": 0, "mixing_factor": 0.0, "quantization": "none"})):
        model = tiny_model(seed=rank)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        strategy = cls(model, opt, Comm(), sync_every=3, outer_lr=0.7, outer_momentum=0.9, **extra)
        strategy.setup()
        history = []
        run_loop(strategy, model, opt, rank, 0, 8, on_step=lambda s: history.append(flat_params(model)))
        strategy.finish()
        out[cls.name] = (history, flat_params(model))
    return out


@pytest.mark.multiproc
def test_streaming_with_one_fragment_no_overlap_no_mixing_fp32_equals_diloco(rank_pool) -> None:
    for res in rank_pool.run(_streaming_equals_diloco, 2):
        history_d, final_d = res["diloco"]
        history_s, final_s = res["streaming-diloco"]
        for a, b in zip(history_d, history_s):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(final_s, final_d, rtol=1e-6, atol=1e-7)


H, P, TAU = 4, 2, 1  # fragment 0 merges at t ≡ 2, fragment 1 at t ≡ 0 (mod 4); each sent one step early


def _make(model, opt, quantization):
    return StreamingDiLoCo(model, opt, Comm(), sync_every=H, outer_lr=0.7, outer_momentum=0.9, fragments=P,
                           overlap_steps=TAU, mixing_factor=0.5, quantization=quantization)


def _streaming_e3m0(rank: int, world_size: int, quantization: str) -> dict:
    steps, cut = 12, 5  # at t = 5 fragment 0's exchange is in flight (sent at t = 5, merged at t = 6)
    model = tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    strategy = _make(model, opt, quantization)
    strategy.setup()
    setup_bytes = strategy.comm.stats()["bytes_sent"]
    run_loop(strategy, model, opt, rank, 0, cut)
    in_flight = sorted(strategy._pending)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "algo": strategy.state_dict()})
    run_loop(strategy, model, opt, rank, cut, steps)
    stats = strategy.comm.stats()
    records = [(r.kind, r.nbytes) for r in strategy.comm.records() if r.kind != "broadcast"]
    globals_before_finish = torch.cat([g.reshape(-1) for g in strategy.global_params])
    strategy.finish()
    uninterrupted = flat_params(model)

    model2 = tiny_model(seed=7)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    strategy2 = _make(model2, opt2, quantization)
    strategy2.load_state_dict(saved["algo"])
    strategy2.setup()
    run_loop(strategy2, model2, opt2, rank, cut, steps)
    strategy2.finish()
    return {"in_flight": in_flight, "bytes": stats["bytes_sent"] - setup_bytes, "records": records,
            "globals": globals_before_finish, "final": uninterrupted, "resumed": flat_params(model2),
            "formula": strategy.bytes_per_inner_step(num_parameters(model), world_size) * steps,
            "by_kind": stats["by_kind"]}


@pytest.mark.multiproc
@pytest.mark.parametrize("quantization,world_size", [("e3m0", 2), ("none", 2), ("e3m0", 3), ("bf16", 4)])
def test_streaming_fragments_overlap_quantise_and_resume_with_a_pending_exchange(rank_pool, quantization: str,
                                                                                 world_size: int) -> None:
    results = rank_pool.run(_streaming_e3m0, world_size, args=(quantization,))
    for res in results:
        assert res["in_flight"] == [0]
        # every fragment merges on its own schedule: 12 steps / (H/P) = 6 exchanges, alternating fragments; a
        # quantised one with 3+ workers is a reduce-scatter (all-to-all of encoded chunks) then an all-gather
        if quantization == "none":
            kinds = ["all_reduce"]
        else:
            kinds = ["reduce_scatter", "all_gather"] if world_size >= 3 else ["all_gather"]
        assert [k for k, _ in res["records"]] == kinds * 6
        sizes = [nb for _, nb in res["records"]][::len(kinds)]
        assert sizes[0::2] == [sizes[0]] * 3 and sizes[1::2] == [sizes[1]] * 3
        if quantization != "none":
            assert res["bytes"] == pytest.approx(res["formula"], rel=0.01 if world_size == 2 else 0.03)
        else:
            assert res["bytes"] == res["formula"]
        # the global parameters are identical on every rank (quantised payloads averaged in fp32)
        torch.testing.assert_close(res["globals"], results[0]["globals"], rtol=0, atol=0)
        torch.testing.assert_close(res["final"], results[0]["final"], rtol=0, atol=0)
        torch.testing.assert_close(res["resumed"], res["final"], rtol=0, atol=0)


def test_e3m0_round_trip_error_is_bounded_and_4bit_is_an_eighth_of_fp32() -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(300, 40), torch.randn(1001) * 1e-3, torch.zeros(3)]
    shapes = [t.shape for t in tensors]
    payload = quant.pack(tensors, "e3m0")
    out = quant.unpack(payload, shapes, "e3m0")
    for t, o in zip(tensors, out):
        scale = t.abs().max()
        bound = (2 ** 0.5 - 1) * t.abs() + scale * 2 ** -6 + 1e-12
        assert ((o - t).abs() <= bound).all()
        assert torch.equal(torch.sign(o[o != 0]), torch.sign(t[o != 0]))  # signs survive
    assert torch.equal(out[2], tensors[2])  # zeros stay zeros
    fp32 = quant.payload_nbytes([t.numel() for t in tensors], "none")
    e3m0 = payload.numel() * payload.element_size()
    assert e3m0 == quant.payload_nbytes([t.numel() for t in tensors], "e3m0")
    assert fp32 / 8 <= e3m0 <= fp32 / 8 * 1.01
    bf16 = quant.unpack(quant.pack(tensors, "bf16"), shapes, "bf16")
    for t, o in zip(tensors, bf16):
        assert ((o - t).abs() <= t.abs() * 2 ** -8).all()
    with pytest.raises(ValueError, match="quantization must be one of"):
        quant.pack(tensors, "int4")


def test_flat_e3m0_blocks_bound_the_error_per_block_and_cost_about_an_eighth_of_fp32() -> None:
    torch.manual_seed(0)
    # a chunk cutting across tensors of very different magnitudes: one scale per tensor would zero the small ones
    flat = torch.cat([torch.randn(1000), torch.randn(301) * 1e-4, torch.zeros(128), torch.randn(7)])
    payload = quant.pack_flat(flat, "e3m0")
    assert payload.numel() * payload.element_size() == quant.flat_payload_nbytes(flat.numel(), "e3m0")
    assert quant.flat_payload_nbytes(flat.numel(), "e3m0") <= quant.flat_payload_nbytes(flat.numel(), "none") / 8 * 1.07
    out = quant.unpack_flat(payload, flat.numel(), "e3m0")
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % quant.BLOCK)).view(-1, quant.BLOCK)
    scale = blocks.abs().amax(1).repeat_interleave(quant.BLOCK)[:flat.numel()]
    assert ((out - flat).abs() <= (2 ** 0.5 - 1) * flat.abs() + scale * 2 ** -6 + 1e-12).all()
    small = slice(1024, 1280)  # two whole blocks of the 1e-4 tensor: they keep their own scale
    assert (out[small] != 0).float().mean() > 0.9
    assert torch.equal(quant.unpack_flat(quant.pack_flat(flat, "bf16"), flat.numel(), "bf16"), flat.bfloat16().float())
    with pytest.raises(ValueError, match="expected for 10 elements"):
        quant.unpack_flat(payload, 10, "e3m0")


def _reduce_scatter_bytes(rank: int, world_size: int) -> dict:
    """One E3M0 exchange of a 1 M-element outer gradient: what each rank sends, and the average every rank gets."""
    torch.manual_seed(rank)
    model = torch.nn.Linear(1000, 1000, bias=False)
    strategy = StreamingDiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), Comm(), sync_every=2, fragments=1,
                               overlap_steps=0, mixing_factor=0.0, quantization="e3m0", outer_lr=1.0, outer_momentum=0.0)
    strategy.setup()
    before = strategy.comm.stats()["bytes_sent"]
    with torch.no_grad():
        model.weight.add_(torch.randn_like(model.weight) * 0.01 * (rank + 1))
    strategy._start(0, 0)
    average = strategy._resolve(strategy._pending[0])[0]
    return {"sent": strategy.comm.stats()["bytes_sent"] - before, "average": average,
            "local": model.weight.detach().clone(), "global": strategy.global_params[0].detach().clone()}


@pytest.mark.multiproc
@pytest.mark.parametrize("world_size", [2, 4])
def test_a_quantised_exchange_sends_about_a_sixteenth_of_fp32_per_rank_whatever_the_replicas(rank_pool,
                                                                                             world_size: int) -> None:
    results = rank_pool.run(_reduce_scatter_bytes, world_size)
    n_params = 1000 * 1000
    for res in results:
        torch.testing.assert_close(res["average"], results[0]["average"], rtol=0, atol=0)  # bit-identical
    # against the fp32 average of the outer gradients (global - local on each rank)
    exact = torch.stack([r["global"] - r["local"] for r in results]).mean(0)
    error = ((results[0]["average"] - exact).norm() / exact.norm()).item()
    assert error < 0.3, error
    sent = results[0]["sent"]
    if world_size == 2:
        assert sent == quant.payload_nbytes([n_params], "e3m0")  # the all-gather: one payload to one peer
    else:  # (n−1) chunks to the peers, then the averaged chunk to (n−1) peers: bounded by ~1.06 bytes per element
        assert sent == 2 * (world_size - 1) * quant.flat_payload_nbytes(n_params // world_size, "e3m0")
        assert sent < 1.07 * n_params


def test_fragments_are_strided_layer_groups() -> None:
    names = ["wte.weight", "h.0.attn.weight", "h.0.mlp.weight", "h.1.attn.weight", "h.2.attn.weight", "h.3.mlp.weight", "ln_f.weight"]
    # layers in order: wte, h.0, h.1, h.2, h.3, ln_f  -> 0 1 0 1 0 1 with P = 2
    assert fragment_assignment(names, 2) == [0, 1, 1, 0, 1, 0, 1]
    assert fragment_assignment(names, 1) == [0] * len(names)
    with pytest.raises(ValueError, match="fragments=7 but the model has only 6 layer groups"):
        fragment_assignment(names, 7)


def test_streaming_refuses_inconsistent_schedules_naming_the_fields() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    kw = dict(outer_lr=0.7, outer_momentum=0.9)
    with pytest.raises(ValueError, match=r"syncEvery \(5\) must be a multiple of fragments \(2\)"):
        StreamingDiLoCo(model, opt, Comm(), sync_every=5, fragments=2, **kw)
    with pytest.raises(ValueError, match=r"overlapSteps \(2\) must be >= 0 and < syncEvery/fragments \(2\)"):
        StreamingDiLoCo(model, opt, Comm(), sync_every=4, fragments=2, overlap_steps=2, **kw)
