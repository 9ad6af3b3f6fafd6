"""``wemoe``: dense task vectors relative to the shared weight, mixed by router coefficients
(Weight-Ensembling MoE, Tang et al. 2024, https://arxiv.org/abs/2402.00433).  Exact."""

from __future__ import annotations

import torch

from .base import FullMatrix, register


@register
class WEMoE(FullMatrix):
    name, key = "wemoe", "delta"

    def matrix(self, w_s: torch.Tensor, w_e: torch.Tensor) -> torch.Tensor:
        return w_e - w_s  # (out, in)
