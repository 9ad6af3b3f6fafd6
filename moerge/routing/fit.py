"""Router math for calibration, on cached features: supervised fit, temperature, fallback threshold.

Pure tensor functions (features in, router tensors out; no I/O).  The router is the checkpoint's
(``docs/FORMAT.md``): ``logits = scale * cos(x - center, prototypes[e]) + bias[e]``.

* :func:`fit_supervised`: task-id cross-entropy with full-batch Adam, from the prototype initialisation
  (centred class means).  It trains in standardised coordinates ``z = (x - mu) / s`` (``s`` the per-coordinate
  RMS of the centred features) so one learning rate suits the centre, the prototypes and the features'
  magnitude; the cosine is invariant to that change of coordinates, so the result maps back exactly.
* :func:`fit_temperature`: the temperature T minimising the held-out NLL (Guo et al. 2017,
  https://arxiv.org/abs/1706.04599), folded into ``scale`` and ``bias``; argmax routes do not change.
* :func:`fallback_threshold`: the Mediator-style confidence threshold (Lai et al. 2025,
  https://arxiv.org/abs/2502.04411) that best separates right from wrong held-out routes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checkpoint.routers import RouterTensors, uniform_router
from ..recipe import ROUTER_SCALE

__all__ = ["RouterTensors", "entropy", "fallback_threshold", "fit_supervised", "fit_temperature", "prototype_init",
           "standardiser", "uniform_router"]


def standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and per-coordinate RMS () of the centred features x (N, C)."""
    mu = x.mean(0)
    return mu, (x - mu).pow(2).mean().sqrt().clamp_min(1e-8)


def class_means(x: torch.Tensor, y: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(N, C), (N,) -> (E, C) mean feature per label (0 for a label without rows)."""
    sums = torch.zeros(n_experts, x.shape[1]).index_add_(0, y, x)  # (E, C)
    counts = torch.bincount(y, minlength=n_experts).clamp_min(1)  # (E,)
    return sums / counts[:, None]


def prototype_init(x: torch.Tensor, y: torch.Tensor, n_experts: int, scale: float) -> RouterTensors:
    """Centred class means (the training-free prototype router)."""
    means = class_means(x.float(), y, n_experts)  # (E, C)
    center = means.mean(0)  # (C,)
    return RouterTensors(means - center, center, torch.tensor(float(scale)), torch.zeros(n_experts))


def fit_supervised(x: torch.Tensor, y: torch.Tensor, n_experts: int, *, steps: int = 300, lr: float = 0.02,
                   init_scale: float = ROUTER_SCALE) -> RouterTensors:
    """Train prototypes, center, scale and bias with task-id cross-entropy.  x (N, C), y (N,) expert ids."""
    mu, s = standardiser(x.float())
    z = (x.float() - mu) / s  # (N, C)
    init = prototype_init(z, y, n_experts, init_scale)
    protos = init.prototypes.clone().requires_grad_()  # (E, C)
    center = init.center.clone().requires_grad_()  # (C,)
    log_scale = init.scale.log().clone().requires_grad_()  # ()
    bias = init.bias.clone().requires_grad_()  # (E,)
    opt = torch.optim.Adam([protos, center, log_scale, bias], lr=lr)
    for _ in range(steps):
        router = RouterTensors(protos, center, log_scale.exp(), bias)
        loss = F.cross_entropy(router.logits(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return RouterTensors(protos.detach().clone(), mu + s * center.detach(), log_scale.exp().detach(),
                             bias.detach().clone())


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, *, smoothing: float = 0.02, lo: float = 0.05,
                    hi: float = 20.0, points: int = 241) -> float:
    """T in [lo, hi] (log grid) minimising the held-out NLL of softmax(logits / T).  logits (N, E), y (N,).

    Targets are smoothed by ``smoothing``: on a perfectly separated held-out split the plain NLL keeps
    falling as T -> 0, which would make every route look certain."""
    if logits.shape[0] == 0:
        return 1.0
    grid = torch.logspace(math.log10(lo), math.log10(hi), points)  # (G,)
    scaled = logits.float()[None] / grid[:, None, None]  # (G, N, E)
    n_exp = logits.shape[-1]
    target = F.one_hot(y, n_exp).float() * (1 - smoothing) + smoothing / n_exp  # (N, E)
    nll = -(target[None] * scaled.log_softmax(-1)).sum(-1).mean(-1)  # (G,)
    return float(grid[int(nll.argmin())])


def fallback_threshold(confidence: torch.Tensor, correct: torch.Tensor, n_experts: int) -> float:
    """Threshold t on the top route probability: rows with confidence < t fall back.

    t maximises (# right routes kept) + (# wrong routes that fall back) on the held-out rows; it is the
    midpoint of the best interval between sorted confidences (the lowest such interval on ties).  With no
    wrong route, t is halfway between 1/E (the least possible top probability) and the least confident row.
    """
    order = confidence.float().argsort()
    conf, ok = confidence.float()[order], correct.bool()[order]  # ascending
    n = conf.numel()
    if n == 0:
        return 0.0
    wrong_below = torch.cat([torch.zeros(1), (~ok).float().cumsum(0)])  # (n+1,) wrong rows among the first k
    right_above = ok.float().sum() - torch.cat([torch.zeros(1), ok.float().cumsum(0)])  # (n+1,)
    k = int((wrong_below + right_above).argmax())  # first maximum: the least fallback
    lower = 1.0 / n_experts if k == 0 else float(conf[k - 1])
    upper = 1.0 if k == n else float(conf[k])
    return (lower + upper) / 2


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """(..., E) -> (...,) entropy in nats."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
