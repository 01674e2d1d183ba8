"""The built-in GPT (a nanoGPT-style decoder-only transformer) and the model factory.

Reads bottom-up: attention, MLP, block, then the model. Architecture knobs come from
:class:`loco_contract.config.GPTSpec`. Contract of every model the trainer accepts (built-in or
``name: custom``): ``forward(idx, targets=None) -> (logits, loss)`` where ``idx`` and ``targets``
are ``(B, T)`` int64 token tensors and ``loss`` is the mean cross-entropy (None without targets).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from loco_contract.config import GPTSpec, ModelSpec


class ModelBuildError(ValueError):
    """The model section of the config cannot be turned into a module (the message names the field)."""


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot switch the bias off alone)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, spec: GPTSpec) -> None:
        super().__init__()
        self.n_head = spec.n_head
        self.n_embd = spec.n_embd
        self.dropout = spec.dropout
        self.c_attn = nn.Linear(spec.n_embd, 3 * spec.n_embd, bias=spec.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias)
        self.resid_dropout = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward block (4x expansion, GELU)."""

    def __init__(self, spec: GPTSpec) -> None:
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, spec: GPTSpec) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(spec.n_embd, bias=spec.bias)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = LayerNorm(spec.n_embd, bias=spec.bias)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer with tied input/output embeddings (GPT-2 layout)."""

    def __init__(self, spec: GPTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(spec.vocab_size, spec.n_embd),
                wpe=nn.Embedding(spec.block_size, spec.n_embd),
                drop=nn.Dropout(spec.dropout),
                h=nn.ModuleList([Block(spec) for _ in range(spec.n_layer)]),
                ln_f=LayerNorm(spec.n_embd, bias=spec.bias),
            )
        )
        self.lm_head = nn.Linear(spec.n_embd, spec.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output projection is the token embedding.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scale the init of residual projections by 1/sqrt(2 * n_layer), since every
        # block adds two contributions to the residual stream.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * spec.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position table (the token table counts once,
        as the tied output projection)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM paper appendix B:
        ``6 N + 12 L H Q T`` with N parameters, L layers, H heads, Q head size, T context."""
        s = self.spec
        t = seq_len or s.block_size
        return 6.0 * self.num_params() + 12.0 * s.n_layer * s.n_head * (s.n_embd // s.n_head) * t

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx``: (B, T) int64 tokens -> (logits (B, T, vocab), mean cross-entropy or None)."""
        B, T = idx.shape
        if T > self.spec.block_size:
            raise ValueError(f"sequence length {T} exceeds model.gpt.blockSize {self.spec.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss


def _import_factory(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelBuildError(
            f"model.factory {ref!r}: cannot import module {module_name!r} ({exc}); "
            f"install the package into the trainer image or fix the module path"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ModelBuildError(f"model.factory {ref!r}: module {module_name!r} has no attribute {attr!r}") from exc


def build_model(spec: ModelSpec) -> nn.Module:
    """The module described by ``spec``: the built-in :class:`GPT` or ``factory(**kwargs)``.

    Seed torch before calling it for a reproducible init. Raises :class:`ModelBuildError` naming
    ``model.factory`` / ``model.kwargs`` when a custom factory cannot be used.
    """
    if spec.name == "gpt":
        return GPT(spec.gpt)
    factory = _import_factory(spec.factory or "")
    if not callable(factory):
        raise ModelBuildError(f"model.factory {spec.factory!r} is not callable")
    try:
        model = factory(**spec.kwargs)
    except TypeError as exc:
        raise ModelBuildError(f"model.factory {spec.factory!r} rejected model.kwargs {spec.kwargs!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelBuildError(
            f"model.factory {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module; "
            f"it must return a module whose forward(idx, targets) returns (logits, loss)"
        )
    return model


def num_params(model: nn.Module) -> int:
    """Parameter count of any model (the GPT's own method when it has one)."""
    if isinstance(model, GPT):
        return model.num_params()
    return sum(p.numel() for p in model.parameters())
