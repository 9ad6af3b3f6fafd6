"""The streaming conflict analysis: per unit, every expert's task vectors against the static merge.

Units analysed before over the same inputs come from the analysis cache (:mod:`moerge.analysis.cache`); the
others are streamed linear by linear (:class:`moerge.analysis.conflict.UnitStats`) and added to it.
``analyze_recipe`` is what ``moerge analyze`` runs: every attention and MLP unit, a table, ``conflict.json``
and the heatmap PNG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis import cache as analysis_cache
from ..analysis.conflict import DEFAULT_DENSITY, METRICS, UnitStats
from ..analysis.report import conflict_table, heatmap
from ..errors import OutputError
from ..merge.sparsify import keep_count
from ..merge.streaming import Rows, TopK, fit_tops, merged_blocks, streamable
from ..recipe import Recipe
from .context import BuildContext
from .units import Unit, candidate_units


def analysis_density(ctx: BuildContext) -> float:
    """The merge's own magnitude density (TIES), else :data:`DEFAULT_DENSITY`."""
    if ctx.method.sparsify == "magnitude" and ctx.params.density < 1:
        return ctx.params.density
    return DEFAULT_DENSITY


def unit_metrics(ctx: BuildContext, unit: Unit, density: float) -> dict[str, float]:
    stats = UnitStats(len(ctx.sources), density)
    for lin in unit.linears:
        ranges = ctx.blocks(lin.weight)
        if len(ranges) > 1 and streamable(ctx.method, ctx.params):
            add_blocks(ctx, stats, lin.weight, ranges)
            continue
        base = ctx.load(lin.weight).float()
        taus = ctx.deltas(lin.weight, base)
        stats.add(_stack(taus, base), ctx.merged(lin.weight, base, taus) - base)
    return stats.metrics()


def _stack(taus: list[torch.Tensor | None], base: torch.Tensor) -> torch.Tensor:
    return torch.stack([t if t is not None else torch.zeros_like(base, dtype=torch.float32) for t in taus])


def add_blocks(ctx: BuildContext, stats: UnitStats, name: str, ranges: list[Rows]) -> None:
    """One linear's statistics over its row blocks: each expert's top magnitudes fitted first (two passes)."""
    read = ctx.read(name)
    n = math.prod(ctx.shape(name))

    def values() -> Iterator[list[torch.Tensor]]:  # per block, every expert's |task vector|
        for rows in ranges:
            base, taus = read(rows)
            yield list(_stack(taus, base).abs().reshape(stats.n, -1))

    tops = fit_tops([TopK(n, keep_count(n, stats.density)) for _ in range(stats.n)], values)
    merged = merged_blocks(ctx.method, ctx.params, ctx.stored_name(name), ctx.shape(name), ranges, read)
    for rows, w_s in zip(ranges, merged):
        base, taus = read(rows)
        full = _stack(taus, base)  # (N, b, in)
        keep = torch.stack([top.mask(t.abs().reshape(-1)) for top, t in zip(tops, full)])  # (N, D)
        stats.add(full, w_s - base.float(), keep)


def analyze_units(ctx: BuildContext, units: list[Unit], progress: bool = True) -> dict[str, dict[str, float]]:
    """Conflict metrics of every unit (cached ones read, the rest streamed and added to the cache)."""
    density = analysis_density(ctx)
    folders = [ctx.base.folder, *(Path(src.path) for src in ctx.sources)]
    key = analysis_cache.inputs_key(folders, ctx.recipe.merge.model_dump(mode="json"), ctx.recipe.seed, density)
    known = analysis_cache.load(key)
    todo = [u for u in units if u.path not in known]
    for u in tqdm(todo, desc="analyze", unit="unit", disable=not progress or not todo, dynamic_ncols=True):
        known[u.path] = unit_metrics(ctx, u, density)
    if todo:
        analysis_cache.save(key, known)
    return {u.path: known[u.path] for u in units}


def analyze_recipe(recipe: Recipe, out: Path | None = None, *, file: str | None = None, progress: bool = True,
                   device: str | torch.device | None = "cpu") -> str:
    """``moerge analyze``: the table of every unit's metrics; with ``out``, also conflict.json and the PNG."""
    if out is not None and out.exists() and not out.is_dir():
        raise OutputError(out, None, "--out exists and is not a folder")
    ctx = BuildContext.open(recipe, file, device)
    units = candidate_units(ctx.base.index, ctx.n_layers, ctx.family, "both")
    metrics = analyze_units(ctx, units, progress)
    text = conflict_table(metrics)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"metrics": list(METRICS), "experts": ctx.names, "merge": recipe.merge.method,
                   "units": [{"unit": u.path, "layer": u.layer, "group": u.group, **metrics[u.path]} for u in units]}
        (out / "conflict.json").write_text(json.dumps(payload, indent=2) + "\n")
        png = heatmap(metrics, {u.path: (u.layer, u.group) for u in units}, out / "conflict.png")
        text += f"\nwrote {out / 'conflict.json'} and {png}"
    return text
