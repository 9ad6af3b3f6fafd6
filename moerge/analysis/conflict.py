"""Per-unit conflict metrics between the experts' task vectors.  Pure tensor math.

A *unit* is one module group of one layer (``attention``: q/k/v/o, ``mlp``: gate/up/down).  For a unit,
with task vectors tau_i (all its linears' weights flattened and concatenated) and the static merge W_s:

* ``sign_conflict`` - TIES-style: trim each tau_i to its top ``density`` magnitudes; among entries where
  at least two trimmed experts are non-zero, the fraction whose signs disagree.
* ``cancellation`` - ``1 - |sum_i tau_i|_1 / sum_i |tau_i|_1``: how much of the experts' movement cancels.
* ``cosine`` - mean pairwise cosine of the tau_i (1 = aligned).  ``1 - cosine`` is used for selection.
* ``merge_error`` - mean over experts of ``|W_s - W_i| / (|W_s - W_base| + |tau_i|)`` (Frobenius), in [0, 1].

Every metric is defined for all-zero task vectors (then 0, or cosine 1), never NaN.  Statistics are
accumulated linear by linear (:class:`UnitStats`), so a unit never needs all its linears at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..merge.sparsify import magnitude

METRICS = ("sign_conflict", "cancellation", "cosine", "merge_error")
DEFAULT_DENSITY = 0.2  # the trimming density of sign_conflict when the merge has none of its own
EPS = 1e-12


@dataclass
class UnitStats:
    """Running sums over the linears of one unit, for N experts."""

    n: int
    density: float = DEFAULT_DENSITY
    gram: torch.Tensor = field(init=False)  # (N, N) sum of <tau_i, tau_j>
    l1_each: float = 0.0
    l1_sum: float = 0.0
    overlap: int = 0
    conflicts: int = 0
    err_num: torch.Tensor = field(init=False)  # (N,) sum |W_s - W_i|^2
    shared_sq: float = 0.0  # sum |W_s - W_base|^2

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        self.err_num = torch.zeros(self.n, dtype=torch.float64)

    def add(self, taus: torch.Tensor, merged_tau: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """``taus`` (N, *shape) task vectors, ``merged_tau`` (*shape) = W_s - W_base of one linear, or of a row
        block of it; ``keep`` (N, D): each expert's top-``density`` magnitudes over the whole linear (a block
        cannot know them; :class:`moerge.merge.streaming.TopK`), computed here when the linear is whole."""
        flat = taus.reshape(self.n, -1).double()  # (N, D)
        self.gram += (flat @ flat.T).cpu()
        self.l1_each += float(flat.abs().sum())
        self.l1_sum += float(flat.sum(0).abs().sum())
        flat32 = taus.reshape(self.n, -1).float()  # (N, D)
        trimmed = flat32 * keep if keep is not None else torch.stack([magnitude(t, self.density) for t in flat32])
        nonzero = trimmed != 0
        multi = nonzero.sum(0) >= 2  # (D,)
        pos, neg = (trimmed > 0).any(0), (trimmed < 0).any(0)
        self.overlap += int(multi.sum())
        self.conflicts += int((multi & pos & neg).sum())
        m = merged_tau.reshape(1, -1).double()  # (1, D)
        self.err_num += ((m - flat) ** 2).sum(1).cpu()
        self.shared_sq += float((m ** 2).sum())

    def metrics(self) -> dict[str, float]:
        norms = self.gram.diagonal().clamp_min(0).sqrt()  # (N,)
        return {
            "sign_conflict": self.conflicts / self.overlap if self.overlap else 0.0,
            "cancellation": 1.0 - self.l1_sum / self.l1_each if self.l1_each > EPS else 0.0,
            "cosine": self._mean_cosine(norms),
            "merge_error": float((self.err_num.sqrt() / (norms + self.shared_sq ** 0.5).clamp_min(EPS)).mean())
            if float(norms.sum()) + self.shared_sq > EPS else 0.0,
        }

    def _mean_cosine(self, norms: torch.Tensor) -> float:
        if self.n < 2:
            return 1.0
        vals = []
        for i in range(self.n):
            for j in range(i + 1, self.n):
                d = float(norms[i] * norms[j])
                vals.append(float(self.gram[i, j]) / d if d > EPS else (1.0 if norms[i] == norms[j] == 0 else 0.0))
        return sum(vals) / len(vals)


def conflict_score(metrics: dict[str, float], metric: str) -> float:
    """Higher = more conflict (cosine is turned around)."""
    return 1.0 - metrics["cosine"] if metric == "cosine" else metrics[metric]
