"""``lora``: a LoRA expert's own factors, exact (the routed unit's shared weight is the base, so forcing
expert e gives base + B_e A_e * scaling).  A linear the adapter does not target gets rank 0."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .base import ExpertKind, KindConfig, Read, Rows, Scratch, Shapes, heap_scratch, register


@register
class Lora(ExpertKind):
    name = "lora"
    needs_lora = True
    anchorable = False  # stores the adapter's own factors

    def shapes(self, out: int, in_: int, cfg: KindConfig, lora_rank: int | None) -> Shapes:
        r = lora_rank or 0
        return {"A": ((r, in_), None), "B": ((out, r), None)}

    def build(self, w_s: torch.Tensor, w_e: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None,
              cfg: KindConfig) -> dict[str, torch.Tensor]:
        if factors is None:
            return {"A": w_s.new_zeros(0, w_s.shape[1]), "B": w_s.new_zeros(w_s.shape[0], 0)}
        A, B = factors  # (r, in), (out, r) with scaling folded into B
        return {"A": A, "B": B}

    def build_rows(self, shape: tuple[int, int], ranges: list[Rows], read: Read,
                   factors: tuple[torch.Tensor, torch.Tensor] | None, cfg: KindConfig,
                   scratch: Scratch = heap_scratch) -> Iterator[tuple[str, torch.Tensor]]:
        """The adapter's factors as they are: no weight is read."""
        w_s = torch.empty(1, 1).expand(*shape)  # (out, in): its shape only, one float of storage
        yield from self.build(w_s, w_s, factors, cfg).items()
