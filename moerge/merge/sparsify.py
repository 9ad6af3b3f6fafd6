"""Sparsifiers: keep part of a task vector.  Pure functions, tensors in, tensors out.

* ``magnitude`` - keep the top ``density`` fraction by |value| (TIES, Yadav et al. 2023,
  https://arxiv.org/abs/2306.01708); exactly ``max(1, int(density * n))`` entries, chosen by an exact
  selection (:func:`kth_largest`), never a full sort.
* ``random`` - Bernoulli keep with probability ``density`` (DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099).
* ``outliers`` - drop the top ``gamma`` fraction and the smallest, keep ``density`` (Model Breadcrumbs,
  Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795).
* ``magprune`` - per-row keep probability rising linearly with magnitude rank within
  ``density +- epsilon`` (DELLA, Deep et al. 2024, https://arxiv.org/abs/2406.11617).

``rescale`` (DARE/DELLA) multiplies the kept values so the L1 norm of the tensor is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Sparsifier = Callable[..., torch.Tensor]


def keep_count(numel: int, density: float) -> int:
    return max(1, int(density * numel))


_SELECT_DIRECT = 1 << 16  # below this many values a plain kthvalue is as fast as the sampled bracket
_SAMPLE = 1 << 14


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th largest entry (``1 <= k <= n``) of a 1-D tensor, as a 0-dim tensor.

    Large tensors: a seeded random sample brackets the answer in ``[lo, hi]``; one pass counts the values
    above ``hi``, one more pass gathers the (few) values inside the bracket, and ``kthvalue`` on those gives
    the exact answer.  A bracket that misses (rare, checked) falls back to ``kthvalue`` on everything.  About
    5x faster than ``topk(k)`` for ``k ~ n/2`` and never sorts the whole tensor.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n < _SELECT_DIRECT:
        return torch.kthvalue(values, n - k + 1).values
    idx = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n * 1_000_003 + k))
    sample = values[idx.to(values.device)].sort().values  # (m,)
    below = (n - k) / n  # fraction of the values under the answer
    centre, margin = below * _SAMPLE, 6.0 * math.sqrt(_SAMPLE * below * (1 - below)) + 8
    lo = sample[max(0, int(centre - margin))]
    hi = sample[min(_SAMPLE - 1, int(centre + margin))]
    above = int(torch.count_nonzero(values > hi))
    rank = k - above  # rank of the answer inside the bracket, counted from its top
    if rank > 0 and bool(lo == hi):  # one value fills the bracket (e.g. many exact zeros)
        if rank <= int(torch.count_nonzero(values == lo)):
            return lo
    elif rank > 0:
        band = values[(values >= lo) & (values <= hi)]
        if rank <= band.numel():  # the answer is >= lo
            return torch.kthvalue(band, band.numel() - rank + 1).values
    return torch.kthvalue(values, n - k + 1).values


def top_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly ``k`` largest entries of a 1-D tensor (ties at the cut: lowest indices kept)."""
    n = values.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    cut = kth_largest(values, k)
    mask = values >= cut
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:  # several values equal the cut: drop the last ones
        tied = torch.nonzero(values == cut).squeeze(1)
        mask[tied[tied.numel() - extra:]] = False
    return mask


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
    flat = tau.reshape(-1)
    mask = top_mask(flat.abs(), keep_count(flat.numel(), density))
    return _finish(tau, mask.reshape(tau.shape), rescale)


def random(tau: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None,
           **_: object) -> torch.Tensor:
    if density >= 1:
        return tau
    # drawn on the CPU (the generator's device) whatever tau's device: the same mask on every device
    mask = torch.bernoulli(torch.full(tau.shape, density), generator=generator).to(tau.device)
    return _finish(tau, mask, rescale)


def outliers(tau: torch.Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False,
             **_: object) -> torch.Tensor:
    if density >= 1:
        return tau
    flat = tau.abs().reshape(-1)
    n = flat.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    # keep ranks [n_bottom, n_bottom + n_keep) in ascending |tau| order: the (n - n_bottom) largest minus the
    # (n - n_bottom - n_keep) largest (both masks break ties the same way, so one contains the other)
    mask = top_mask(flat, n - n_bottom)
    drop = (n - n_bottom) - n_keep
    if drop > 0:
        mask &= ~top_mask(flat, drop)
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
    mask = torch.bernoulli(probs.cpu(), generator=generator).to(probs.device)
    out = rows * mask
    if rescale:
        out = rescale_l1(rows, out)
    return out.reshape(tau.shape)


SPARSIFIERS: dict[str, Sparsifier] = {"magnitude": magnitude, "random": random, "outliers": outliers,
                                      "magprune": magprune}
