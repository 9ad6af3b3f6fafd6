"""Static merges of a tensor read in row blocks: the same bytes as the whole-tensor merge, in bounded memory.

A tensor larger than one block (an embedding, a 70B MLP) is read ``rows [a, b)`` at a time.  Methods whose
sparsifier looks at one element at a time (``linear``, ``task_arithmetic``) merge each block on its own.
Methods that keep the top magnitudes of the *whole* task vector (``ties``, ``breadcrumbs``) first fit an exact
:class:`TopK` per expert in two passes over the blocks (a seeded sample brackets the k-th largest value, one
pass counts above the bracket and gathers the values inside it), then mask each block; ties at the cut keep the
lowest flat indices, exactly like :func:`moerge.merge.sparsify.top_mask`, so the result is bit-identical.
Methods with a random mask rescaled by the whole tensor's L1 norm (DARE, DELLA) are merged whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

from .methods import MergeMethod, MergeParams, merge_tensor
from .sparsify import _SAMPLE, _SELECT_DIRECT, keep_count

Rows = tuple[int, int]
Blocks = Callable[[], Iterable[torch.Tensor]]  # a fresh pass over 1-D blocks of values, in order


def row_blocks(shape: tuple[int, ...], block_bytes: int, itemsize: int = 4) -> list[Rows]:
    """Row ranges covering dimension 0 with at most ``block_bytes`` per block (one row at least)."""
    rows = shape[0] if shape else 1
    per_row = itemsize * math.prod(shape[1:]) if len(shape) > 1 else itemsize
    step = max(1, block_bytes // max(1, per_row))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def streamable(method: MergeMethod, p: MergeParams) -> bool:
    """Whether the method merges row blocks to the same bytes as the whole tensor."""
    if method.name in ("linear", "task_arithmetic"):
        return True
    return method.sparsify in ("magnitude", "outliers") and not p.rescale and method.consensus in (None, "sum")


def _gather(blocks: Iterable[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Values at the sorted flat indices ``idx`` of the concatenated blocks."""
    out, start = [], 0
    for block in blocks:
        end = start + block.numel()
        lo, hi = int(torch.searchsorted(idx, start)), int(torch.searchsorted(idx, end))
        out.append(block[(idx[lo:hi] - start).to(block.device)].cpu())
        start = end
    return torch.cat(out)


def kth_largest_blocks(blocks: Blocks, n: int, k: int) -> torch.Tensor:
    """The exact k-th largest of n values seen as blocks (the same value as ``kth_largest`` on their concat)."""
    if n < _SELECT_DIRECT:
        every = torch.cat([b.cpu() for b in blocks()])
        return torch.kthvalue(every, n - k + 1).values
    idx = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n * 1_000_003 + k))
    sample = _gather(blocks(), idx.sort().values)  # the same sample as kth_largest, in another order
    sample = sample.sort().values  # (m,)
    below = (n - k) / n
    centre, margin = below * _SAMPLE, 6.0 * math.sqrt(_SAMPLE * below * (1 - below)) + 8
    lo, hi = sample[max(0, int(centre - margin))], sample[min(_SAMPLE - 1, int(centre + margin))]
    above, band = 0, []
    for block in blocks():
        above += int(torch.count_nonzero(block > hi.to(block.device)))
        band.append(block[(block >= lo.to(block.device)) & (block <= hi.to(block.device))].cpu())
    rank, inside = k - above, torch.cat(band)
    if 0 < rank <= inside.numel():
        return torch.kthvalue(inside, inside.numel() - rank + 1).values
    every = torch.cat([b.cpu() for b in blocks()])  # the bracket missed (rare): all values once
    return torch.kthvalue(every, n - k + 1).values


class TopK:
    """Mask of exactly the k largest of n values, fitted over blocks, then applied block by block in order."""

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        self.cut: torch.Tensor | None = None
        self.quota = 0  # ties at the cut still to keep (lowest flat indices first)

    def fit(self, blocks: Blocks) -> TopK:
        if 0 < self.k < self.n:
            self.cut = kth_largest_blocks(blocks, self.n, self.k)
            above = sum(int(torch.count_nonzero(b > self.cut.to(b.device))) for b in blocks())
            self.quota = self.k - above
        return self

    def mask(self, values: torch.Tensor) -> torch.Tensor:
        """Bool mask of one block of values (1-D), the next in order."""
        if self.k >= self.n or self.k <= 0:
            return torch.full_like(values, self.k > 0, dtype=torch.bool)
        cut = self.cut.to(values.device)  # type: ignore[union-attr]
        keep = values > cut
        tied = torch.nonzero(values == cut).flatten()
        take = min(self.quota, tied.numel())
        keep[tied[:take]] = True
        self.quota -= take
        return keep


def fit_masks(method: MergeMethod, p: MergeParams, n: int, values: Callable[[int], Blocks],
              n_experts: int) -> list[tuple[TopK, TopK | None]] | None:
    """Per expert, the fitted top-k masks of its |task vector| (``outliers``: keep-top minus drop-top)."""
    if method.sparsify is None or p.density >= 1:
        return None
    if method.sparsify == "magnitude":
        return [(TopK(n, keep_count(n, p.density)).fit(values(i)), None) for i in range(n_experts)]
    n_keep, n_top = int(p.density * n), int(p.gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    drop = (n - n_bottom) - n_keep
    return [(TopK(n, n - n_bottom).fit(values(i)), TopK(n, drop).fit(values(i)) if drop > 0 else None)
            for i in range(n_experts)]


def _block_mask(fitted: tuple[TopK, TopK | None], tau: torch.Tensor) -> torch.Tensor:
    flat = tau.abs().reshape(-1)
    keep, drop = fitted
    mask = keep.mask(flat)
    if drop is not None:
        mask &= ~drop.mask(flat)
    return mask.reshape(tau.shape)


def merged_blocks(method: MergeMethod, p: MergeParams, name: str, shape: tuple[int, ...], ranges: list[Rows],
                  read: Callable[[Rows], tuple[torch.Tensor, list[torch.Tensor | None]]]) -> Iterator[torch.Tensor]:
    """The fp32 merge of ``name`` block by block; ``read(rows)`` gives the base block and the task-vector blocks."""
    n_experts = len(p.weights)

    def values(i: int) -> Blocks:
        def passes() -> Iterator[torch.Tensor]:
            for rows in ranges:
                base, taus = read(rows)
                tau = taus[i]
                yield (tau if tau is not None else torch.zeros_like(base, dtype=torch.float32)).abs().reshape(-1)
        return passes

    fitted = fit_masks(method, p, math.prod(shape), values, n_experts)
    for rows in ranges:
        base, taus = read(rows)
        full = [t if t is not None else torch.zeros_like(base, dtype=torch.float32) for t in taus]
        masks = None if fitted is None else [_block_mask(f, t) for f, t in zip(fitted, full)]
        yield merge_tensor(method, base, taus if fitted is None else full, p, name, masks)
