"""Sparsifiers: keep part of a task vector.  Pure functions, tensors in, tensors out.

* ``magnitude`` - keep the top ``density`` fraction by |value| (TIES, Yadav et al. 2023,
  https://arxiv.org/abs/2306.01708); the threshold comes from ``topk``, never a full sort.
* ``random`` - Bernoulli keep with probability ``density`` (DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099).
* ``outliers`` - drop the top ``gamma`` fraction and the smallest, keep ``density`` (Model Breadcrumbs,
  Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795).
* ``magprune`` - per-row keep probability rising linearly with magnitude rank within
  ``density +- epsilon`` (DELLA, Deep et al. 2024, https://arxiv.org/abs/2406.11617).

``rescale`` (DARE/DELLA) multiplies the kept values so the L1 norm of the tensor is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Sparsifier = Callable[..., torch.Tensor]


def keep_count(numel: int, density: float) -> int:
    return max(1, int(density * numel))


def rescale_l1(tau: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm equals ``tau``'s (unchanged when either is ~0)."""
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _finish(tau: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = tau * mask
    return rescale_l1(tau, kept) if rescale else kept


def magnitude(tau: torch.Tensor, density: float, *, rescale: bool = False, **_: object) -> torch.Tensor:
    if density >= 1:
        return tau
    flat = tau.abs().reshape(-1)
    idx = torch.topk(flat, keep_count(flat.numel(), density), sorted=False).indices
    mask = torch.zeros_like(flat).index_fill_(0, idx, 1.0).reshape(tau.shape)
    return _finish(tau, mask, rescale)


def random(tau: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None,
           **_: object) -> torch.Tensor:
    if density >= 1:
        return tau
    mask = torch.bernoulli(torch.full_like(tau, density), generator=generator)
    return _finish(tau, mask, rescale)


def outliers(tau: torch.Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False,
             **_: object) -> torch.Tensor:
    if density >= 1:
        return tau
    flat = tau.abs().reshape(-1)
    n = flat.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    # keep ranks [n_bottom, n_bottom + n_keep) in ascending |tau| order: drop the n_bottom smallest and the rest on top
    keep_top = torch.topk(flat, n - n_bottom, sorted=False).indices if n - n_bottom > 0 else flat.new_zeros(0).long()
    mask = torch.zeros_like(flat)
    mask[keep_top] = 1.0
    drop = (n - n_bottom) - n_keep
    if drop > 0:
        mask[torch.topk(flat, drop, sorted=False).indices] = 0.0
    return _finish(tau, mask.reshape(tau.shape), rescale)


def magprune(tau: torch.Tensor, density: float, *, epsilon: float = 0.15, rescale: bool = True,
             generator: torch.Generator | None = None, **_: object) -> torch.Tensor:
    if density >= 1:
        return tau
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"DELLA needs 0 < density - epsilon and density + epsilon < 1 (density {density}, "
                         f"epsilon {epsilon})")
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)  # (R, N)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float()  # (R, N), 0 = smallest
    span = (ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values).clamp_min(1)
    probs = (density - epsilon) + (ranks / span).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator)
    out = rows * mask
    if rescale:
        out = rescale_l1(rows, out)
    return out.reshape(tau.shape)


SPARSIFIERS: dict[str, Sparsifier] = {"magnitude": magnitude, "random": random, "outliers": outliers,
                                      "magprune": magprune}
