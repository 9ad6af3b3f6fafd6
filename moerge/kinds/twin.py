"""``twin``: exclusive knowledge ``W_e - W_s`` compressed by truncated SVD at ``rank`` (Twin-Merging,
Lu et al. 2024, https://arxiv.org/abs/2406.15479).  Stored as factors U (out, r) = U_r S_r and V (r, in);
exact at full rank.

When the expert is a LoRA adapter whose factors reproduce ``W_e - W_s`` (the shared weight is the base), the
SVD is taken through the factors (two thin QRs and an r x r SVD) instead of the full (out, in) matrix: the
same result, a small fraction of the work."""

from __future__ import annotations

import torch

from . import ExpertKind, KindConfig, Shapes, register

DEFAULT_RANK = 16


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (out, in): U (out, r) with singular values folded in, V (r, in)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def svd_of_product(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`svd_factors` of ``B @ A`` for A (q, in), B (out, q), without forming the product's SVD in full."""
    qb, rb = torch.linalg.qr(B.float())  # (out, q), (q, q)
    qa, ra = torch.linalg.qr(A.float().T)  # (in, q), (q, q)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # (q, q) each; B @ A = qb (rb ra^T) qa^T
    U = (qb @ u[:, :rank]) * s[:rank]  # (out, r)
    V = vh[:rank] @ qa.T  # (r, in)
    return U.contiguous(), V.contiguous()


def factors_match(delta: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None,
                  magnitude: float) -> bool:
    """Whether LoRA factors (A (q, in), B (out, q)) reproduce ``delta`` up to the float32 rounding of weights of
    size ``magnitude`` (``delta`` is a difference of two such weights)."""
    if factors is None or factors[0].shape[0] == 0:
        return False
    A, B = factors
    err = (delta.float() - B.float() @ A.float()).abs().max()
    tol = 4 * torch.finfo(torch.float32).eps * magnitude + 1e-6 * float(delta.abs().max())
    return bool(err <= tol)


@register
class Twin(ExpertKind):
    name = "twin"
    params = ("rank",)

    @staticmethod
    def rank(out: int, in_: int, cfg: KindConfig) -> int:
        return min(cfg.rank or DEFAULT_RANK, out, in_)

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
            U, V = svd_factors(delta, rank)
        return {"U": U, "V": V}

