"""``moerge export --materialize``: routed MLP experts of any kind written as dense native experts.

A native MoE stores each expert's full MLP, so expert e of a routed linear becomes ``W_e = W_s + Δ_e`` with
``Δ_e`` (plus, for an expert `moerge add-expert` anchored, ``Σ_i a_i Δ_i``) computed from the checkpoint's stored
tensors by the serve-side math itself (``moerge.modeling.DELTAS``:
``U V`` for twin, ``B A`` for lora, the scaled signs for bit1, the scattered values for sparse, ``delta`` for
wemoe), in float32, then rounded once to the checkpoint's dtype by the writer.  Dense experts are written as
stored (bit-exact).  One linear of all experts is in memory at a time, as for dense exports.

What stays refused (by :class:`~moerge.export.inputs.CheckpointInput`): routed attention (a native MoE has
one attention per layer) and bias deltas (native experts have no MLP biases).
"""

from __future__ import annotations

import torch

from ..checkpoint import names
from ..modeling import DELTAS
from .inputs import CheckpointInput


def dense_expert(kind: str, tensors: dict[str, torch.Tensor], w_s: torch.Tensor) -> torch.Tensor:
    """Expert e's weight (O, I): the stored ``weight`` of a dense expert, else ``W_s + Δ_e`` in float32."""
    if kind == "dense":
        return tensors["weight"]
    w32 = w_s.float()  # (O, I)
    t32 = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}  # signs / indices keep theirs
    return w32 + DELTAS[kind](t32, w32).float()


class MaterializedInput(CheckpointInput):
    """A built moerge checkpoint whose routed MLP units may hold experts of any kind (see the module docstring)."""

    kinds = tuple(DELTAS)

    def mlp(self, layer: int, lin: str, *, routed: bool, shared: bool) -> tuple[torch.Tensor | None, list | None]:
        """(shared W_s (O, I) float32 | None, [W_e (O, I)] | None) for one MLP linear of one layer."""
        w_s = self.loader.get(self.family.mlp_weight(layer, lin)).to(self.device)  # (O, I)
        experts = self._experts(layer, lin, w_s) if routed else None
        return (w_s.float() if shared else None), experts

    def _experts(self, layer: int, lin: str, w_s: torch.Tensor) -> list[torch.Tensor]:
        spec = self.manifest.units[self.family.unit_path(layer, "mlp")]
        linear = spec.linears.get(lin)
        if linear is None:  # a linear the unit does not route: every expert is W_s
            return [w_s] * len(self.names)
        path = self.family.mlp_weight(layer, lin).removesuffix(".weight")
        out = [dense_expert(spec.kind, {t: self.loader.get(names.expert_tensor(path, e, t)).to(self.device) for t in shapes}, w_s)
               for e, shapes in enumerate(linear.experts)]
        return anchored(out, w_s, self.manifest.anchors, self.names, self.family.unit_path(layer, "mlp"))


def anchored(weights: list[torch.Tensor], w_s: torch.Tensor, anchors: dict, experts: list[str] | tuple[str, ...],
             unit: str) -> list[torch.Tensor]:
    """Experts stored against ``W_s + Σ_i a_i Δ_i`` (manifest ``anchors``, `moerge add-expert`): ``W_e + Σ_i a_i
    (W_i - W_s)``; the others as they are."""
    out = list(weights)
    for name, per in anchors.items():
        a = per.get(unit)
        if a is None:
            continue
        e = list(experts).index(name)
        out[e] = weights[e].float() + sum(float(v) * (weights[i].float() - w_s.float()) for i, v in enumerate(a) if v)
    return out
