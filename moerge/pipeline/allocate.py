"""Bytes where they pay: merge or route each unit, with which kind, rank or density, chosen from activations.

``routing: {select: {budget: 1.05x, metric: activation}, allocate: {...}}`` makes :func:`allocate_plan` choose
the plan.  Three steps, each one unit (or one expert) at a time:

1. **moments** (:mod:`.moments`): each expert's model runs its calibration prompts once; the input second
   moment C_e of every candidate linear is kept (cached on disk).
2. **measure**: per unit, linear and expert, Δ = W_e - W_s is read from the sources and every storage option
   is scored by the output error it leaves on expert e's tokens, tr((Δ - Δ̂) C_e (Δ - Δ̂)ᵀ)
   (:mod:`moerge.analysis.activations`): nothing (merged), twin at each rank (activation-aware SVD), bit1,
   sparse at each density, dense (exact).  The scores are cached per unit (``$MOERGE_CACHE/allocation``).
   With ``sensitivity: fisher`` each output row o of the error is weighted by w_o, how much expert e's answer
   depends on that row (:func:`row_weights`): tr(W (Δ - Δ̂) C_e (Δ - Δ̂)ᵀ), W = diag(w), the diagonal K-FAC
   view of the loss's curvature; every option is then scored and built on W^½ Δ (twin factors of W^½ Δ with
   U mapped back by W^-½; bit1's per-row scales are unchanged; sparse keeps by w_o |Δ_oj|² C_jj).  ``fisher``
   normalises w to mean 1 per expert; ``fisher_global`` over all experts (the balance between experts moves too).
3. **choose**: errors are normalised (per token of the expert's prompts, or relative to the linear's output
   energy), and a multiple-choice knapsack (:func:`moerge.analysis.activations.allocate`) picks one kind per unit
   and one option per (linear, expert) that removes the most error within the budget.  With several shared
   candidates (``allocate.shared``), each is measured and the one that leaves the least error wins.

The chosen plan's routed linears are built by :func:`aware_build`: the activation-aware factors, scales and
supports the scores assumed (the model side stores them as the usual twin / bit1 / sparse / dense tensors).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import dtypes
from ..analysis import activations as act
from ..analysis import cache as analysis_cache
from ..kinds import KINDS, KindConfig
from ..kinds.bit1 import pack_signs
from ..recipe import AllocateSpec, MergeSpec
from . import moments as mom
from .context import BuildContext, resolve_merge
from .routed import Maker, RoutedUnit, empty_tensors
from .units import Linear, Unit

VERSION = 1
Scores = dict[str, dict[str, dict[str, Any]]]  # linear name -> expert index (str) -> {"none", "twin", ...}


# ---------------------------------------------------------------- step 2: scores of one unit

Rows = dict[str, torch.Tensor]  # linear path -> (O,) weight of each output row's error


def row_weights(moments: list[mom.Moments], linears: list[str], per_expert: bool = True) -> list[Rows]:
    """Per expert, each linear's output-gradient moment divided by its mean over every candidate row of that
    expert (``per_expert``: the weights reorder bytes within an expert, across layers and rows, and leave the
    balance between experts to ``normalize``) or of every expert (an expert whose answers depend more on its
    weights, per prompt, weighs more); floored at 1e-4 of the mean so that W^-½ stays finite."""
    grads = [{p: m.grad(p) for p in linears} for m in moments]

    def mean(gs: list[Rows]) -> float:
        total = sum(float(v.sum()) for g in gs for v in g.values())
        return max(total / max(sum(v.numel() for g in gs for v in g.values()), 1), 1e-300)

    scales = [mean([g]) for g in grads] if per_expert else [mean(grads)] * len(grads)
    return [{p: (v / s).clamp_min(1e-4) for p, v in g.items()} for g, s in zip(grads, scales)]


def weigh_rows(delta: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """W^½ Δ (O, I) for row weights W = diag(rows) (Δ itself when None)."""
    return delta if rows is None else delta * rows.sqrt().to(delta)[:, None]


def linear_scores(delta: torch.Tensor, cd: torch.Tensor, wh: act.Whitener, w_e: torch.Tensor,
                  spec: AllocateSpec, rows: torch.Tensor | None = None) -> dict[str, Any]:
    """Every option's damped activation error for one (linear, expert) (``cd`` = C + αI, ``wh`` its factor), with
    each output row's error weighted by ``rows`` (O,) when given; ``signal`` = tr(W_e C W_eᵀ) (row weighted too),
    what ``normalize: relative`` divides by."""
    delta, w_e = weigh_rows(delta, rows), weigh_rows(w_e, rows)
    spectrum = act.twin_spectrum(delta, wh)  # (k,) descending
    total = float(spectrum.sum())
    cum = spectrum.cumsum(0)
    tail = [max(total - float(cum[min(r, len(cum)) - 1]), 0.0) for r in spec.ranks]
    out: dict[str, Any] = {"none": total, "signal": act.quad_error(w_e, cd), "twin": tail}
    if "bit1" in spec.kinds:
        out["bit1"] = act.bit1_error(delta, cd)
    if "sparse" in spec.kinds:
        out["sparse"] = [act.sparse_error(delta, cd, d, total) for d in spec.densities]
    return out


def unit_scores(ctx: BuildContext, unit: Unit, moments: list[mom.Moments], spec: AllocateSpec,
                shared_is_base: bool, rows: list[Rows] | None = None) -> Scores:
    """Scores of every (linear, expert) of ``unit`` against the context's shared weight."""
    out: Scores = {}
    whiteners: dict[tuple[str, int], tuple[torch.Tensor, act.Whitener]] = {}  # (site, expert): shared by q/k/v
    for lin in unit.linears:
        base = ctx.load(lin.weight).float()
        taus = ctx.deltas(lin.weight, base)
        w_s = base if shared_is_base and not lin.tied else ctx.merged(lin.weight, base, taus)  # tied: as written
        out[lin.name] = {}
        for e, w_e in enumerate(ctx.expert_weights(lin.weight, base, taus)):
            site = (moments[e].site[lin.path], e)
            if site not in whiteners:
                cd = act.damped(moment(ctx, moments, lin.path, lin.weight, e).to(base.device), spec.damp)
                whiteners[site] = (cd, act.Whitener(torch.linalg.cholesky(cd)))
            cd, wh = whiteners[site]
            out[lin.name][str(e)] = linear_scores(w_e - w_s, cd, wh, w_e, spec,
                                                  None if rows is None else rows[e][lin.path])
    return out


def moment(ctx: BuildContext, moments: list[mom.Moments], path: str, weight: str, e: int) -> torch.Tensor:
    """Expert e's input moment of a linear as the routed linear sees it: behind the merged norm when the norm is
    folded into the expert's weight (x_s = x_e / r, so C = diag(1/r) C_e diag(1/r))."""
    c = moments[e].of(path)  # (I, I) float64
    norm = ctx.folds.get(weight)
    if norm is None:
        return c
    inv = 1.0 / ctx.fold_ratios(norm)[e].double()  # (I,)
    return c * inv[:, None] * inv[None, :]


def scores_key(ctx: BuildContext, moment_keys: list[str], spec: AllocateSpec, shared: str) -> str:
    fields = {"v": VERSION, "moments": moment_keys, "shared": shared, "seed": ctx.recipe.seed,
              "folds": sorted(ctx.folds.items()),
              "spec": spec.model_dump(mode="json", include={"kinds", "ranks", "densities", "damp"}),
              "inputs": [analysis_cache.folder_stamp(ctx.base.folder),
                         *(analysis_cache.folder_stamp(s.path) for s in ctx.sources)]}
    if spec.sensitivity != "none":  # (absent otherwise: scores cached before the option keep their key)
        fields["sensitivity"] = spec.sensitivity
    blob = json.dumps(fields, sort_keys=True, default=str)
    return "alloc-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def all_scores(ctx: BuildContext, units: list[Unit], moments: list[mom.Moments], spec: AllocateSpec,
               key: str, shared_is_base: bool, progress: bool, rows: list[Rows] | None = None) -> dict[str, Scores]:
    """Scores of every unit (cached ones read, the rest measured and added to the cache)."""
    known: dict[str, Any] = _load(key)
    todo = [u for u in units if u.path not in known]
    for u in tqdm(todo, desc="measure", unit="unit", disable=not progress or not todo, dynamic_ncols=True):
        known[u.path] = unit_scores(ctx, u, moments, spec, shared_is_base, rows)
        _save(key, known)
    return {u.path: known[u.path] for u in units}


def _load(key: str) -> dict[str, Any]:
    root = analysis_cache.cache_dir()
    try:
        return json.loads((root / f"{key}.json").read_text()) if root is not None else {}
    except (OSError, ValueError):
        return {}


def _save(key: str, data: dict[str, Any]) -> None:
    analysis_cache.save(key, data)  # best effort, atomic


# ---------------------------------------------------------------- step 3: options and the choice

@dataclass
class Item:
    """One (linear, expert) in one kind: the options the knapsack may pick, each with its KindConfig."""

    options: list[act.Option]
    cfgs: dict[str, KindConfig] = field(default_factory=dict)


def weight_of(s: dict[str, Any], tokens: int, normalize: str) -> float:
    """What an error of this (linear, expert) is divided by: the expert's tokens, or the linear's output energy."""
    if normalize == "relative":
        return max(float(s["signal"]), 1e-30)
    return float(max(tokens, 1))


def kind_items(kind: str, lin: Linear, e: int, s: dict[str, Any], spec: AllocateSpec, dtype: torch.dtype,
               scale: float) -> Item:
    """The options of one (linear, expert) within ``kind`` (twin and sparse include 0 bytes = nothing)."""
    out_f, in_f = lin.shape
    bias = dtypes.nbytes((out_f,), dtype) if lin.bias else 0

    def nbytes(cfg: KindConfig) -> int:
        shapes = KINDS.get(kind).shapes(out_f, in_f, cfg, None)
        return sum(dtypes.nbytes(sh, d or dtype) for sh, d in shapes.values()) + bias

    item = Item([])
    choices: list[tuple[str, KindConfig, float]] = []
    if kind == "twin":
        choices = [("r0", KindConfig(rank=0), s["none"])] + [
            (f"r{r}", KindConfig(rank=r), err) for r, err in zip(spec.ranks, s["twin"]) if r <= min(out_f, in_f)]
    elif kind == "sparse":
        choices = [("d0", KindConfig(density=0.0), s["none"])] + [
            (f"d{d:g}", KindConfig(density=d), err) for d, err in zip(spec.densities, s["sparse"])]
    elif kind == "bit1":
        choices = [("bit1", KindConfig(), s["bit1"])]
    elif kind == "dense":
        choices = [("dense", KindConfig(), 0.0)]
    for label, cfg, err in choices:
        item.options.append(act.Option(label, 0 if label in ("r0", "d0") else nbytes(cfg), err / scale))
        item.cfgs[label] = cfg
    return item


def unit_groups(unit: Unit, scores: Scores, tokens: list[int], spec: AllocateSpec,
                dtype: torch.dtype) -> tuple[dict[str, act.Items], dict[tuple[str, str], Item]]:
    """The knapsack's view of one unit: per kind ("merged" first), its items' options; and every Item by
    (kind, item key) for reading the chosen KindConfig back."""
    by_kind: dict[str, act.Items] = {"merged": {}}
    lookup: dict[tuple[str, str], Item] = {}
    for lin in unit.linears:
        per_e = scores[lin.name]
        scale = {e: weight_of(s, tokens[int(e)], spec.normalize) for e, s in per_e.items()}
        by_kind["merged"][lin.name] = [act.Option("none", 0, sum(s["none"] / scale[e] for e, s in per_e.items()))]
        for kind in spec.kinds:
            items = {e: kind_items(kind, lin, int(e), s, spec, dtype, scale[e]) for e, s in per_e.items()}
            if kind in ("twin", "sparse"):  # each expert its own rank / density
                for e, item in items.items():
                    by_kind.setdefault(kind, {})[f"{lin.name}/{e}"] = item.options
                    lookup[(kind, f"{lin.name}/{e}")] = item
            else:  # every expert of the linear stores the kind, or the linear is left merged
                none = by_kind["merged"][lin.name][0]
                joint = act.Option(kind, sum(i.options[0].nbytes for i in items.values()),
                                   sum(i.options[0].error for i in items.values()))
                by_kind.setdefault(kind, {})[lin.name] = [none, joint]
    return by_kind, lookup


def routed_unit(unit: Unit, kind: str, picks: dict[str, act.Option], lookup: dict[tuple[str, str], Item],
                n_experts: int, maker: Maker, none_error: float) -> RoutedUnit | None:
    """The chosen kind and options of one unit as a RoutedUnit (None: merged); linears that store nothing for
    any expert are left out of it (merged)."""
    if kind == "merged":
        return None
    per: dict[tuple[str, int], KindConfig | None] = {}
    kept = []
    for lin in unit.linears:
        if kind in ("twin", "sparse"):
            labels = {e: picks[f"{lin.name}/{e}"].label for e in range(n_experts)}
            cfgs = {e: None if labels[e] in ("r0", "d0") else lookup[(kind, f"{lin.name}/{e}")].cfgs[labels[e]]
                    for e in range(n_experts)}
        else:
            cfgs = {e: KindConfig() if picks[lin.name].label == kind else None for e in range(n_experts)}
        if any(c is not None for c in cfgs.values()):
            kept.append(lin)
            per.update({(lin.name, e): c for e, c in cfgs.items()})
    if not kept:
        return None
    left = sum(o.error for o in picks.values())
    gain = {"before": none_error, "after": left, "bytes": float(sum(o.nbytes for o in picks.values()))}
    return RoutedUnit(replace(unit, linears=tuple(kept)), KINDS.get(kind), KindConfig(), per, maker, gain)


def aware_maker(ctx: BuildContext, moments: list[mom.Moments], kind: str, damp: float,
                rows: list[Rows] | None = None) -> Maker:
    """Builds expert e's tensors in a linear as the scores assumed: activation-aware twin factors and bit1
    scales, sparse supports chosen by |Δ|² C_jj, dense weights (twin and sparse on W^½ Δ with row weights)."""
    def make(lin: Linear, e: int, w_s: torch.Tensor, w_e: torch.Tensor, cfg: KindConfig | None) -> dict:
        out_f, in_f = lin.shape
        delta = w_e.float() - w_s.float()  # (O, I)
        if kind == "dense":
            return {"weight": w_e}
        if cfg is None:
            return empty_tensors(kind, out_f, in_f)
        c = moment(ctx, moments, lin.path, lin.weight, e).to(delta.device)  # (I, I)
        w = None if rows is None else rows[e][lin.path].to(delta.device)  # (O,)
        if kind == "twin":
            U, V = act.twin_factors(weigh_rows(delta, w), act.Whitener.of(c, damp), min(cfg.rank or 1, out_f, in_f))
            return {"U": U if w is None else (U / w.sqrt().float()[:, None]).contiguous(), "V": V}
        if kind == "bit1":  # the per-row scale is the same with or without row weights
            return {"signs": pack_signs(delta), "scale": act.bit1_scale(delta, act.damped(c, damp))}
        keep = act.sparse_keep(weigh_rows(delta, w), c.diagonal(), cfg.density or 1.0)
        return {"indices": keep.to(torch.int32), "values": delta.reshape(-1)[keep]}

    return make


# ---------------------------------------------------------------- the whole choice

@dataclass
class Allocation:
    """What :func:`allocate_plan` decided: the context (its merge may be a searched one), the routed units, and
    per shared candidate the error left (normalised; lower is better)."""

    ctx: BuildContext
    routed: list[RoutedUnit]
    shared_is_base: bool
    left: dict[str, float]


def with_merge(ctx: BuildContext, cand: MergeSpec | str | None) -> tuple[BuildContext, bool, str]:
    """The context whose static merge is ``cand`` ("base": the recipe's merge, routed linears over the base;
    None: the recipe's own), whether the routed linears' shared weight is the base, and a label."""
    routing = ctx.recipe.routing
    assert routing is not None
    if cand is None or cand == "base":
        base = cand == "base" or routing.shared == "base"
        return ctx, base, "base" if base else merge_label(ctx.recipe.merge)
    assert isinstance(cand, MergeSpec)
    recipe = ctx.recipe.model_copy(update={"merge": cand})
    recipe._file = ctx.recipe.file
    method, params = resolve_merge(recipe, ctx.file)
    return replace(ctx, recipe=recipe, method=method, params=params, ratio_cache={}), False, merge_label(cand)


def merge_label(m: MergeSpec) -> str:
    return m.method + "".join(f" {k} {v:g}" for k, v in (("lambda", m.lambda_), ("density", m.density))
                              if v is not None)


def reserved_bytes(ctx: BuildContext, units: list[Unit], n_tensors_per_linear: int = 3) -> int:
    """Bytes the experts' tensors cannot use: the routers and the shard headers (about 200 bytes per tensor)."""
    routing = ctx.recipe.routing
    assert routing is not None
    hidden, n = int(ctx.base.config["hidden_size"]), len(ctx.sources)
    routers = 1 if routing.router.level == "sequence" else len(units)
    router_bytes = routers * dtypes.nbytes((n * hidden + hidden + 1 + n,), ctx.out_dtype)
    n_linears = sum(len(u.linears) for u in units)
    return router_bytes + 200 * (len(ctx.base.names) + n * n_linears * n_tensors_per_linear + 4 * routers)


def choose(ctx: BuildContext, units: list[Unit], scores: dict[str, Scores], moments: list[mom.Moments],
           spec: AllocateSpec, budget: int, rows: list[Rows] | None = None) -> tuple[list[RoutedUnit], float]:
    """The knapsack over every unit; the routed units and the (normalised) error left."""
    tokens = [m.tokens for m in moments]
    groups, lookups = {}, {}
    for u in units:
        groups[u.path], lookups[u.path] = unit_groups(u, scores[u.path], tokens, spec, ctx.out_dtype)
    picked = act.allocate(groups, budget)
    routed, left = [], 0.0
    for u in units:
        kind, picks = picked[u.path]
        left += sum(o.error for o in picks.values())
        none = sum(o[0].error for o in groups[u.path]["merged"].values())
        maker = aware_maker(ctx, moments, kind, spec.damp, rows)
        ru = routed_unit(u, kind, picks, lookups[u.path], len(ctx.sources), maker, none)
        if ru is not None:
            routed.append(ru)
    return routed, left


def allocate_plan(ctx: BuildContext, units: list[Unit], ratio: float, base_bytes: int,
                  progress: bool = True) -> Allocation:
    """Measure every unit (per shared candidate) and choose the plan within ``ratio`` x ``base_bytes``."""
    routing = ctx.recipe.routing
    assert routing is not None
    spec = routing.allocate or AllocateSpec()
    linears = [lin.path for u in units for lin in u.linears]
    tok = ctx.tokenizer()
    fisher = spec.sensitivity != "none"
    moments = [mom.expert_moments(ctx, e, tok, linears, progress, fisher) for e in range(len(ctx.sources))]
    keys = [mom.moments_key(ctx, e, linears, fisher) for e in range(len(ctx.sources))]
    rows = row_weights(moments, linears, spec.sensitivity == "fisher") if fisher else None
    budget = int((ratio - 1.0) * base_bytes) - reserved_bytes(ctx, units)
    best: Allocation | None = None
    left: dict[str, float] = {}
    for cand in spec.merges or [None]:
        cctx, shared_base, label = with_merge(ctx, cand)
        scores = all_scores(cctx, units, moments, spec, scores_key(cctx, keys, spec, label), shared_base, progress,
                            rows)
        routed, left[label] = choose(cctx, units, scores, moments, spec, max(budget, 0), rows)
        if best is None or left[label] < min(v for k, v in left.items() if k != label):
            best = Allocation(cctx, routed, shared_base, left)
    assert best is not None
    return best
