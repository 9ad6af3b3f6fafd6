"""Static merge methods as rows of one table: (sparsifier, sign consensus, normalise, rescale).

``merge_tensor`` is pure: base tensor and expert task vectors in, merged tensor out (fp32 math).  Every
method except ``linear`` works on task vectors ``tau_i = W_i - W_base``::

    tau_i'  = sparsify(tau_i) * w_i                       # (N, ...) weighted, trimmed
    mask    = sign_consensus(tau')          (if any)      # (N, ...) bool
    merged  = sum_i tau_i' * mask / sum_i w_i * mask      (divide only when normalising)
    W       = W_base + lambda * merged

``linear`` is the weighted average of the experts themselves (model soups, Wortsman et al. 2022,
https://arxiv.org/abs/2203.05482); ``task_arithmetic`` is Ilharco et al. 2023, https://arxiv.org/abs/2212.04089.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..registry import Registry
from .consensus import sign_mask
from .sparsify import SPARSIFIERS


@dataclass(frozen=True)
class MergeMethod:
    name: str
    sparsify: str | None = None
    consensus: str | None = None
    normalize: bool = False
    rescale: bool = False
    params: tuple[str, ...] = ()  # which recipe keys the method accepts beyond weights/lambda
    paper: str = ""


@dataclass(frozen=True)
class MergeParams:
    """Resolved parameters for one merge (per-expert weights in expert order)."""

    weights: tuple[float, ...]
    density: float = 1.0
    lambda_: float = 1.0
    epsilon: float = 0.15
    gamma: float = 0.01
    normalize: bool = False
    rescale: bool = False
    seed: int = 0


METHODS: Registry[MergeMethod] = Registry("merge method")
for _m in (
    MergeMethod("linear", normalize=True, paper="https://arxiv.org/abs/2203.05482"),
    MergeMethod("task_arithmetic", paper="https://arxiv.org/abs/2212.04089"),
    MergeMethod("ties", "magnitude", "sum", normalize=True, params=("density",), paper="https://arxiv.org/abs/2306.01708"),
    MergeMethod("dare_linear", "random", None, rescale=True, params=("density",), paper="https://arxiv.org/abs/2311.03099"),
    MergeMethod("dare_ties", "random", "sum", rescale=True, params=("density",), paper="https://arxiv.org/abs/2311.03099"),
    MergeMethod("breadcrumbs", "outliers", None, params=("density", "gamma"), paper="https://arxiv.org/abs/2312.06795"),
    MergeMethod("della", "magprune", "sum", normalize=True, rescale=True, params=("density", "epsilon"),
                paper="https://arxiv.org/abs/2406.11617"),
):
    METHODS.add(_m.name, _m)


def tensor_generator(seed: int, tensor_name: str, expert_index: int) -> torch.Generator:
    """A generator that depends only on (seed, tensor, expert): same recipe + seed -> same bytes."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}:{expert_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def weighted_task_vectors(method: MergeMethod, taus: list[torch.Tensor], p: MergeParams, tensor_name: str = "",
                          masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(N, ...) sparsified task vectors times their weights.  ``masks``: keep-masks computed elsewhere (a row
    block of a tensor streamed in blocks, :mod:`.streaming`) instead of the method's sparsifier."""
    shape = taus[0].shape
    w = torch.tensor(p.weights, dtype=torch.float32, device=taus[0].device).reshape(-1, *([1] * len(shape)))
    deltas = torch.empty((len(taus), *shape), dtype=torch.float32, device=taus[0].device)  # (N, ...)
    for i, tau in enumerate(taus):
        if masks is not None:
            tau = tau * masks[i]
        elif method.sparsify:
            tau = SPARSIFIERS[method.sparsify](tau, p.density, rescale=p.rescale, gamma=p.gamma, epsilon=p.epsilon,
                                               generator=tensor_generator(p.seed, tensor_name, i))
        torch.mul(tau, w[i], out=deltas[i])
    return deltas


def combine(method: MergeMethod, deltas: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """Sign consensus (if any) and normalisation of the (N, ...) weighted task vectors -> merged task vector."""
    w = torch.tensor(p.weights, dtype=torch.float32, device=deltas.device).reshape(-1, *([1] * (deltas.dim() - 1)))
    if method.consensus:
        mask = sign_mask(deltas, method.consensus)  # (N, ...) bool
        merged = deltas.mul_(mask).sum(0)
        if not p.normalize:
            return merged
        divisor = (w * mask).sum(0)
        divisor.masked_fill_(divisor == 0, 1.0)
    else:
        merged = deltas.sum(0)
        if not p.normalize:
            return merged
        divisor = w.sum(0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1.0)
    return merged.div_(divisor)


def merge_task_vectors(method: MergeMethod, taus: list[torch.Tensor], p: MergeParams, tensor_name: str = "",
                       masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Combine task vectors (each shaped like the weight) into one merged task vector (before lambda)."""
    return combine(method, weighted_task_vectors(method, taus, p, tensor_name, masks), p)


def merge_tensor(method: MergeMethod, base: torch.Tensor, taus: list[torch.Tensor | None], p: MergeParams,
                 tensor_name: str = "", masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Merged fp32 weight from the base and the experts' task vectors (``None`` = zero task vector); ``masks`` as
    in :func:`weighted_task_vectors`."""
    base32 = base.float()
    if method.name == "linear":
        total = sum(p.weights)
        out = torch.zeros_like(base32)
        for w, tau in zip(p.weights, taus):
            out.add_(base32 + tau if tau is not None else base32, alpha=w)
        return out / total if p.normalize and abs(total) > 1e-8 else out
    if all(t is None for t in taus):
        return base32
    full = [t if t is not None else torch.zeros_like(base32) for t in taus]
    merged = merge_task_vectors(method, full, p, tensor_name, masks)
    del full
    if p.lambda_ != 1:
        merged.mul_(p.lambda_)
    return merged.add_(base32)
