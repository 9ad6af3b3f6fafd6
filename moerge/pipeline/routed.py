"""A routed unit of a plan: which storage kind its experts take, and (allocated plans) per linear and expert.

A recipe's plan routes every selected unit with one kind and one :class:`~moerge.kinds.KindConfig`.  An
allocated plan (:mod:`.allocate`) gives each (linear, expert) its own parameters (a twin rank, a sparse density,
or nothing stored) and builds the tensors with its own maker (activation-aware factors); the model side reads
each expert's shapes from the manifest, so ranks and densities may differ per expert and per linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kinds import ExpertKind, KindConfig, Shapes
from .units import Linear, Unit

Maker = Callable[[Linear, int, torch.Tensor, torch.Tensor, KindConfig | None], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RoutedUnit:
    """A unit that becomes routed, with its storage kind and the kind's parameters.

    An allocated plan (:mod:`.allocate`) also gives each (linear name, expert) its own parameters in ``per``
    (None: nothing stored for that expert there, its delta is left to the shared weight) and builds the tensors
    with ``maker`` (activation-aware factors); ``gain`` is the measured error the unit's experts remove."""

    unit: Unit
    kind: ExpertKind
    cfg: KindConfig
    per: dict[tuple[str, int], KindConfig | None] | None = field(default=None, compare=False)
    maker: Maker | None = field(default=None, compare=False)
    gain: dict[str, float] | None = field(default=None, compare=False)

    @property
    def uniform(self) -> bool:
        """Every expert of every linear stored with ``cfg`` by the kind's own build (row blocks possible)."""
        return self.per is None and self.maker is None

    def cfg_for(self, lin: Linear, e: int) -> KindConfig | None:
        return self.cfg if self.per is None else self.per[(lin.name, e)]

    def shapes(self, lin: Linear, e: int, lora_rank: int | None) -> Shapes:
        """Expert e's stored tensors in ``lin`` (without the bias delta)."""
        cfg = self.cfg_for(lin, e)
        if cfg is None:
            return empty_shapes(self.kind.name, *lin.shape)
        return self.kind.shapes(*lin.shape, cfg, lora_rank)

    def build(self, lin: Linear, e: int, w_s: torch.Tensor, w_e: torch.Tensor,
              factors: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Expert e's stored tensors in ``lin`` from the shared weight and its own (fp32, (O, I))."""
        cfg = self.cfg_for(lin, e)
        if self.maker is not None:
            return self.maker(lin, e, w_s, w_e, cfg)
        if cfg is None:
            return empty_tensors(self.kind.name, *lin.shape)
        return self.kind.build(w_s, w_e, factors, cfg)


def empty_shapes(kind: str, out: int, in_: int) -> Shapes:
    """What a kind stores for an expert that keeps nothing in a linear (rank 0 / no entries)."""
    if kind == "twin":
        return {"U": ((out, 0), None), "V": ((0, in_), None)}
    if kind == "sparse":
        return {"indices": ((0,), torch.int32), "values": ((0,), None)}
    raise ValueError(f"internal: kind {kind} cannot store nothing for one expert")


def empty_tensors(kind: str, out: int, in_: int) -> dict[str, torch.Tensor]:
    """The zero-size tensors of :func:`empty_shapes` (float32; the writer casts them)."""
    return {k: torch.zeros(s, dtype=d or torch.float32) for k, (s, d) in empty_shapes(kind, out, in_).items()}
