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

from . import bit1, dense, lora, sparse, twin, wemoe  # noqa: F401  (each registers itself)
from .base import KINDS, ExpertKind, KindConfig, Read, Rows, RowWise, Shapes, register

__all__ = ["KINDS", "ExpertKind", "KindConfig", "Read", "RowWise", "Rows", "Shapes", "register"]
