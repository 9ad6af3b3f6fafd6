"""Units: one layer's attention or MLP, the granule that is merged or routed as a whole.

A unit is found from the architecture family (``moerge.arch``) and the base's shard index (headers only).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch import Family
from ..io.index import CheckpointIndex

GROUPS = ("attention", "mlp")


@dataclass(frozen=True)
class Linear:
    name: str  # e.g. "gate_proj"
    path: str  # e.g. "model.layers.0.mlp.gate_proj"
    shape: tuple[int, int]  # (out, in)
    bias: bool

    @property
    def weight(self) -> str:
        return f"{self.path}.weight"

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


def candidate_units(index: CheckpointIndex, n_layers: int, family: Family, modules: str | list[str]) -> list[Unit]:
    """Every unit of ``modules`` that has at least one linear in the base, in forward order."""
    units = []
    for layer in range(n_layers):
        for group in module_groups(modules):
            path = family.unit_path(layer, group)
            lins = tuple(Linear(lin, f"{path}.{lin}", tuple(index[f"{path}.{lin}.weight"].shape),  # type: ignore[arg-type]
                                f"{path}.{lin}.bias" in index)
                         for lin in family.linears(group) if f"{path}.{lin}.weight" in index)
            if lins:
                units.append(Unit(layer, group, path, lins))
    return units
