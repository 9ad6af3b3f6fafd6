"""``bit1``: ``W_e - W_s`` as packed sign bits plus one scale per output row (BitDelta, Liu et al. 2024,
https://arxiv.org/abs/2402.10193; 1bit-Merging).  Δ ≈ scale[:, None] * sign(Δ), scale = mean |Δ| per row,
the L2-optimal scale for a fixed sign pattern.  Bits are little-endian within a byte (column 8k+j is bit j
of byte k); zeros count as +."""

from __future__ import annotations

import torch

from . import KINDS, KindConfig

_BITS = 2 ** torch.arange(8, dtype=torch.int32)  # (8,)


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """(out, in) float -> (out, ceil(in / 8)) uint8."""
    out, in_ = delta.shape
    bits = (delta >= 0).to(torch.int32)  # (out, in)
    bits = torch.nn.functional.pad(bits, (0, -in_ % 8))  # (out, 8 * nb)
    return (bits.reshape(out, -1, 8) * _BITS).sum(-1).to(torch.uint8)  # (out, nb)


def unpack_signs(packed: torch.Tensor, in_: int) -> torch.Tensor:
    """(out, nb) uint8 -> (out, in) float of ±1."""
    bits = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1  # (out, nb, 8)
    return (bits.reshape(packed.shape[0], -1)[:, :in_] * 2 - 1).float()


def bit1_delta(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs (packed) and per-row scale of ``delta``; the reconstruction error is ``|Δ - scale*sign(Δ)|``."""
    return pack_signs(delta), delta.abs().mean(dim=1)


class Bit1:
    name, exact, needs_lora = "bit1", False, False

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> dict:
        return {"signs": ((out, (in_ + 7) // 8), "uint8"), "scale": ((out,), "float")}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        signs, scale = bit1_delta(w_e - w_s)
        return {"signs": signs, "scale": scale}


KINDS.add("bit1", Bit1())
