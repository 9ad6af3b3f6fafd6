"""Choose the routed units: ``all``, explicit ``layers``, a metric ``threshold``, a ``top_fraction`` of the
most conflicted units, or a storage ``budget`` (route the most conflicted units while the checkpoint stays
within ``budget x`` the base's bytes)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import RecipeError
from ..recipe import SelectSpec
from .conflict import METRICS, conflict_score

ACTIVATION = "activation"  # the select metric that makes the budget allocator choose the plan (pipeline.allocate)


def needs_metrics(spec: SelectSpec) -> bool:
    return spec.threshold is not None or spec.top_fraction is not None or spec.budget is not None


def select_units(paths: list[str], spec: SelectSpec, metrics: dict[str, dict[str, float]] | None,
                 layer_of: Callable[[str], int], extra_bytes: Callable[[str], int], base_bytes: int,
                 file: str = "recipe") -> list[str]:
    """Return the selected unit paths, in the order given."""
    if spec.metric not in METRICS:
        raise RecipeError(file, "routing.select.metric", f"unknown metric '{spec.metric}'; one of: "
                                                         f"{', '.join(METRICS)}, activation (with a budget)")
    if spec.layers is not None:
        n_layers = max(layer_of(p) for p in paths) + 1 if paths else 0
        bad = [i for i in spec.layers if not 0 <= i < n_layers]
        if bad:
            raise RecipeError(file, "routing.select.layers", f"layers {bad} out of range 0..{n_layers - 1}")
        return [p for p in paths if layer_of(p) in set(spec.layers)]
    if not needs_metrics(spec):
        return list(paths)
    assert metrics is not None
    score = {p: conflict_score(metrics[p], spec.metric) for p in paths}
    ranked = sorted(paths, key=lambda p: -score[p])
    if spec.threshold is not None:
        chosen = {p for p in paths if score[p] >= spec.threshold}
    elif spec.top_fraction is not None:
        chosen = set(ranked[: max(1, math.ceil(spec.top_fraction * len(paths)))])
    else:
        chosen = _within_budget(ranked, spec, extra_bytes, base_bytes, file)
    return [p for p in paths if p in chosen]


def _within_budget(ranked: list[str], spec: SelectSpec, extra_bytes: Callable[[str], int], base_bytes: int,
                   file: str) -> set[str]:
    try:
        ratio = spec.budget_ratio()
    except ValueError as exc:
        raise RecipeError(file, "routing.select.budget", str(exc)) from None
    assert ratio is not None
    room = (ratio - 1.0) * base_bytes
    chosen: set[str] = set()
    for p in ranked:
        cost = extra_bytes(p)
        if cost <= room:
            chosen.add(p)
            room -= cost
    return chosen
