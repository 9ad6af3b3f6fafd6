"""``dense``: each expert's own full weight (sparse upcycling, Komatsuzaki et al. 2023,
https://arxiv.org/abs/2212.05055).  Exact; E full copies of every routed linear."""

from __future__ import annotations

import torch

from .base import FullMatrix, register


@register
class Dense(FullMatrix):
    name, key = "dense", "weight"
    anchorable = False  # stores W_e itself

    def matrix(self, w_s: torch.Tensor, w_e: torch.Tensor) -> torch.Tensor:
        return w_e  # (out, in)
