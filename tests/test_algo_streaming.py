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
@pytest.mark.parametrize("quantization", ["e3m0", "none"])
def test_streaming_fragments_overlap_quantise_and_resume_with_a_pending_exchange(rank_pool, quantization: str) -> None:
    results = rank_pool.run(_streaming_e3m0, 2, args=(quantization,))
    for res in results:
        assert res["in_flight"] == [0]
        # every fragment merges on its own schedule: 12 steps / (H/P) = 6 exchanges, alternating fragments
        kind = "all_gather" if quantization == "e3m0" else "all_reduce"
        assert [k for k, _ in res["records"]] == [kind] * 6
        sizes = [nb for _, nb in res["records"]]
        assert sizes[0::2] == [sizes[0]] * 3 and sizes[1::2] == [sizes[1]] * 3
        if quantization == "e3m0":
            assert res["bytes"] == pytest.approx(res["formula"], rel=0.01)
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
