"""``bit1``: ``W_e - W_s`` as packed sign bits plus one scale per output row (BitDelta, Liu et al. 2024,
https://arxiv.org/abs/2402.10193; 1bit-Merging).  Δ ≈ scale[:, None] * sign(Δ), scale = mean |Δ| per row,
the L2-optimal scale for a fixed sign pattern.  Bits are little-endian within a byte (column 8k+j is bit j
of byte k; the model's ``unpack_bits`` reads them back); zeros count as +."""

from __future__ import annotations

import torch
from einops import rearrange

from ..modeling.modeling_moerge import unpack_bits
from .base import KindConfig, RowWise, Shapes, register


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """(out, in) float -> (out, ceil(in / 8)) uint8."""
    bits = (delta >= 0).to(torch.int32)  # (out, in)
    bits = torch.nn.functional.pad(bits, (0, -delta.shape[1] % 8))  # (out, 8 * nb)
    weights = 2 ** torch.arange(8, dtype=torch.int32, device=delta.device)  # (8,)
    return (rearrange(bits, "o (nb j) -> o nb j", j=8) * weights).sum(-1).to(torch.uint8)  # (out, nb)


def unpack_signs(packed: torch.Tensor, in_: int) -> torch.Tensor:
    """(out, nb) uint8 -> (out, in) float of ±1 (the model's bit order)."""
    return unpack_bits(packed, in_).float() * 2 - 1


def bit1_delta(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs (packed) and per-row scale of ``delta``; the reconstruction error is ``|Δ - scale*sign(Δ)|``."""
    return pack_signs(delta), delta.abs().mean(dim=1)


@register
class Bit1(RowWise):
    name = "bit1"

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        return {"signs": ((out, (in_ + 7) // 8), torch.uint8), "scale": ((out,), None)}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        signs, scale = bit1_delta(w_e - w_s)
        return {"signs": signs, "scale": scale}
