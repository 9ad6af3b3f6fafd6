"""Routed-expert storage kinds (build side): how expert e of a routed linear is stored relative to W_s.

One class per kind, each in its own module, registered in ``KINDS`` where it is defined; adding a kind
touches its module here and its class in ``moerge/modeling/modeling_moerge.py`` (the forward math), nothing
central.  A kind gives:

* ``params``: the ``routing.expert`` recipe keys it takes (``rank``, ``density``, ...);
* ``shapes(out, in_, cfg, lora_rank)`` -> {tensor name: (shape, dtype)} for one expert, known before any
  weight is read (so the writer lays the shards out up front); dtype ``None`` = the checkpoint's float dtype;
* ``build(w_s, w_e, factors, cfg)`` -> {tensor name: tensor} for one expert (pure math, any device).

``docs/FORMAT.md`` is the contract between the two sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import RecipeError
from ..registry import Registry

Shape = tuple[int, ...]
Shapes = dict[str, tuple[Shape, "torch.dtype | None"]]


@dataclass(frozen=True)
class KindConfig:
    """A kind's parameters (``routing.expert`` minus ``kind``); each kind reads the ones in its ``params``."""

    rank: int | None = None
    density: float | None = None
    svd: str | None = None  # twin: "auto" (None) | "exact" | "randomized"


class ExpertKind:
    """Base class of a kind (see the module docstring)."""

    name: ClassVar[str]
    params: ClassVar[tuple[str, ...]] = ()
    needs_lora: ClassVar[bool] = False  # stores a LoRA adapter's own factors: every expert must be LoRA

    def check(self, cfg: KindConfig, file: str) -> None:
        """Refuse parameters the kind does not take."""
        for key in ("rank", "density"):
            if getattr(cfg, key) is not None and key not in self.params:
                owners = [k for k in KINDS if key in KINDS.get(k).params]
                raise RecipeError(file, f"routing.expert.{key}", f"'{key}' is a parameter of kind "
                                                                 f"{' / '.join(owners)}, not {self.name}")

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        raise NotImplementedError

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None,
              cfg: KindConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError


KINDS: Registry[ExpertKind] = Registry("expert kind")


def register(cls: type[ExpertKind]) -> type[ExpertKind]:
    """Class decorator: one instance of the kind in ``KINDS`` under its ``name``."""
    KINDS.add(cls.name, cls())
    return cls


def _load_all() -> None:
    from . import bit1, dense, lora, sparse, twin, wemoe  # noqa: F401  (each registers itself)


_load_all()
