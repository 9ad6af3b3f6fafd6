"""Routed-expert kinds: how expert e of a routed linear is stored relative to the shared weight W_s.

Each kind is a module registering one :class:`ExpertKind` in ``KINDS``:

* ``shapes(out, in_, cfg, lora_rank)`` -> {tensor name: (shape, dtype)} for one expert, known before any
  weight is read (so the writer can lay shards out up front);
* ``build(w_s, w_e, factors, cfg)`` -> {tensor name: tensor} for one expert (pure math).

The forward math (Δ_e from the stored tensors) lives in ``moerge/modeling/modeling_moerge.py``, which must
import nothing but torch and transformers; ``docs/FORMAT.md`` is the contract between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..registry import Registry

Shape = tuple[int, ...]


@dataclass(frozen=True)
class KindConfig:
    rank: int | None = None
    density: float | None = None


class ExpertKind(Protocol):
    name: str
    exact: bool  # forcing expert e reproduces W_e exactly
    needs_lora: bool

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> dict[str, tuple[Shape, str]]: ...

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor,
              factors: tuple[torch.Tensor, torch.Tensor] | None, cfg: KindConfig) -> dict[str, torch.Tensor]: ...


KINDS: Registry[ExpertKind] = Registry("expert kind")


def _load_all() -> None:
    from . import bit1, dense, lora, sparse, twin, wemoe  # noqa: F401  (each registers itself)


_load_all()
