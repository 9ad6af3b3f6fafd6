"""``dense``: each expert's own full weight (sparse upcycling, Komatsuzaki et al. 2023,
https://arxiv.org/abs/2212.05055).  Exact; E full copies of every routed linear."""

from __future__ import annotations

import torch

from . import KindConfig, RowWise, Shapes, register


@register
class Dense(RowWise):
    name = "dense"

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        return {"weight": ((out, in_), None)}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        return {"weight": w_e}
