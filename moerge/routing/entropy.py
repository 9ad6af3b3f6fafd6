"""Unsupervised router calibration: minimise the entropy of the model's next-token predictions on unlabeled
prompts with respect to the router parameters only (AdaMerging, Yang et al. 2024,
https://arxiv.org/abs/2310.02575; WEMoE, Tang et al. 2024, https://arxiv.org/abs/2402.00433).

Every model parameter is frozen except the routers' prototypes, center, scale and bias.  During training the
route is the full softmax (``top_k`` and ``fallback`` are lifted), so the loss is differentiable in the router
parameters: a (B, E) sequence route that requires grad makes the routed linears take their per-row tensor
path.  The loss is the entropy of the next-token distribution at each prompt's last position (where the
answer starts).  As in :mod:`moerge.routing.fit`, the center is trained in standardised coordinates and
the scale in log space (``torch.nn.utils.parametrize``), so one learning rate suits every tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .fit import RouterTensors, entropy


class Affine(nn.Module):
    """center = mu + s * z (z is what the optimiser sees)."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("s", s)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mu + self.s * z

    def right_inverse(self, center: torch.Tensor) -> torch.Tensor:
        return (center - self.mu) / self.s


class Exp(nn.Module):
    """scale = exp(log_scale)."""

    def forward(self, log_scale: torch.Tensor) -> torch.Tensor:
        return log_scale.exp()

    def right_inverse(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.clamp_min(1e-6).log()


def routers_of(model: Any) -> dict[str, nn.Module]:
    """Router tensor prefix -> the model's ``MoergeRouter`` module."""
    plan = model.config.moerge
    if plan["level"] == "sequence":
        return {"moerge_router": model.moerge_router}
    return {f"{u}.moerge_router": model.get_submodule(u).moerge_router for u in plan["units"]}


@contextmanager
def plan_overrides(model: Any, **values: Any) -> Iterator[None]:
    """Temporarily set keys of ``config.moerge`` (read live by the routing hooks)."""
    plan = model.config.moerge
    saved = {k: plan.get(k) for k in values}
    plan.update(values)
    try:
        yield
    finally:
        plan.update(saved)


def spread_prototypes(protos: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows rescaled to norm sqrt(C) (the cosine ignores row norms; Adam steps then fit); zero rows (an
    uninitialised router) become seeded random directions."""
    gen = torch.Generator().manual_seed(seed)
    protos = protos.float().clone()  # (E, C)
    zero = protos.norm(dim=-1) == 0  # (E,)
    protos[zero] = torch.randn(int(zero.sum()), protos.shape[1], generator=gen)
    return protos / protos.norm(dim=-1, keepdim=True) * math.sqrt(protos.shape[1])


@contextmanager
def trainable(model: Any, inits: dict[str, RouterTensors],
              stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[list[nn.Parameter]]:
    """Freeze the model, load ``inits`` into its routers and yield the routers' (reparametrised) parameters."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    routers = routers_of(model)
    try:
        for prefix, router in routers.items():
            _load(router, inits[prefix])
            device = router.center.device
            mu, s = (t.to(device) for t in stats[prefix])
            parametrize.register_parametrization(router, "center", Affine(mu, s))
            parametrize.register_parametrization(router, "scale", Exp())
        params = [p for r in routers.values() for p in r.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for router in routers.values():
            for name in ("center", "scale"):
                if parametrize.is_parametrized(router, name):
                    parametrize.remove_parametrizations(router, name, leave_parametrized=True)
        for p, flag in [*frozen, *((p, False) for r in routers.values() for p in r.parameters())]:
            p.requires_grad_(flag)


@torch.no_grad()
def _load(router: nn.Module, t: RouterTensors) -> None:
    for name, value in t.as_dict().items():
        param = getattr(router, name)
        param.copy_(value.to(param.dtype).reshape(param.shape))


def read_routers(model: Any) -> dict[str, RouterTensors]:
    """The model's current router tensors, float32 on the CPU."""
    out = {}
    for prefix, r in routers_of(model).items():
        out[prefix] = RouterTensors(*(getattr(r, n).detach().float().cpu().clone()
                                      for n in ("prototypes", "center", "scale", "bias")))
    return out


def prediction_entropy(model: Any, enc: dict[str, torch.Tensor], last: int) -> torch.Tensor:
    """Mean entropy of the next-token distributions at each prompt's last ``last`` real positions (inputs
    left-padded, so they are the final positions of every row)."""
    logits = model(**enc, use_cache=False, logits_to_keep=last).logits  # (B, L, V)
    keep = enc["attention_mask"][:, -logits.shape[1]:].bool()  # (B, L)
    return entropy(torch.softmax(logits.float(), dim=-1))[keep].mean()


def minimise_entropy(model: Any, tokenizer: Any, texts: list[str], inits: dict[str, RouterTensors],
                     stats: dict[str, tuple[torch.Tensor, torch.Tensor]], *, steps: int = 50, lr: float = 0.05,
                     batch_size: int = 8, seed: int = 0, last: int = 16,
                     max_length: int = 512) -> dict[str, RouterTensors]:
    """Adam on the router parameters for ``steps`` mini-batches of ``texts``; returns the trained routers."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # the last position is every row's last token
    try:
        with plan_overrides(model, top_k=None, fallback=None, initialized=True), trainable(model, inits, stats) as params:
            opt = torch.optim.Adam(params, lr=lr)
            order: list[int] = []
            for _ in range(steps):
                if len(order) < batch_size:
                    order += torch.randperm(len(texts), generator=gen).tolist()
                batch, order = order[:batch_size], order[batch_size:]
                enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                                max_length=max_length, add_special_tokens=False).to(device)
                loss = prediction_entropy(model, dict(enc), last)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.clear_route_cache()
        return read_routers(model)
    finally:
        tokenizer.padding_side = side
