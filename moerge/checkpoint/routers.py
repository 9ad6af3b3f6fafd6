"""Router tensors of a checkpoint: one :class:`RouterTensors` per router prefix, read and written as a shard.

A router scores ``logits = scale * cos(x - center, prototypes[e]) + bias[e]`` (``docs/FORMAT.md``); the formula
is the model's own (:func:`moerge.modeling.modeling_moerge.router_logits`), so calibration and serving agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..modeling.modeling_moerge import router_logits
from . import names
from .manifest import Manifest


@dataclass
class RouterTensors:
    """One router: prototypes (E, C), center (C,), scale (), bias (E,), all float32."""

    prototypes: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], hidden: int) -> RouterTensors:
        """From ``{"prototypes", "scale", "bias"[, "center"]}`` (a missing center is 0)."""
        center = tensors.get("center")
        return cls(tensors["prototypes"].float(), torch.zeros(hidden) if center is None else center.float(),
                   tensors["scale"].float().reshape(()), tensors["bias"].float())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes, "center": self.center, "scale": self.scale, "bias": self.bias}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, E), the model's formula in float32."""
        return router_logits(x, self.prototypes, self.center, self.scale, self.bias)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)  # (N, E)

    def tempered(self, temperature: float) -> RouterTensors:
        """Logits divided by T: scale / T and bias / T."""
        return RouterTensors(self.prototypes, self.center, self.scale / temperature, self.bias / temperature)

    def cast(self, dtype: torch.dtype) -> RouterTensors:
        """Round-trip through the checkpoint's dtype (what inference will see)."""
        return RouterTensors(*(t.to(dtype).float() for t in (self.prototypes, self.center, self.scale, self.bias)))

    def grown(self) -> RouterTensors:
        """One more output: a zero prototype row and a zero bias (calibration sets them)."""
        return RouterTensors(torch.cat([self.prototypes, self.prototypes.new_zeros(1, self.prototypes.shape[1])]),
                             self.center, self.scale, torch.cat([self.bias, self.bias.new_zeros(1)]))

    def without(self, e: int) -> RouterTensors:
        """Output ``e`` dropped."""
        keep = [i for i in range(self.bias.numel()) if i != e]
        return RouterTensors(self.prototypes[keep], self.center, self.scale, self.bias[keep])


def uniform_router(n_experts: int, hidden: int, scale: float = 1.0) -> RouterTensors:
    """An uninitialised router: zero prototypes give cos 0, so the route is uniform."""
    return RouterTensors(torch.zeros(n_experts, hidden), torch.zeros(hidden), torch.tensor(float(scale)),
                         torch.zeros(n_experts))


def read_routers(path: Path, manifest: Manifest, hidden: int) -> dict[str, RouterTensors]:
    """Every router of the shard at ``path`` (uniform ones when the manifest is not initialised)."""
    if not manifest.initialized:
        return {p: uniform_router(len(manifest.experts), hidden) for p in manifest.router_prefixes()}
    tensors = load_file(path)
    out = {}
    for prefix in manifest.router_prefixes():
        own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        out[prefix] = RouterTensors.from_dict(own, hidden)
    return out


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
