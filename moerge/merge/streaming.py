"""Static merges of a tensor read in row blocks: the same bytes as the whole-tensor merge, in bounded memory.

A tensor larger than one block (an embedding, a 70B MLP) is read ``rows [a, b)`` at a time.  Methods whose
sparsifier looks at one element at a time (``linear``, ``task_arithmetic``) merge each block on its own.
Methods that keep the top magnitudes of the *whole* task vector (``ties``, ``breadcrumbs``) first fit an exact
:class:`TopK` per expert in two passes over the blocks (a seeded sample brackets the k-th largest value, one
pass counts above the bracket and gathers the values inside it; from 2^24 values a radix select on the values'
bits, in constant memory), then mask each block; ties at the cut keep the
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


class TopK:
    """Mask of exactly the k largest of n values, fitted over blocks (:func:`fit_tops`), then applied block by
    block in order; ties at the cut keep the lowest flat indices, like :func:`moerge.merge.sparsify.top_mask`."""

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        self.cut: torch.Tensor | None = None
        self.quota = 0  # ties at the cut still to keep (lowest flat indices first)

    @property
    def trivial(self) -> bool:
        return not 0 < self.k < self.n

    def fit(self, blocks: Blocks) -> TopK:
        """Fit this mask alone (:func:`fit_tops` over single-value blocks)."""
        fit_tops([self], lambda: ([b] for b in blocks()))
        return self

    def settle(self, cut: torch.Tensor, above: int) -> None:
        self.cut, self.quota = cut, self.k - above

    def mask(self, values: torch.Tensor) -> torch.Tensor:
        """Bool mask of one block of values (1-D), the next in order."""
        if self.trivial:
            return torch.full_like(values, self.k > 0, dtype=torch.bool)
        cut = self.cut.to(values.device)  # type: ignore[union-attr]
        keep = values > cut
        tied = torch.nonzero(values == cut).flatten()
        take = min(self.quota, tied.numel())
        keep[tied[:take]] = True
        self.quota -= take
        return keep


Passes = Callable[[], Iterable[list[torch.Tensor]]]  # a fresh pass: per block, one 1-D value block per mask


def fit_tops(tops: list[TopK], blocks: Passes) -> list[TopK]:
    """Fit every mask in two passes over the blocks (masks over :data:`_RADIX` values or more: :func:`_fit_radix`):
    a seeded sample brackets each k-th largest value, then one pass counts the values above the bracket and
    gathers those inside it, where the exact cut is.  The same
    sample and the same cut as :func:`moerge.merge.sparsify.kth_largest` on the whole tensor; a bracket that
    misses (rare) costs one more pass over that mask's values.

    What a pass keeps (samples, band values) goes into buffers allocated before the pass: small tensors kept
    from every block would each pin a freed block's memory in the allocator, and the process would grow with
    the number of blocks (measured: 1.0 GB instead of 0.5 GB on a 1.1B model's 32000 x 2048 embedding)."""
    large = [i for i, t in enumerate(tops) if not t.trivial and t.n >= _RADIX]
    if large:
        _fit_radix([tops[i] for i in large], lambda: ([v[i] for i in large] for v in blocks()))
    active = [i for i, t in enumerate(tops) if not t.trivial and t.n < _RADIX]
    if not active:
        return tops
    brackets = {i: _bracket(tops[i], sample) for i, sample in zip(active, _samples(tops, active, blocks))}
    above = dict.fromkeys(active, 0)
    bands = {i: _Buffer(_band_capacity(tops[i])) for i in active}
    for values in blocks():
        for i in active:
            v, (lo, hi) = values[i], brackets[i]
            above[i] += int(torch.count_nonzero(v > hi.to(v.device)))
            bands[i].append(v[(v >= lo.to(v.device)) & (v <= hi.to(v.device))])
    for i in active:
        _settle(tops[i], above[i], bands[i].values(), lambda i=i: (v[i] for v in blocks()))
    return tops


_RADIX = 1 << 24  # masks over at least this many values are fitted by a radix select (constant memory)
_HIGH_BINS = 1 << 15  # the upper 16 bits of a non-negative float32 (sign bit 0)
_LOW_BINS = 1 << 16  # the lower 16 bits


def _fit_radix(tops: list[TopK], blocks: Passes) -> None:
    """Fit large masks in two passes by a radix select on the values' bits (non-negative float32 values order
    like their bit patterns read as integers): the first pass counts the values per upper 16 bits, which names the
    bin holding the k-th largest; the second counts that bin's values per lower 16 bits, which gives the exact cut
    and how many values lie above it.  A mask holds two histograms and one block of keys whatever the tensor's
    size; a sample bracket's sample and band grew with it (3.4B x 4 TIES, peak anonymous RSS: 985 MiB with a 2^20
    sample, 420 MiB with a size-balanced one, 407 MiB with this; bench/RESULTS.md, "scale").  Slower than the sample's first
    pass (every value is counted), so tensors under :data:`_RADIX` values keep the sample."""
    large = list(range(len(tops)))
    high = {i: _Histogram(_HIGH_BINS) for i in large}
    for values in blocks():
        for i in large:
            high[i].add(_bits(values[i]), low=False)
    chosen = {i: high[i].select(tops[i].k) for i in large}  # (bin, values in higher bins)
    del high
    low = {i: _Histogram(_LOW_BINS) for i in large}
    for values in blocks():
        for i in large:
            bits = _bits(values[i])
            b = chosen[i][0]
            low[i].add(bits[(bits >= b << 16) & (bits < (b + 1) << 16)], low=True)
    for i in large:
        b, above = chosen[i]
        lo, within = low[i].select(tops[i].k - above)
        cut = torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32)[0]
        tops[i].settle(cut, above + within)


def _bits(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns of non-negative float32 values as int32 (ordered like the values)."""
    if values.dtype != torch.float32:
        raise TypeError(f"top-k masks fit float32 magnitudes, got {values.dtype}")
    return values.contiguous().view(torch.int32)


class _Histogram:
    """Counts of the upper or the lower 16 bits of int32 bit patterns, added block by block into buffers allocated
    once (a block's temporaries, allocated and freed per block by two workers at once, cost more than the counting)."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts: torch.Tensor | None = None
        self.keys, self.ones = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int64)

    def add(self, bits: torch.Tensor, *, low: bool) -> None:
        n = bits.numel()
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.int64, device=bits.device)
        if self.ones.numel() < n or self.ones.device != bits.device:
            self.ones = torch.ones(n, dtype=torch.int64, device=bits.device)
            self.keys = torch.empty(n, dtype=torch.int32, device=bits.device)
        keys = self.keys[:n]
        if low:
            torch.bitwise_and(bits, 0xFFFF, out=keys)
        else:
            torch.bitwise_right_shift(bits, 16, out=keys)
        self.counts.index_add_(0, keys, self.ones[:n])

    def select(self, k: int) -> tuple[int, int]:
        """The bin holding the k-th largest key (1 <= k <= total) and how many keys lie in higher bins."""
        hist = self.counts.cpu() if self.counts is not None else torch.zeros(self.bins, dtype=torch.int64)
        at_or_above = hist.flip(0).cumsum(0).flip(0)  # (bins,): keys in this bin or higher
        b = int(torch.nonzero(at_or_above >= k).max())
        return b, int(at_or_above[b] - hist[b])


class _Buffer:
    """A growing 1-D float32 CPU buffer, allocated once (doubled in the rare case it overflows)."""

    def __init__(self, capacity: int) -> None:
        self.data, self.size = torch.empty(max(1, capacity), dtype=torch.float32), 0

    def append(self, values: torch.Tensor) -> None:
        end = self.size + values.numel()
        if end > self.data.numel():
            grown = torch.empty(max(end, 2 * self.data.numel()), dtype=torch.float32)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size:end] = values.reshape(-1)
        self.size = end

    def values(self) -> torch.Tensor:
        return self.data[: self.size]


def _margin(m: int, below: float) -> float:
    return 6.0 * math.sqrt(m * below * (1 - below)) + 8


def _band_capacity(top: TopK) -> int:
    """Expected number of values inside the bracket, with room to spare (every value for a small tensor)."""
    if top.n < _SELECT_DIRECT:
        return top.n
    m, below = _SAMPLE, (top.n - top.k) / top.n
    return min(top.n, int(1.5 * top.n * (2 * _margin(m, below) + 1) / m) + 4096)


def _samples(tops: list[TopK], active: list[int], blocks: Passes) -> list[torch.Tensor]:
    """Per active mask, the sorted values at kth_largest's seeded sample positions (every value when small)."""
    idx = {i: None if tops[i].n < _SELECT_DIRECT else torch.randint(
        tops[i].n, (_SAMPLE,),
        generator=torch.Generator().manual_seed(tops[i].n * 1_000_003 + tops[i].k)).sort().values for i in active}
    parts = {i: _Buffer(tops[i].n if idx[i] is None else idx[i].numel()) for i in active}
    start = 0
    for values in blocks():
        end = start + values[active[0]].numel()
        for i in active:
            pos = idx[i]
            if pos is None:
                parts[i].append(values[i])
            else:
                lo, hi = int(torch.searchsorted(pos, start)), int(torch.searchsorted(pos, end))
                parts[i].append(values[i][(pos[lo:hi] - start).to(values[i].device)])
        start = end
    return [parts[i].values().sort().values for i in active]


def _bracket(top: TopK, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] around the k-th largest (the whole range when the sample is every value)."""
    if top.n < _SELECT_DIRECT:
        return sample[0], sample[-1]
    m, below = sample.numel(), (top.n - top.k) / top.n
    centre, margin = below * m, _margin(m, below)
    return sample[max(0, int(centre - margin))], sample[min(m - 1, int(centre + margin))]


def _settle(top: TopK, above_hi: int, band: torch.Tensor, values: Blocks) -> None:
    """The exact cut from the band (or, when the bracket missed, from every value) and the count above it."""
    rank = top.k - above_hi  # rank of the cut inside the band, counted from its top
    if not 0 < rank <= band.numel():
        band, above_hi, rank = torch.cat([v.cpu() for v in values()]), 0, top.k
    cut = torch.kthvalue(band, band.numel() - rank + 1).values
    top.settle(cut, above_hi + int(torch.count_nonzero(band > cut)))


def fit_masks(method: MergeMethod, p: MergeParams, n: int, values: Passes,
              n_experts: int) -> list[tuple[TopK, TopK | None]] | None:
    """Per expert, the fitted top-k masks of its |task vector| (``outliers``: keep-top minus drop-top), all fitted
    in the same two passes (``values()`` yields, per block, every expert's |task vector| block)."""
    if method.sparsify is None or p.density >= 1:
        return None
    if method.sparsify == "magnitude":
        tops = [TopK(n, keep_count(n, p.density)) for _ in range(n_experts)]
        fit_tops(tops, values)
        return [(t, None) for t in tops]
    n_keep, n_top = int(p.density * n), int(p.gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    drop = (n - n_bottom) - n_keep
    pairs = [(TopK(n, n - n_bottom), TopK(n, drop) if drop > 0 else None) for _ in range(n_experts)]
    per = 2 if drop > 0 else 1
    fit_tops([t for pair in pairs for t in pair if t is not None],
             lambda: ([v for v in vs for _ in range(per)] for vs in values()))
    return pairs


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

    def values() -> Iterator[list[torch.Tensor]]:
        for rows in ranges:
            base, taus = read(rows)
            yield [(t if t is not None else torch.zeros_like(base, dtype=torch.float32)).abs().reshape(-1)
                   for t in taus]

    fitted = fit_masks(method, p, math.prod(shape), values, n_experts)
    for rows in ranges:
        base, taus = read(rows)
        full = [t if t is not None else torch.zeros_like(base, dtype=torch.float32) for t in taus]
        masks = None if fitted is None else [_block_mask(f, t) for f, t in zip(fitted, full)]
        yield merge_tensor(method, base, taus if fitted is None else full, p, name, masks)
