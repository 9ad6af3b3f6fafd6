"""``sparse``: the top-``density`` magnitudes of ``W_e - W_s`` (a dense shared model plus sparse experts,
as in Mediator, Lai et al. 2025, https://arxiv.org/abs/2502.04411).  Exact at density 1."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from ..merge.sparsify import keep_count
from ..merge.streaming import TopK
from .base import ExpertKind, KindConfig, Read, Rows, Scratch, Shapes, delta_matrix, heap_scratch, register

DEFAULT_DENSITY = 0.1


@register
class Sparse(ExpertKind):
    name = "sparse"
    params = ("density",)

    @staticmethod
    def nnz(out: int, in_: int, cfg: KindConfig) -> int:
        return keep_count(out * in_, cfg.density or DEFAULT_DENSITY)

    def config_like(self, stored: list[dict[str, tuple[int, ...]]], out: int, in_: int, cfg: KindConfig) -> KindConfig:
        if not stored:
            return cfg
        k = max(s["indices"][0] for s in stored)
        return dataclasses.replace(cfg, density=(k + 0.5) / (out * in_))  # keep_count floors: exactly k kept

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        k = self.nnz(out, in_, cfg)
        return {"indices": ((k,), torch.int32), "values": ((k,), None)}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        flat = (w_e - w_s).reshape(-1)  # (out * in,)
        idx = torch.topk(flat.abs(), self.nnz(*w_s.shape, cfg), sorted=False).indices.sort().values  # (k,)
        return {"indices": idx.to(torch.int32), "values": flat[idx]}

    def build_rows(self, shape: tuple[int, int], ranges: list[Rows], read: Read,
                   factors: object, cfg: KindConfig, scratch: Scratch = heap_scratch) -> Iterator[tuple[str, torch.Tensor]]:
        """The top magnitudes over row blocks: an exact streamed top-k (ties at the cut keep the lowest flat
        indices), then the kept entries block by block; the delta is assembled once (:func:`delta_matrix`)
        and its blocks are views."""
        delta = delta_matrix(shape, ranges, read, scratch)  # (O, I)

        def deltas() -> Iterator[torch.Tensor]:
            return (delta[a:b].reshape(-1) for a, b in ranges)  # (b * in,) each

        top = TopK(shape[0] * shape[1], self.nnz(*shape, cfg)).fit(lambda: (d.abs() for d in deltas()))
        idx, values = [], []
        for rows, flat in zip(ranges, deltas()):
            keep = torch.nonzero(top.mask(flat.abs())).flatten()  # (k_b,) sorted
            idx.append(keep + rows[0] * shape[1])
            values.append(flat[keep])
        yield "indices", torch.cat(idx).to(torch.int32)
        yield "values", torch.cat(values)
