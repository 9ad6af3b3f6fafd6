"""``twin``: exclusive knowledge ``W_e - W_s`` compressed by truncated SVD at ``rank`` (Twin-Merging,
Lu et al. 2024, https://arxiv.org/abs/2406.15479).  Stored as factors U (out, r) = U_r S_r and V (r, in);
exact at full rank.

When the expert is a LoRA adapter whose factors reproduce ``W_e - W_s`` (the shared weight is the base), the
SVD is taken through the factors (two thin QRs and an r x r SVD) instead of the full (out, in) matrix: the
same result, a small fraction of the work.  The factorisations live in :mod:`moerge.linalg`."""

from __future__ import annotations

import torch

from ..linalg import factors_match, svd_factors, svd_of_product
from . import KINDS, KindConfig

__all__ = ["DEFAULT_RANK", "Twin", "factors_match", "svd_factors", "svd_of_product"]

DEFAULT_RANK = 16


class Twin:
    name, exact, needs_lora = "twin", False, False

    @staticmethod
    def rank(out: int, in_: int, cfg: KindConfig) -> int:
        return min(cfg.rank or DEFAULT_RANK, out, in_)

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> dict:
        r = self.rank(out, in_, cfg)
        return {"U": ((out, r), "float"), "V": ((r, in_), "float")}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None,
              cfg: KindConfig) -> dict[str, torch.Tensor]:
        delta = w_e - w_s  # (out, in)
        rank = self.rank(*w_s.shape, cfg)
        if factors_match(delta, factors, float(w_e.abs().max())):
            U, V = svd_of_product(*factors, rank)  # type: ignore[misc]
            if U.shape[1] < rank:  # the adapter's rank is below the stored rank: pad with zeros
                U = torch.nn.functional.pad(U, (0, rank - U.shape[1]))
                V = torch.nn.functional.pad(V, (0, 0, 0, rank - V.shape[0]))
        else:
            U, V = svd_factors(delta, rank)
        return {"U": U, "V": V}


KINDS.add("twin", Twin())
