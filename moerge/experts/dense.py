"""``dense``: each expert's own full weight (sparse upcycling, Komatsuzaki et al. 2023,
https://arxiv.org/abs/2212.05055).  Exact; E full copies of every routed linear."""

from __future__ import annotations

import torch

from . import KINDS, KindConfig


class Dense:
    name, exact, needs_lora = "dense", True, False

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> dict:
        return {"weight": ((out, in_), "float")}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        return {"weight": w_e}


KINDS.add("dense", Dense())
