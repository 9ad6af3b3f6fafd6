"""Low-rank factorisation of weight deltas: exact truncated SVD or a seeded randomized SVD.  Pure tensor math.

Every routed low-rank kind (``twin``) stores ``delta ~= U @ V`` with U (O, r) carrying the singular values and
V (r, I) orthonormal rows.  A full ``torch.linalg.svd`` of an (O, I) matrix costs O(O I min(O, I)) and is
dominated by the part of the spectrum that is thrown away; the randomized range finder of Halko, Martinsson &
Tropp 2011 (https://arxiv.org/abs/0909.4061, Algorithm 4.4 + 5.1) costs O(O I k) per pass with k = r + oversample:

    Omega ~ N(0, 1)                     (I, k)    seeded Gaussian test matrix, drawn on the matrix's device
    Q     = qr(A @ Omega)               (O, k)    orthonormal basis of the sampled range
    repeat niter times:                           subspace (power) iteration, re-orthonormalised each half step
        Q' = qr(A^T @ Q)                (I, k)    so that small singular values are not lost to round-off
        Q  = qr(A @ Q')                 (O, k)
    B     = Q^T A = (A^T Q)^T           (k, I)
    B     = U_b S V^T                   small SVD: (k, k), (k,), (k, I)
    A    ~= (Q U_b)[:, :r] S[:r] V^T[:r]

Design choices:

* The algorithm only touches the matrix through ``A @ X`` and ``A^T @ Y`` (:class:`Operator`), so a matrix that is
  streamed in row blocks from disk (:func:`row_block_operator`) factorises in one row block of memory at a time;
  the dense case (:func:`dense_operator`) is a thin wrapper.
* Determinism: the test matrix comes from a CPU ``torch.Generator`` seeded explicitly (then moved to the
  matrix's device), never from the global RNG (``torch.svd_lowrank`` draws from it): same seed, same bytes,
  and the same sketch on a GPU as on the CPU.
* float32 math whatever the input dtype (bf16 deltas are upcast), results on the input's device.
* ``method="auto"`` takes the exact SVD where it is cheap or where the sketch would not be much thinner than the
  matrix (see :func:`choose_method`, with the measurements behind the crossover), the randomized one otherwise.
* Defaults ``oversample=16, niter=4`` keep the randomized error within 1% of the exact truncated SVD's
  (``err_rand <= 1.01 * err_exact``, relative Frobenius) on synthetic spectra from fast to flat decay, tall and
  wide shapes, and on real full-fine-tune deltas (``tests/test_linalg.py``).  Worst ratios seen: 1.0044 on a
  nearly flat spectrum with a 10% gap at the rank (256 x 1024; niter 2 gives 1.0076, niter 0 fails the bound on
  slow power laws), 1.00007 over all 840 q/k/v/o/gate/up/down deltas of the four SmolLM2-135M full fine-tunes.

:func:`svd_factors` (exact), :func:`svd_of_product` (SVD of a LoRA product B @ A through its factors) and
:func:`factors_match` live here so that every expert kind shares one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["auto", "exact", "randomized"]
CPU = torch.device("cpu")
METHODS: tuple[str, ...] = ("auto", "exact", "randomized")
OVERSAMPLE = 16
NITER = 4
SEED = 0

# ``auto`` crossover, measured with torch 2.13 on this project's 2-core CPU (1 thread, load average ~4 from other
# jobs), seconds exact / randomized (oversample 16, niter 4), best of 3:
#   256 x 256     r16 0.015/0.002  r64 0.011/0.009  r128 0.014/0.019
#   384 x 384     r16 0.030/0.003  r64 0.032/0.017  r128 0.034/0.041  r256 0.051/0.084
#   512 x 512     r16 0.094/0.008  r64 0.090/0.023  r128 0.090/0.049  r256 0.095/0.122
#   576 x 1536    r16 0.287/0.025  r64 0.273/0.063  r128 0.277/0.120  r256 0.270/0.281
#   1024 x 1024   r16 0.729/0.026  r64 0.711/0.064  r128 0.710/0.136  r256 0.708/0.347
#   1024 x 4096   r16 6.7/0.17     r64 6.9/0.38     r128 6.2/0.43     r256 5.8/1.6
#   2048 x 2048   r16 6.2/0.18     r64 8.6/0.35     r128 8.9/0.63     r256 10.1/1.2
#   4096 x 14336  r16 219/0.76 (one run; error ratio 1.00000 on a rank-64 + noise delta)
# The two meet where the sketch k = r + oversample is about 0.4 of the short side; below a short side of 256 the
# exact SVD takes milliseconds (and is exact), so it is kept there whatever the rank.
EXACT_MAX_SIDE = 256
EXACT_MIN_FRACTION = 1 / 3


@dataclass(frozen=True)
class Operator:
    """A matrix A (O, I) seen only through products: ``matmul(X) = A @ X`` for X (I, k) -> (O, k) and
    ``rmatmul(Y) = A^T @ Y`` for Y (O, k) -> (I, k); both on ``device``, in float32 (float64 for a
    :func:`dense_operator` given it)."""

    shape: tuple[int, int]
    matmul: Callable[[torch.Tensor], torch.Tensor]
    rmatmul: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device = CPU


def dense_operator(delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> Operator:
    """:class:`Operator` over an in-memory (O, I) matrix (cast to ``dtype`` once; products in ``dtype``)."""
    a = delta.to(dtype)  # (O, I)
    return Operator((a.shape[0], a.shape[1]), lambda x: a @ x.to(dtype), lambda y: a.T @ y.to(dtype), a.device)


def row_block_operator(shape: tuple[int, int], blocks: Callable[[], Iterable[tuple[int, torch.Tensor]]],
                       device: torch.device | str = "cpu") -> Operator:
    """:class:`Operator` over a matrix read in row blocks: ``blocks()`` yields ``(start_row, block (b, I))``
    covering every row once (e.g. slices of a memory-mapped tensor); each product makes one pass over them."""
    out_dim, in_dim = shape
    dev = torch.device(device)

    def matmul(x: torch.Tensor) -> torch.Tensor:  # x (I, k) -> (O, k)
        y = torch.empty(out_dim, x.shape[1], dtype=torch.float32, device=dev)
        for start, blk in blocks():
            y[start:start + blk.shape[0]] = blk.to(dev, torch.float32) @ x  # (b, I) @ (I, k) -> (b, k)
        return y

    def rmatmul(y: torch.Tensor) -> torch.Tensor:  # y (O, k) -> (I, k)
        z = torch.zeros(in_dim, y.shape[1], dtype=torch.float32, device=dev)
        for start, blk in blocks():
            z += blk.to(dev, torch.float32).T @ y[start:start + blk.shape[0]]  # (I, b) @ (b, k) -> (I, k)
        return z

    return Operator(shape, matmul, rmatmul, dev)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``x`` (n, k), n >= k (reduced QR)."""
    return torch.linalg.qr(x, mode="reduced").Q  # (n, k)


def randomized_factors(op: Operator, rank: int, *, oversample: int = OVERSAMPLE, niter: int = NITER,
                       seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of the operator's matrix by randomized subspace iteration (Halko et al. 2011,
    Alg. 4.4 + 5.1): U (O, r) with singular values folded in, V (r, I) with orthonormal rows."""
    out_dim, in_dim = op.shape
    rank = min(rank, out_dim, in_dim)
    k = min(rank + oversample, out_dim, in_dim)  # sketch width
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same test matrix on every device
    omega = torch.randn(in_dim, k, generator=g, dtype=torch.float32).to(op.device)  # (I, k)
    q = _orthonormal(op.matmul(omega))  # (O, k)
    for _ in range(niter):
        q = _orthonormal(op.matmul(_orthonormal(op.rmatmul(q))))  # (I, k) -> (O, k)
    b = op.rmatmul(q).T  # (k, I) = Q^T A
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)  # (k, k), (k,), (k, I)
    U = (q @ ub[:, :rank]) * s[:rank]  # (O, k) @ (k, r) -> (O, r)
    return U.contiguous(), vh[:rank].contiguous()  # (O, r), (r, I)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (out, in) by a full SVD: U (out, r) with singular values folded
    in, V (r, in)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def choose_method(shape: tuple[int, int], rank: int, oversample: int = OVERSAMPLE) -> str:
    """``exact`` for small matrices or sketches that are not much thinner than the matrix, else ``randomized``
    (the crossover is measured: see ``EXACT_MAX_SIDE``)."""
    short = min(shape)
    if short <= EXACT_MAX_SIDE or rank + oversample >= EXACT_MIN_FRACTION * short:
        return "exact"
    return "randomized"


def low_rank_factors(delta: torch.Tensor, rank: int, *, method: Method = "auto", oversample: int = OVERSAMPLE,
                     niter: int = NITER, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``delta`` (O, I): U (O, r) with singular values folded in, V (r, I); float32,
    on ``delta``'s device.  ``exact``: truncated full SVD; ``randomized``: :func:`randomized_factors` (same
    ``seed`` -> same bytes); ``auto``: :func:`choose_method`."""
    if delta.dim() != 2:
        raise ValueError(f"low_rank_factors needs a matrix, got shape {tuple(delta.shape)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    if method == "auto":
        method = choose_method((delta.shape[0], delta.shape[1]), rank, oversample)  # type: ignore[assignment]
    if method == "exact":
        return svd_factors(delta, rank)
    return randomized_factors(dense_operator(delta), rank, oversample=oversample, niter=niter, seed=seed)


def relative_error(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """``|delta - U @ V|_F / |delta|_F`` (0 for an all-zero ``delta`` reproduced exactly)."""
    a = delta.float()
    norm = float(torch.linalg.matrix_norm(a))
    resid = float(torch.linalg.matrix_norm(a - U @ V))  # (O, r) @ (r, I) -> (O, I)
    return resid / norm if norm > 0 else resid


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


def iter_row_blocks(matrix: torch.Tensor, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, matrix[start:start + block_rows])`` over the rows of ``matrix`` (views, no copy)."""
    for start in range(0, matrix.shape[0], block_rows):
        yield start, matrix[start:start + block_rows]
