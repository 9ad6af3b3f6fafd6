"""What every storage kind is: :class:`ExpertKind` (and :class:`RowWise`), its parameters and the registry.

The kinds themselves live one per module of this package (see ``moerge/kinds/__init__.py``).
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
Scratch = Callable[[tuple[int, int]], torch.Tensor]  # shape -> an uninitialised float32 matrix to fill


def heap_scratch(shape: tuple[int, int]) -> torch.Tensor:
    """The default :data:`Scratch`: an ordinary tensor (the pipeline passes file-backed ones instead)."""
    return torch.empty(shape, dtype=torch.float32)


def delta_matrix(shape: tuple[int, int], ranges: list[Rows], read: Read, scratch: Scratch) -> torch.Tensor:
    """``W_e - W_s`` (O, I) float32, assembled once from its row blocks into ``scratch(shape)``: kinds that make
    several passes over the delta (randomized SVD, streamed top-k) then read views of it instead of reading and
    subtracting both weights on every pass."""
    delta = scratch(shape)
    for rows in ranges:
        w_s, w_e = read(rows)
        delta[rows[0]:rows[1]] = (w_e - w_s).to(delta.device)  # (b, I)
    return delta


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
    # what it stores depends on W_e - W_s only, so an expert can be stored against another reference weight
    # (``moerge add-expert`` anchors a new full expert on a combination of the stored ones)
    anchorable: ClassVar[bool] = True

    def check(self, cfg: KindConfig, file: str) -> None:
        """Refuse parameters the kind does not take."""
        for key in ("rank", "density"):
            if getattr(cfg, key) is not None and key not in self.params:
                owners = [k for k in KINDS if key in KINDS.get(k).params]
                raise RecipeError(file, f"routing.expert.{key}", f"'{key}' is a parameter of kind "
                                                                 f"{' / '.join(owners)}, not {self.name}")

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        raise NotImplementedError

    def config_like(self, stored: list[dict[str, tuple[int, ...]]], out: int, in_: int, cfg: KindConfig) -> KindConfig:
        """The parameters of one more expert in a linear (O = out, I = in_) whose experts are stored with shapes
        ``stored`` (a budgeted build sizes each expert on its own): those of the largest; by default ``cfg``."""
        return cfg

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None,
              cfg: KindConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build_rows(self, shape: tuple[int, int], ranges: list[Rows], read: Read,
                   factors: tuple[torch.Tensor, torch.Tensor] | None, cfg: KindConfig,
                   scratch: Scratch = heap_scratch) -> Iterator[tuple[str, torch.Tensor]]:
        """The stored tensors of a linear read in row blocks: by default, of the whole matrices.  ``scratch``
        gives matrices a kind may fill (e.g. :func:`delta_matrix`) without growing the heap."""
        parts = [read(rows) for rows in ranges]
        w_s, w_e = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # (out, in) each
        del parts
        yield from self.build(w_s, w_e, factors, cfg).items()


class RowWise(ExpertKind):
    """A kind whose tensors are row-wise in the delta (row i of each depends on row i of W_e - W_s only): the
    first tensor is yielded block by block, the others (small: scales) once every block is done."""

    def build_rows(self, shape: tuple[int, int], ranges: list[Rows], read: Read,
                   factors: tuple[torch.Tensor, torch.Tensor] | None, cfg: KindConfig,
                   scratch: Scratch = heap_scratch) -> Iterator[tuple[str, torch.Tensor]]:
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


class FullMatrix(RowWise):
    """A kind that stores one (out, in) float matrix per expert, computed row-wise from W_s and W_e."""

    key: ClassVar[str]

    def matrix(self, w_s: torch.Tensor, w_e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        return {self.key: ((out, in_), None)}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: object, cfg: KindConfig) -> dict[str, torch.Tensor]:
        return {self.key: self.matrix(w_s, w_e)}
