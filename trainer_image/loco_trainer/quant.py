"""Low-precision wire formats for exchanged outer gradients (Streaming DiLoCo).

A list of fp32 tensors is packed into one 1-D *payload* tensor that travels through an all-gather;
every rank unpacks all payloads back to fp32 and averages them in fp32 (accumulation never happens
in the low precision). Formats (``mode``):

* ``none``: fp32 (4 bytes per element) — the payload is the flat tensor itself.
* ``bf16``: bfloat16 (2 bytes per element), round-to-nearest-even.
* ``e3m0``: 4-bit floats, two per byte, with one fp32 scale per tensor (the tensor's max-abs).
  A code is ``s eee``: sign bit ``s`` and a 3-bit exponent ``k``; ``k = 0`` encodes zero, ``k >= 1``
  encodes ``±scale · 2^(k-7)``, so the representable magnitudes are scale·{2⁻⁶, …, 2⁻¹, 1}.
  Encoding rounds the exponent to the nearest integer in the log domain, so for ``|x| >= scale·2^-6.5``
  the relative error is at most √2 − 1 (< 0.415) and smaller values (rounded to 0 or scale·2⁻⁶)
  err by at most ``scale·2^-6``. Payload: ``ceil(numel/2) + 4·num_tensors`` bytes (≈ 1/8 of fp32).

All functions are pure (no state); ``pack``/``unpack`` are inverse up to the rounding above and
``payload_nbytes`` gives the exact payload size without packing.

``pack_flat``/``unpack_flat`` do the same for one flat run of elements that cuts across tensors (a chunk of a
reduce-scatter): E3M0 then takes one fp32 scale per block of :data:`BLOCK` elements instead of one per tensor,
``ceil(numel/2) + 4·ceil(numel/BLOCK)`` bytes (≈ 0.53 byte per element).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

MODES = ("none", "bf16", "e3m0")

_E3M0_MAX_EXP = 7  # k in 1..7 -> 2^(k-7) in [2^-6, 1]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {', '.join(MODES)} (got {mode!r})")


def payload_nbytes(numels: Sequence[int], mode: str) -> int:
    """Exact bytes of the payload ``pack`` produces for tensors of these element counts."""
    _check_mode(mode)
    total = sum(numels)
    if mode == "none":
        return 4 * total
    if mode == "bf16":
        return 2 * total
    return (total + 1) // 2 + 4 * len(numels)


@torch.no_grad()
def e3m0_encode(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 values 0..15, one per element) of ``x`` for the given positive scale."""
    mag = x.abs().float() / scale
    # nearest exponent in the log domain; tiny values (and exact zeros) map to code 0
    k = torch.round(torch.log2(mag.clamp_min(2.0 ** -30))) + _E3M0_MAX_EXP
    k = k.clamp(0, _E3M0_MAX_EXP).to(torch.uint8)
    sign = (x < 0).to(torch.uint8) << 3
    return torch.where(k == 0, torch.zeros_like(k), sign | k)


@torch.no_grad()
def e3m0_decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of 4-bit ``codes`` (uint8 0..15) for the given scale."""
    k = (codes & 0x7).float()
    mag = torch.where(k == 0, torch.zeros_like(k), torch.exp2(k - _E3M0_MAX_EXP)) * scale
    return torch.where((codes & 0x8) != 0, -mag, mag)


@torch.no_grad()
def pack(tensors: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """One 1-D payload holding ``tensors`` in ``mode`` (see the module docstring)."""
    _check_mode(mode)
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    if mode == "none":
        return flat
    if mode == "bf16":
        return flat.to(torch.bfloat16)
    scales = torch.stack([t.detach().abs().max().float() if t.numel() else torch.zeros(()) for t in tensors])
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero tensor: any scale works
    per_elem = torch.repeat_interleave(scales.to(flat.device), torch.tensor([t.numel() for t in tensors], device=flat.device))
    return _to_payload(e3m0_encode(flat, per_elem), scales.to(flat.device))


@torch.no_grad()
def unpack(payload: torch.Tensor, shapes: Sequence[torch.Size], mode: str) -> list[torch.Tensor]:
    """fp32 tensors of ``shapes`` from a payload produced by :func:`pack` with the same shapes."""
    _check_mode(mode)
    numels = [math.prod(s) for s in shapes]
    expected = payload_nbytes(numels, mode)
    got = payload.numel() * payload.element_size()
    if got != expected:
        raise ValueError(f"payload has {got} bytes, {expected} expected for {len(shapes)} tensors in {mode}")
    total = sum(numels)
    if mode in ("none", "bf16"):
        flat = payload.float()
    else:
        codes, scales = _from_payload(payload, total)
        per_elem = torch.repeat_interleave(scales, torch.tensor(numels, device=payload.device))
        flat = e3m0_decode(codes, per_elem)
    out, offset = [], 0
    for shape, n in zip(shapes, numels):
        out.append(flat[offset : offset + n].reshape(shape))
        offset += n
    return out


#: elements per scale of a flat E3M0 payload (:func:`pack_flat`): 4 bytes of scale per 128 elements (+6 %)
BLOCK = 128


def flat_payload_nbytes(numel: int, mode: str, block: int = BLOCK) -> int:
    """Exact bytes of the payload :func:`pack_flat` produces for ``numel`` elements."""
    _check_mode(mode)
    if mode == "none":
        return 4 * numel
    if mode == "bf16":
        return 2 * numel
    return (numel + 1) // 2 + 4 * -(-numel // block)


@torch.no_grad()
def pack_flat(flat: torch.Tensor, mode: str, block: int = BLOCK) -> torch.Tensor:
    """One 1-D payload holding the 1-D ``flat`` in ``mode``; E3M0 with one scale per ``block`` elements."""
    _check_mode(mode)
    flat = flat.detach().reshape(-1).float()
    if mode == "none":
        return flat.clone()
    if mode == "bf16":
        return flat.to(torch.bfloat16)
    n = flat.numel()
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(flat, (0, blocks * block - n)).view(blocks, block)
    scales = padded.abs().amax(dim=1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block: any scale works
    return _to_payload(e3m0_encode(padded, scales[:, None]).reshape(-1)[:n], scales)


@torch.no_grad()
def unpack_flat(payload: torch.Tensor, numel: int, mode: str, block: int = BLOCK) -> torch.Tensor:
    """The fp32 1-D tensor of ``numel`` elements a :func:`pack_flat` payload holds."""
    _check_mode(mode)
    expected = flat_payload_nbytes(numel, mode, block)
    got = payload.numel() * payload.element_size()
    if got != expected:
        raise ValueError(f"payload has {got} bytes, {expected} expected for {numel} elements in {mode}")
    if mode in ("none", "bf16"):
        return payload.float()
    codes, scales = _from_payload(payload, numel)
    per_elem = torch.repeat_interleave(scales, block)[:numel]
    return e3m0_decode(codes, per_elem)


def _to_payload(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """4-bit ``codes`` two per byte (element 2i in the low nibble, 2i+1 in the high), then the fp32 ``scales``."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return torch.cat([codes[0::2] | (codes[1::2] << 4), scales.view(torch.uint8)])


def _from_payload(payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``numel`` 4-bit codes and the fp32 scales of a :func:`_to_payload` payload."""
    nbytes_codes = (numel + 1) // 2
    packed = payload[:nbytes_codes]
    scales = payload[nbytes_codes:].clone().view(torch.float32)  # clone: realign to 4 bytes
    return torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel], scales
