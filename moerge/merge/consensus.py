"""Sign consensus (TIES "elect"): which entries of each weighted task vector agree with the elected sign.

``sum``: the elected sign is that of the summed weighted task vectors (TIES paper); ``count``: the majority
of signs.  Zero sums elect ``+``.  Input (N, ...) stacked weighted task vectors; output a (N, ...) bool mask.
"""

from __future__ import annotations

import torch


def sign_mask(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    signs = deltas.sign()  # (N, ...)
    votes = deltas.sum(dim=0) if method == "sum" else signs.sum(dim=0)  # (...)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(deltas.dtype)
    return signs == elected
