"""Router tensors of a checkpoint: one :class:`RouterTensors` per router prefix, read and written as a shard.

A router scores ``logits = scale * cos(x - center, prototypes[o]) + bias[o]`` (``docs/FORMAT.md``), one output o
per expert, then per composed route; the formula is the model's own
(:func:`moerge.modeling.modeling_moerge.router_logits`), so calibration and serving agree.  A sequence router may
carry an unknown-prompt detector (:class:`UnknownTensors`, tensors ``moerge_router.unknown.*``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..modeling.modeling_moerge import gaussian_distance, router_logits
from . import names
from .manifest import Manifest

UNKNOWN = "unknown"  # tensor key prefix of the detector inside a router


@dataclass
class UnknownTensors:
    """The unknown-prompt detector of a sequence router (float32): per-output means (O, D), the shared
    within-route covariance as ``factor`` (r, D) and ``inv_var`` (), and the background Gaussian of all
    calibration prompts (``background_mean`` (D,), ``background_factor`` (r0, D), ``background_inv_var`` ()),
    D = segments * C (see :func:`moerge.modeling.modeling_moerge.gaussian_distance`).  ``offsets`` (O,), optional
    (per-route thresholds): route o's distance counts as ``d_o - offsets[o]``, so a prompt is known when it lies
    within any route's own threshold."""

    means: torch.Tensor
    factor: torch.Tensor
    inv_var: torch.Tensor
    background_mean: torch.Tensor
    background_factor: torch.Tensor
    background_inv_var: torch.Tensor
    offsets: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def route_scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """Segment-pooled features (N, D) -> (N, O) relative distance to each route (before the offsets)."""
        back = gaussian_distance(pooled, self.background_mean[None], self.background_factor, self.background_inv_var)
        return gaussian_distance(pooled, self.means, self.factor, self.inv_var) - back  # (N, O)

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """Segment-pooled features (N, D) -> (N,) relative Mahalanobis score, the model's formula."""
        rel = self.route_scores(pooled)
        return (rel if self.offsets is None else rel - self.offsets.float()).min(-1).values

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> UnknownTensors:
        return UnknownTensors(*(None if (t := getattr(self, f.name)) is None else fn(t) for f in fields(self)))

    def rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> UnknownTensors:
        """The per-output tensors (means, offsets) mapped by ``fn`` (an output added or dropped)."""
        return replace(self, means=fn(self.means), offsets=None if self.offsets is None else fn(self.offsets))


@dataclass
class RouterTensors:
    """One router: prototypes (O, C), center (C,), scale (), bias (O,), all float32; ``unknown`` optional."""

    prototypes: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    unknown: UnknownTensors | None = None

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], hidden: int) -> RouterTensors:
        """From ``{"prototypes", "scale", "bias"[, "center"][, "unknown.<key>"...]}`` (a missing center is 0)."""
        center = tensors.get("center")
        det = {k[len(UNKNOWN) + 1:]: v.float() for k, v in tensors.items() if k.startswith(UNKNOWN + ".")}
        unknown = None
        if det:
            det = {k: v.reshape(()) if k.endswith("inv_var") else v for k, v in det.items()}
            unknown = UnknownTensors(**det)
        return cls(tensors["prototypes"].float(), torch.zeros(hidden) if center is None else center.float(),
                   tensors["scale"].float().reshape(()), tensors["bias"].float(), unknown)

    def as_dict(self) -> dict[str, torch.Tensor]:
        out = {"prototypes": self.prototypes, "center": self.center, "scale": self.scale, "bias": self.bias}
        if self.unknown is not None:
            out.update({f"{UNKNOWN}.{k}": v for k, v in self.unknown.as_dict().items()})
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, E), the model's formula in float32."""
        return router_logits(x, self.prototypes, self.center, self.scale, self.bias)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)  # (N, E)

    def tempered(self, temperature: float) -> RouterTensors:
        """Logits divided by T: scale / T and bias / T."""
        return replace(self, scale=self.scale / temperature, bias=self.bias / temperature)

    def cast(self, dtype: torch.dtype) -> RouterTensors:
        """Round-trip through the checkpoint's dtype (what inference will see)."""
        def rt(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype).float()

        return RouterTensors(*(rt(t) for t in (self.prototypes, self.center, self.scale, self.bias)),
                             None if self.unknown is None else self.unknown.map(rt))

    def with_unknown(self, unknown: UnknownTensors | None) -> RouterTensors:
        return replace(self, unknown=unknown)

    def grown(self, at: int | None = None) -> RouterTensors:
        """One more output at index ``at`` (default: last): a zero prototype row and a zero bias (calibration sets
        them; the detector's mean and offset rows are zero too)."""
        at = self.bias.numel() if at is None else at

        def insert(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:at], t.new_zeros(1, *t.shape[1:]), t[at:]])

        unknown = None if self.unknown is None else self.unknown.rows(insert)
        return RouterTensors(insert(self.prototypes), self.center, self.scale, insert(self.bias), unknown)

    def without(self, e: int) -> RouterTensors:
        """Output ``e`` dropped (and the detector's mean and offset of it)."""
        keep = [i for i in range(self.bias.numel()) if i != e]
        unknown = None if self.unknown is None else self.unknown.rows(lambda t: t[keep])
        return RouterTensors(self.prototypes[keep], self.center, self.scale, self.bias[keep], unknown)


def uniform_router(n_experts: int, hidden: int, scale: float = 1.0) -> RouterTensors:
    """An uninitialised router: zero prototypes give cos 0, so the route is uniform."""
    return RouterTensors(torch.zeros(n_experts, hidden), torch.zeros(hidden), torch.tensor(float(scale)),
                         torch.zeros(n_experts))


def read_routers(path: Path, manifest: Manifest, hidden: int) -> dict[str, RouterTensors]:
    """Every router of the shard at ``path`` (uniform ones when the manifest is not initialised)."""
    if not manifest.initialized:
        return {p: uniform_router(len(manifest.outputs), hidden) for p in manifest.router_prefixes()}
    tensors = load_file(path)
    out = {}
    for prefix in manifest.router_prefixes():
        own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        out[prefix] = RouterTensors.from_dict(own, hidden)
        check_offsets(path, f"{prefix}.{UNKNOWN}.offsets", out[prefix].unknown, manifest)
    return out


def check_offsets(path: Path, name: str, det: UnknownTensors | None, manifest: Manifest) -> None:
    """Per-route threshold offsets are there exactly when ``moerge.unknown.per_route`` says so, one per output."""
    if det is None or manifest.unknown is None:
        return
    if (det.offsets is not None) != manifest.unknown.per_route:
        raise CheckpointError(path, name, "present without moerge.unknown.per_route" if det.offsets is not None
                              else "missing (moerge.unknown.per_route is true)")
    if det.offsets is not None and tuple(det.offsets.shape) != (len(manifest.outputs),):
        raise CheckpointError(path, name, f"shape {tuple(det.offsets.shape)}, expected ({len(manifest.outputs)},)")


def router_state(routers: dict[str, RouterTensors], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensor name -> value in the checkpoint's dtype, in the shard's order (prefix, then key)."""
    return {names.router_tensor(p, k): v.to(dtype).contiguous() for p, r in routers.items()
            for k, v in r.as_dict().items()}


def write_router_shard(path: Path, routers: dict[str, RouterTensors], dtype: torch.dtype) -> list[str]:
    """Write the router shard at ``path`` (a new file; callers write into a staging folder); returns its tensor
    names in router order (safetensors stores them sorted), for the index."""
    state = router_state(routers, dtype)
    save_file(state, str(path), metadata={"format": "pt"})
    return list(state)
