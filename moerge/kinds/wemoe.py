"""``wemoe``: dense task vectors relative to the shared weight, mixed by router coefficients
(Weight-Ensembling MoE, Tang et al. 2024, https://arxiv.org/abs/2402.00433).  Exact."""

from __future__ import annotations

import torch

from . import KindConfig, RowWise, Shapes, register


@register
class WEMoE(RowWise):
    name = "wemoe"

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        return {"delta": ((out, in_), None)}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        return {"delta": w_e - w_s}  # (out, in)
