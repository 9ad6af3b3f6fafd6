"""Units: one layer's attention or MLP, the granule that is merged or routed as a whole.

A unit is found from the architecture family (``moerge.arch``) and the base's shard index (headers only).  With
``routing.head`` the output head is one more unit (group ``head``, path ``lm_head``, its one linear named ``""``),
after the last layer; with tied embeddings its weight is the input embedding's (``Linear.source``), so the build
reads and merges that tensor, writes it once (as the embedding) and stores only the experts' head tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.select import ACTIVATION
from ..arch import Family
from ..io.index import CheckpointIndex
from ..kinds import KINDS
from ..recipe import RoutingSpec

GROUPS = ("attention", "mlp")
HEAD = "head"  # the output head's group (``routing.head``), after every layer
ORDER = {**{g: i for i, g in enumerate(GROUPS)}, HEAD: len(GROUPS)}  # forward order within a layer


@dataclass(frozen=True)
class Linear:
    name: str  # e.g. "gate_proj"
    path: str  # e.g. "model.layers.0.mlp.gate_proj"
    shape: tuple[int, int]  # (out, in)
    bias: bool
    source: str | None = None  # the base tensor that holds the weight when it is tied (the input embedding)

    @property
    def weight(self) -> str:
        return f"{self.path}.weight"

    @property
    def tied(self) -> bool:
        """Whether the shared weight is another tensor of the checkpoint (written there, not here)."""
        return self.source is not None

    @property
    def bias_name(self) -> str:
        return f"{self.path}.bias"


@dataclass(frozen=True)
class Unit:
    layer: int
    group: str  # "attention" | "mlp"
    path: str  # e.g. "model.layers.0.mlp"
    linears: tuple[Linear, ...]


def module_groups(modules: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"both"`` / ``"mlp"`` / ``["attention", "mlp"]`` -> the unit groups, in forward order."""
    wanted = set(GROUPS) if modules == "both" else {modules} if isinstance(modules, str) else set(modules)
    return tuple(g for g in GROUPS if g in wanted)


def candidate_units(index: CheckpointIndex, n_layers: int, family: Family, modules: str | list[str],
                    head: bool = False) -> list[Unit]:
    """Every unit of ``modules`` that has at least one linear in the base, in forward order; then the output head
    with ``head``."""
    units = []
    for layer in range(n_layers):
        for group in module_groups(modules):
            path = family.unit_path(layer, group)
            lins = tuple(Linear(lin, f"{path}.{lin}", tuple(index[f"{path}.{lin}.weight"].shape),  # type: ignore[arg-type]
                                f"{path}.{lin}.bias" in index)
                         for lin in family.linears(group) if f"{path}.{lin}.weight" in index)
            if lins:
                units.append(Unit(layer, group, path, lins))
    head_ = head_unit(index, n_layers, family) if head else None
    return units + ([head_] if head_ is not None else [])


def head_unit(index: CheckpointIndex, n_layers: int, family: Family) -> Unit | None:
    """The output head as a unit: its own weight, or (tied embeddings: no ``lm_head.weight`` in the base) the input
    embedding's, (vocab, hidden) either way; None when the base has neither."""
    path, name = family.head_path, family.holder(family.lm_head, index)
    if name not in index:
        return None
    source = None if name == family.lm_head else name
    lin = Linear("", path, tuple(index[name].shape), f"{path}.bias" in index, source)  # type: ignore[arg-type]
    return Unit(n_layers, HEAD, path, (lin,))


# ---------------------------------------------------------------- norm folding (recipe `routing.fold_norms`)

def folds_norms(routing: RoutingSpec) -> bool:
    """Whether a build folds each expert's input-norm scale into its routed linears: ``fold_norms``, except for a
    selection by weight metric whose kind is ``lora`` (the adapters' own factors are stored, nothing to fold)."""
    return routing.fold_norms and not (routing.select.metric != ACTIVATION and KINDS.get(routing.expert.kind).needs_lora)


def unit_input_norm(family: Family, unit: str, linear: str) -> str | None:
    """The norm weight feeding ``linear`` of unit path ``unit`` (e.g. ``model.layers.3.mlp``; ``lm_head``: the
    final norm), or None."""
    if unit == family.head_path and not linear:
        return family.final_norm
    layer = family.layer_of(f"{unit}.{linear}.weight")
    if layer is None:
        return None
    group = next((g for g in family.groups if family.unit_path(layer, g) == unit), None)
    return None if group is None else family.input_norm(layer, group, linear)


def fold_ratio(g_e: torch.Tensor, g_s: torch.Tensor, offset: float) -> torch.Tensor:
    """Expert e's norm scale over the written shared one, per input column (I,): ``(offset + g_e) / (offset +
    g_s)``, 1 where the shared scale is ~0 (nothing to fold into).  A routed linear of expert e is stored as
    ``W_e * ratio[None, :]``, so that it reads the shared norm's output and computes what expert e computed."""
    scale_s = g_s.float() + offset
    ok = scale_s.abs() > 1e-6 * float(scale_s.abs().max().clamp_min(1e-30))
    return torch.where(ok, (g_e.float() + offset) / torch.where(ok, scale_s, 1.0), 1.0)
