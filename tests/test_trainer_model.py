"""The built-in GPT and the model factory."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from loco_contract.config import GPTSpec, ModelSpec
from loco_trainer.model import GPT, ModelBuildError, build_model

TINY = GPTSpec(n_layer=2, n_head=2, n_embd=32, block_size=64)


def test_forward_shapes_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = torch.randint(0, 256, (3, 16)), torch.randint(0, 256, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 256)
    # GPT-2 init gives near-uniform predictions: loss close to ln(vocab)
    assert abs(loss.item() - math.log(256)) < 0.3
    logits, loss = model(idx)
    assert loss is None and logits.shape == (3, 16, 256)


def test_weights_are_tied_and_param_count_matches_formula():
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight
    C, L, V = 32, 2, 256
    per_block = 4 * C * C + 8 * C * C + 2 * C  # attn qkv+proj, mlp, two LayerNorm weights (no bias)
    expected = V * C + L * per_block + C  # tied embedding counted once, final LayerNorm
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + 64 * C


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTSpec(n_layer=8, n_head=4, n_embd=256, block_size=32))
    proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert fc_std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_flops_per_token_follows_palm_formula():
    model = GPT(TINY)
    assert model.flops_per_token(32) == 6 * model.num_params() + 12 * 2 * 2 * 16 * 32


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="blockSize"):
        GPT(TINY)(torch.zeros(1, 65, dtype=torch.long))


def test_tiny_gpt_learns_a_repeated_sequence():
    torch.manual_seed(0)
    model = GPT(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.arange(33).repeat(4, 1) % 7
    first = None
    for _ in range(30):
        _, loss = model(data[:, :-1], data[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 3


def _install_fake_module(monkeypatch, **attrs):
    mod = types.ModuleType("loco_test_models")
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, "loco_test_models", mod)


def test_custom_factory_is_called_with_kwargs(monkeypatch):
    _install_fake_module(monkeypatch, make=lambda width: torch.nn.Linear(width, width))
    model = build_model(ModelSpec(name="custom", factory="loco_test_models:make", kwargs={"width": 3}))
    assert isinstance(model, torch.nn.Linear) and model.in_features == 3


@pytest.mark.parametrize(
    "factory, attrs, match",
    [
        ("no_such_pkg_xyz.mod:make", {}, "model.factory.*cannot import"),
        ("loco_test_models:missing", {}, "model.factory.*no attribute 'missing'"),
        ("loco_test_models:make", {"make": lambda: 42}, "model.factory.*returned int, not a torch.nn.Module"),
        ("loco_test_models:make", {"make": lambda: torch.nn.Linear(1, 1)}, None),
    ],
)
def test_custom_factory_errors_name_the_field(monkeypatch, factory, attrs, match):
    _install_fake_module(monkeypatch, **attrs)
    spec = ModelSpec(name="custom", factory=factory)
    if match is None:
        assert isinstance(build_model(spec), torch.nn.Module)
    else:
        with pytest.raises(ModelBuildError, match=match):
            build_model(spec)


def test_factory_rejecting_kwargs_names_model_kwargs(monkeypatch):
    _install_fake_module(monkeypatch, make=lambda: torch.nn.Linear(1, 1))
    with pytest.raises(ModelBuildError, match="model.kwargs"):
        build_model(ModelSpec(name="custom", factory="loco_test_models:make", kwargs={"bogus": 1}))
