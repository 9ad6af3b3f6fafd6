"""``sparse``: the top-``density`` magnitudes of ``W_e - W_s`` (a dense shared model plus sparse experts,
as in Mediator, Lai et al. 2025, https://arxiv.org/abs/2502.04411).  Exact at density 1."""

from __future__ import annotations

import torch

from ..merge.sparsify import keep_count
from . import ExpertKind, KindConfig, Shapes, register

DEFAULT_DENSITY = 0.1


@register
class Sparse(ExpertKind):
    name = "sparse"
    params = ("density",)

    @staticmethod
    def nnz(out: int, in_: int, cfg: KindConfig) -> int:
        return keep_count(out * in_, cfg.density or DEFAULT_DENSITY)

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        k = self.nnz(out, in_, cfg)
        return {"indices": ((k,), torch.int32), "values": ((k,), None)}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        flat = (w_e - w_s).reshape(-1)  # (out * in,)
        idx = torch.topk(flat.abs(), self.nnz(*w_s.shape, cfg), sorted=False).indices.sort().values  # (k,)
        return {"indices": idx.to(torch.int32), "values": flat[idx]}
