"""How a cached fp32 effective weight should meet 1-4 rows on this CPU (what `cached_linear` does, issue 15).

A decode step of a routed model multiplies each cached effective weight W (O, I) by the 1-4 rows of its route
group.  Forms compared, per shape and row count, on enough distinct weights that they do not sit in cache (as in a
real model), one thread unless ``--threads``:

- ``linear``: ``F.linear(x, W)`` (GEMV at one row: what the dense base runs);
- ``mm``: ``W @ x^T`` (x^T a transposed view): `cached_linear` at 2-4 rows;
- ``padded``: one row padded to two, then ``W @ x^T`` (issue 3's form at one row);
- ``blocks``: W as contiguous 1024-column blocks, ``Σ_j W_j @ x_j^T`` (issue 3's layout; padded at one row).

Prints microseconds per product and each form over ``linear`` (< 1: faster).  Run it alone:
``python bench/small_gemm.py [--threads 1]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (1536, 576), (576, 1536), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096),
          (4096, 11008)]
BLOCK = 1024


def blocks_of(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n = -(-w.shape[1] // BLOCK)
    return tuple(b.contiguous() for b in torch.tensor_split(w, n, dim=1))


def padded(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.zeros_like(x)]) if x.shape[0] == 1 else x


def blocks_mm(x: torch.Tensor, blocks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    xt, k0, acc = padded(x).t(), 0, None
    for blk in blocks:
        k1 = k0 + blk.shape[1]
        acc = torch.mm(blk, xt[k0:k1]) if acc is None else acc.addmm_(blk, xt[k0:k1])
        k0 = k1
    return acc


def per_product_us(f, items: list, reps: int) -> float:
    for it in items:
        f(it)
    t = time.perf_counter()
    for _ in range(reps):
        for it in items:
            f(it)
    return (time.perf_counter() - t) / (reps * len(items)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mib", type=int, default=300, help="MiB of distinct weights per shape (beyond the caches)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {torch.backends.cpu.get_cpu_capability()}")
    print("| shape (O x I) | rows | linear us | mm / linear | padded / linear | blocks / linear |")
    print("|---|---|---|---|---|---|")
    for o, i in SHAPES:
        count = min(60, max(2, args.mib * 2**20 // (o * i * 4)))
        ws = [torch.randn(o, i) for _ in range(count)]
        bl = [blocks_of(w) for w in ws]
        reps = max(2, int(2e9 // (count * o * i * 4)))
        for rows in (1, 2, 4):
            x = torch.randn(rows, i)
            lin = per_product_us(lambda w, x=x: F.linear(x, w), ws, reps)
            mm = per_product_us(lambda w, x=x: torch.mm(w, x.t()), ws, reps)
            pad = per_product_us(lambda w, x=x: torch.mm(w, padded(x).t()), ws, reps) if rows == 1 else float("nan")
            blk = per_product_us(lambda b, x=x: blocks_mm(x, b), bl, reps)
            print(f"| {o} x {i} | {rows} | {lin:.0f} | {mm / lin:.2f} | {pad / lin:.2f} | {blk / lin:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
