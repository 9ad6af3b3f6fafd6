"""Unknown-prompt detection for the sequence router: fit the detector's Gaussians, choose its threshold.

Pure tensor functions (features in, :class:`~moerge.checkpoint.routers.UnknownTensors` and a threshold out).

The score is the relative Mahalanobis distance (Ren et al. 2021, https://arxiv.org/abs/2106.09022) of the
router input pooled over S consecutive segments of the prompt (:func:`~moerge.modeling.modeling_moerge.segment_pool`,
a coarse positional bag of features): the distance to the nearest route's mean under the routes' shared
within-route covariance, minus the distance to the mean of all calibration prompts under their covariance.
With a few dozen prompts per route and D = S * C dimensions the covariances are shrunk towards a multiple of
the identity (``(1 - a) S + a tr(S) / D I``) and kept as their top ``max_rank`` eigenvectors, so the detector
stores O(rank * D) numbers, not D^2.  On the real pool (layer-0 inputs, 64 prompts per task) this separates
each held-out task from the three known ones at AUROC 0.99-1.0 where the router's maximum probability reaches
0.53-0.93 and energy 0.53-0.98 (``bench/RESULTS.md``, newtask).

The threshold needs no unknown prompts: it is a high quantile of out-of-fold scores of the known prompts
(k-fold: each fold scored by a detector fitted on the others), so that about ``1 - quantile`` of known prompts
fall back.  One global quantile lets a spread-out route lose more than its share (on the real full pool an added
tweets expert lost 4.5% of its prompts at q 0.98) while a compact one keeps a loose threshold that lets unknown
prompts through; per-route thresholds (:func:`route_thresholds`) take the quantile of each route's own prompts'
relative distance to their route, stored as offsets (a prompt is known when it lies within any route's own
threshold).  With n calibration prompts per route an empirical quantile above 1 - 1/n is the sample maximum, which
new prompts of the same task exceed about 1/(n + 1) of the time (1.5-3.5% of an added route's dev prompts at 51
training prompts); ``tail="exponential"`` (:func:`tail_quantile`) extrapolates the quantile from an exponential
tail fitted to the scores above their 0.9 quantile instead (peaks over threshold).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..checkpoint.routers import UnknownTensors

SHRINKAGE = 0.5
MAX_RANK = 256
SEGMENTS = 4
QUANTILE = 0.995  # per-route thresholds at 0.995 keep ~0.5-1.3% of known prompts out (real LoRA pool, RESULTS)
FOLDS = 5
THRESHOLDS = "per_route"  # a new detector's thresholds: "per_route" or "global" (calibrate --unknown-thresholds)
TAILS = ("empirical", "exponential")  # how a quantile of out-of-fold scores is taken (calibrate --unknown-tail)
TAIL = "exponential"  # a new detector's: ~51 calib prompts per route put the empirical 0.995 quantile at the
# sample maximum, which new prompts of the same task exceed ~2% of the time (real pools, RESULTS, issue 14)
TAIL_FROM = 0.9  # the exponential tail is fitted to the scores above this quantile


def shrunk_gaussian(resid: torch.Tensor, shrinkage: float, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals (N, D) -> (factor (r, D), inv_var ()) of the covariance ``(1 - a) R^T R / N + var I``, var =
    ``a tr(R^T R / N) / D``, in the form :func:`~moerge.modeling.modeling_moerge.gaussian_distance` reads."""
    n, dim = resid.shape
    total = resid.pow(2).sum() / max(n, 1)  # tr(S)
    var = (shrinkage * total / dim).clamp_min(1e-12)  # ()
    _, sing, vt = torch.linalg.svd(resid.double(), full_matrices=False)  # (N,), (N, D)
    lam = (1 - shrinkage) * sing.pow(2) / max(n, 1)  # eigenvalues of (1 - a) S
    keep = min(max_rank, int((lam > 1e-12 * max(float(lam.max()), 1e-30)).sum())) if lam.numel() else 0
    coef = (lam[:keep] / (lam[:keep] + var)).sqrt()  # (r,)
    return (coef[:, None] * vt[:keep]).float(), (1.0 / var).float().reshape(())


def fit_unknown(x: torch.Tensor, y: torch.Tensor, n_outputs: int, *, shrinkage: float = SHRINKAGE,
                max_rank: int = MAX_RANK) -> UnknownTensors:
    """Segment-pooled features x (N, D) of labelled prompts y (N,) -> the detector (float32)."""
    x = x.double()
    sums = torch.zeros(n_outputs, x.shape[1], dtype=x.dtype).index_add_(0, y, x)  # (O, D)
    means = sums / torch.bincount(y, minlength=n_outputs).clamp_min(1)[:, None].to(x.dtype)
    factor, inv_var = shrunk_gaussian(x - means[y], shrinkage, max_rank)
    center = x.mean(0)  # (D,)
    bg_factor, bg_inv_var = shrunk_gaussian(x - center, shrinkage, max_rank)
    return UnknownTensors(means.float(), factor, inv_var, center.float(), bg_factor, bg_inv_var)


def out_of_fold_scores(x: torch.Tensor, y: torch.Tensor, n_outputs: int, *, folds: int = FOLDS, seed: int = 0,
                       shrinkage: float = SHRINKAGE, max_rank: int = MAX_RANK, own: bool = False) -> torch.Tensor:
    """(N,) score of each prompt by a detector fitted on the other folds (stratified by label, seeded; labels are
    visited in order of first appearance, so grouped rows give folds that do not depend on the label values).
    ``own``: the relative distance to the prompt's own route instead of the nearest one."""
    gen = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for label in dict.fromkeys(y.tolist()):
        rows = torch.nonzero(y == label).flatten()
        fold[rows[torch.randperm(len(rows), generator=gen)]] = torch.arange(len(rows)) % folds
    scores = torch.empty(len(y))
    for k in range(folds):
        test, train = fold == k, fold != k
        if not bool(test.any()):
            continue
        det = fit_unknown(x[train], y[train], n_outputs, shrinkage=shrinkage, max_rank=max_rank)
        scores[test] = det.route_scores(x[test]).gather(1, y[test, None])[:, 0] if own else det.score(x[test])
    return scores


def route_thresholds(own: torch.Tensor, y: torch.Tensor, n_outputs: int, quantile: float = QUANTILE,
                     tail: str = TAIL) -> torch.Tensor:
    """Out-of-fold own-route scores (N,) of prompts labelled y (N,) -> (O,) thresholds: the ``quantile`` of each
    route's prompts (a route without prompts gets the quantile over all of them)."""
    every = choose_threshold(own, quantile, tail)
    return torch.tensor([choose_threshold(own[y == o], quantile, tail) if bool((y == o).any()) else every
                         for o in range(n_outputs)])


def with_route_thresholds(det: UnknownTensors, thresholds: torch.Tensor) -> tuple[UnknownTensors, float]:
    """The detector with per-route ``thresholds`` (O,) as offsets, and its scalar threshold: the loosest route's.
    ``score > threshold`` then holds exactly when every route o has ``d_o - back > thresholds[o]``."""
    top = float(thresholds.max())
    return replace(det, offsets=(thresholds - top).float()), top


def choose_threshold(scores: torch.Tensor, quantile: float = QUANTILE, tail: str = TAIL) -> float:
    """The ``quantile`` of known prompts' out-of-fold scores (higher scores fall back): empirical, or from an
    exponential tail (:func:`tail_quantile`)."""
    if tail == "exponential":
        return tail_quantile(scores, quantile)
    return float(scores.float().quantile(quantile))


def tail_quantile(scores: torch.Tensor, quantile: float, start: float = TAIL_FROM) -> float:
    """The ``quantile`` of ``scores`` (N,) beyond their ``start`` quantile u from an exponential tail (peaks over
    threshold): P(s > u + t) = (1 - start) exp(-t / b), b = the mean excess of the scores above u, so the quantile
    is ``u + b ln((1 - start) / (1 - quantile))``.  It may exceed the largest score, which an empirical quantile
    of a few dozen scores cannot.  ``quantile`` <= ``start`` or 1, or fewer than 2 scores above u: empirical."""
    s = scores.float()
    if not start < quantile < 1.0:
        return float(s.quantile(quantile))
    u = s.quantile(start)
    excess = s[s > u] - u
    if len(excess) < 2:
        return float(s.quantile(quantile))
    return float(u + excess.mean() * math.log((1.0 - start) / (1.0 - quantile)))


def auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """P(score of an unknown prompt > score of a known one) (ties count half): 1 = perfect separation."""
    both = torch.cat([known.float(), unknown.float()])
    ranks = _average_ranks(both)
    n_k, n_u = len(known), len(unknown)
    return float((ranks[n_k:].sum() - n_u * (n_u + 1) / 2) / max(n_k * n_u, 1))


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of v (N,), ties sharing their mean rank."""
    order = v.argsort()
    ranks = torch.empty(len(v), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
    for value in v[order][:-1][v[order][1:] == v[order][:-1]].unique():
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks
