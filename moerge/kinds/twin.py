"""``twin``: exclusive knowledge ``W_e - W_s`` compressed by a truncated SVD at ``rank`` (Twin-Merging,
Lu et al. 2024, https://arxiv.org/abs/2406.15479).  Stored as factors U (out, r) = U_r S_r and V (r, in);
exact at full rank.

The factorisation (:mod:`moerge.linalg`) is exact for small matrices and a seeded randomized SVD for large ones
(``routing.expert.svd: auto | exact | randomized``; randomized stays within 1% of the exact truncated SVD's
error, at a small fraction of the time).  A matrix larger than one block is factorised over its row blocks
(:meth:`Twin.build_rows`): the delta is assembled once into a file-backed scratch matrix (page cache, not heap)
and the randomized SVD's products read it.  When the expert is a LoRA adapter whose factors reproduce ``W_e - W_s`` (the shared weight is the base),
the SVD is taken through the factors (two thin QRs and an r x r SVD) instead of the (out, in) matrix."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from ..linalg import (
    choose_method,
    dense_operator,
    factors_match,
    low_rank_factors,
    randomized_factors,
    svd_factors,
    svd_of_product,
)
from .base import ExpertKind, KindConfig, Read, Rows, Scratch, Shapes, delta_matrix, heap_scratch, register

__all__ = ["DEFAULT_RANK", "Twin", "factors_match", "svd_factors", "svd_of_product"]

DEFAULT_RANK = 16


@register
class Twin(ExpertKind):
    name = "twin"
    params = ("rank", "svd")

    @staticmethod
    def rank(out: int, in_: int, cfg: KindConfig) -> int:
        return min(cfg.rank or DEFAULT_RANK, out, in_)

    def config_like(self, stored: list[dict[str, tuple[int, ...]]], out: int, in_: int, cfg: KindConfig) -> KindConfig:
        return dataclasses.replace(cfg, rank=max(s["U"][1] for s in stored)) if stored else cfg

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        r = self.rank(out, in_, cfg)
        return {"U": ((out, r), None), "V": ((r, in_), None)}

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
            U, V = low_rank_factors(delta, rank, method=cfg.svd or "auto")
        return {"U": U, "V": V}

    def build_rows(self, shape: tuple[int, int], ranges: list[Rows], read: Read,
                   factors: tuple[torch.Tensor, torch.Tensor] | None, cfg: KindConfig,
                   scratch: Scratch = heap_scratch) -> Iterator[tuple[str, torch.Tensor]]:
        """Randomized factors of ``W_e - W_s`` assembled once from its row blocks into ``scratch`` (a file-backed
        matrix in a build: page cache, not heap); the whole matrices when an exact SVD is asked for (or chosen)
        or the expert's LoRA factors may give the delta exactly."""
        rank = self.rank(*shape, cfg)
        method = cfg.svd or "auto"
        if method == "auto":
            method = choose_method(shape, rank)
        if method == "exact" or factors is not None:
            yield from super().build_rows(shape, ranges, read, factors, cfg)
            return
        delta = delta_matrix(shape, ranges, read, scratch)  # (O, I) float32
        U, V = randomized_factors(dense_operator(delta), rank)
        yield "U", U
        yield "V", V
