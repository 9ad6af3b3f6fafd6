"""``twin``: exclusive knowledge ``W_e - W_s`` compressed by truncated SVD at ``rank`` (Twin-Merging,
Lu et al. 2024, https://arxiv.org/abs/2406.15479).  Stored as factors U (out, r) = U_r S_r and V (r, in);
exact at full rank."""

from __future__ import annotations

import torch

from . import KINDS, KindConfig

DEFAULT_RANK = 16


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (out, in): U (out, r) with singular values folded in, V (r, in)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


class Twin:
    name, exact, needs_lora = "twin", False, False

    @staticmethod
    def rank(out: int, in_: int, cfg: KindConfig) -> int:
        return min(cfg.rank or DEFAULT_RANK, out, in_)

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> dict:
        r = self.rank(out, in_, cfg)
        return {"U": ((out, r), "float"), "V": ((r, in_), "float")}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        U, V = svd_factors(w_e - w_s, self.rank(*w_s.shape, cfg))
        return {"U": U, "V": V}


KINDS.add("twin", Twin())
