"""Routed-expert storage kinds (build side): how expert e of a routed linear is stored relative to W_s.

One class per kind, each in its own module, registered in ``KINDS`` where it is defined; adding a kind
touches its module here and its class in ``moerge/modeling/modeling_moerge.py`` (the forward math), nothing
central.  A kind gives:

* ``params``: the ``routing.expert`` recipe keys it takes (``rank``, ``density``, ...);
* ``shapes(out, in_, cfg, lora_rank)`` -> {tensor name: (shape, dtype)} for one expert, known before any
  weight is read (so the writer lays the shards out up front); dtype ``None`` = the checkpoint's float dtype;
* ``build(w_s, w_e, factors, cfg)`` -> {tensor name: tensor} for one expert (pure math, any device);
* ``build_rows(shape, ranges, read, factors, cfg)`` -> the same tensors, in order, for a linear read in row blocks
  (``read(rows) -> (W_s rows, W_e rows)``): row-wise kinds (:class:`RowWise`) stream their first tensor block by
  block; the default reads the whole matrices (kinds that need all of the delta at once).

``docs/FORMAT.md`` is the contract between the two sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import RecipeError
from ..registry import Registry

Shape = tuple[int, ...]
Shapes = dict[str, tuple[Shape, "torch.dtype | None"]]
Rows = tuple[int, int]
Read = Callable[[Rows], tuple[torch.Tensor, torch.Tensor]]  # rows -> (W_s rows, W_e rows), float32


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

    def build_rows(self, shape: tuple[int, int], ranges: list[Rows], read: Read,
                   factors: tuple[torch.Tensor, torch.Tensor] | None, cfg: KindConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """The stored tensors of a linear read in row blocks: by default, of the whole matrices."""
        parts = [read(rows) for rows in ranges]
        w_s, w_e = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # (out, in) each
        del parts
        yield from self.build(w_s, w_e, factors, cfg).items()


class RowWise(ExpertKind):
    """A kind whose tensors are row-wise in the delta (row i of each depends on row i of W_e - W_s only): the
    first tensor is yielded block by block, the others (small: scales) once every block is done."""

    def build_rows(self, shape: tuple[int, int], ranges: list[Rows], read: Read,
                   factors: tuple[torch.Tensor, torch.Tensor] | None, cfg: KindConfig) -> Iterator[tuple[str, torch.Tensor]]:
        later: dict[str, list[torch.Tensor]] = {}
        for rows in ranges:
            out = self.build(*read(rows), factors, cfg)
            first, *rest = out
            yield first, out[first]
            for k in rest:
                later.setdefault(k, []).append(out[k])
        for k, blocks in later.items():
            yield k, torch.cat(blocks)


KINDS: Registry[ExpertKind] = Registry("expert kind")


def register(cls: type[ExpertKind]) -> type[ExpertKind]:
    """Class decorator: one instance of the kind in ``KINDS`` under its ``name``."""
    KINDS.add(cls.name, cls())
    return cls


def _load_all() -> None:
    from . import bit1, dense, lora, sparse, twin, wemoe  # noqa: F401  (each registers itself)


_load_all()
