"""The plan of a build: for every tensor of the output, what is computed (copy, merge, route) and its bytes.

:func:`make_plan` reads headers only (plus the conflict analysis when the selection needs metrics) and
decides which units are routed, with which storage kind and parameters per unit.  A :class:`Plan` is data:
the output tensors in write order with their shapes and dtypes (so the writer lays out the shards before any
work), the bytes of the result, a peak-memory estimate, and the checkpoint's :class:`Manifest`.  Jobs
(:mod:`.jobs`) are made from it; nothing here computes a tensor.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .. import dtypes
from ..analysis.conflict import METRICS
from ..analysis.select import ACTIVATION, needs_metrics, select_units
from ..checkpoint.manifest import LinearSpec, Manifest, UnitSpec
from ..errors import RecipeError
from ..io.sources import FullSource, LoraSource
from ..io.writer import TensorSpec
from ..kinds import KINDS, ExpertKind, KindConfig
from .allocate import allocate_plan
from .analyze import analyze_units
from .context import BuildContext
from .routed import RoutedUnit
from .units import HEAD, ORDER, Linear, Unit, candidate_units, folds_norms


@dataclass
class Plan:
    ctx: BuildContext
    units: list[Unit]  # the candidates
    routed: list[RoutedUnit]
    shared_is_base: bool
    metrics: dict[str, dict[str, float]] | None
    shared_left: dict[str, float] | None = None  # allocated plans: error left per shared candidate
    _lora_ranks: dict[tuple[int, str], int] = field(default_factory=dict, repr=False)

    @property
    def float_dtype(self) -> torch.dtype:
        return self.ctx.out_dtype

    # ---- per tensor
    def lora_rank(self, e: int, lin: Linear) -> int | None:
        """Expert e's LoRA rank on ``lin`` (0: the adapter leaves it alone; None: a full checkpoint)."""
        src = self.ctx.sources[e]
        if not isinstance(src, LoraSource):
            return None
        parts = src.modules.get(lin.weight, {})
        return src.index[parts["A"]].shape[0] if "A" in parts else 0

    def expert_shapes(self, ru: RoutedUnit, e: int, lin: Linear) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Expert e's stored tensors in routed linear ``lin`` -> (shape, dtype)."""
        out = lin.shape[0]
        raw = ru.shapes(lin, e, self.lora_rank(e, lin))
        shapes = {k: (tuple(s), d or self.float_dtype) for k, (s, d) in raw.items()}
        if lin.bias:
            shapes["bias_delta"] = ((out,), self.float_dtype)
        return shapes

    def routed_linears(self) -> dict[str, tuple[RoutedUnit, Linear]]:
        """Weight name of every routed linear -> (its unit, the linear)."""
        return {lin.weight: (ru, lin) for ru in self.routed for lin in ru.unit.linears}

    def tied_linears(self) -> list[tuple[RoutedUnit, Linear]]:
        """Routed linears whose shared weight is another tensor (a tied head): their experts are written last."""
        return [(ru, lin) for ru in self.routed for lin in ru.unit.linears if lin.tied]

    def outputs(self) -> list[TensorSpec]:
        """Every weight tensor of the output, in write order (routers are not weights: see :mod:`.routers`)."""
        routed, skip = self.routed_linears(), {lin.bias_name for ru in self.routed for lin in ru.unit.linears}
        specs = []
        for name in self.ctx.base.names:
            if name in routed:
                specs += routed_specs(self, *routed[name])
            elif name not in skip:
                specs.append(TensorSpec(name, tuple(self.ctx.base.index[name].shape), static_dtype(self.ctx, name)))
        for ru, lin in self.tied_linears():
            specs += routed_specs(self, ru, lin)
        return specs

    # ---- bytes
    def unit_extra_bytes(self, ru: RoutedUnit) -> int:
        return sum(dtypes.nbytes(s, d) for lin in ru.unit.linears for e in range(len(self.ctx.sources))
                   for s, d in self.expert_shapes(ru, e, lin).values())

    def base_bytes(self) -> int:
        """The dense base at the output dtype."""
        return sum(dtypes.nbytes(tuple(i.shape), self.ctx.out_dtype) for i in self.ctx.base.index.tensors.values())

    def extra_bytes(self) -> int:
        return sum(self.unit_extra_bytes(ru) for ru in self.routed)

    # ---- the checkpoint's description
    def manifest(self, initialized: bool) -> Manifest:
        routing = self.ctx.recipe.routing
        assert routing is not None
        router = routing.router
        units = {ru.unit.path: UnitSpec(ru.kind.name, {lin.name: LinearSpec(lin.bias, tuple(
            {k: s for k, (s, _) in self.expert_shapes(ru, e, lin).items()} for e in range(len(self.ctx.sources))))
            for lin in ru.unit.linears}) for ru in self.routed}
        router_input, prepass = self.router_input()
        return Manifest(tuple(self.ctx.names), router.level,
                        router.top_k if router.top_k is not None else (1 if router.level == "sequence" else None),
                        router_input, initialized, None, "base" if self.shared_is_base else "merge", units,
                        prepass=prepass)

    def router_input(self) -> tuple[str | None, bool]:
        """The sequence router's input unit, and whether it runs after a routed unit (then the model computes it
        with a pre-pass of the shared model): ``router.tap`` (layer k's attention input), else the first routed
        unit's input."""
        if not self.routed:
            return None, False
        routing = self.ctx.recipe.routing
        assert routing is not None
        first = self.routed[0].unit
        tap = routing.router.tap
        if routing.router.level != "sequence":
            return first.path, False
        if tap is None and first.group != HEAD:
            return first.path, False
        if tap is None:  # only the head is routed: the last layer's input, not the head's (generate keeps 1 token)
            tap = self.ctx.n_layers - 1
        return self.ctx.family.unit_path(tap, "attention"), (first.layer, ORDER[first.group]) < (tap, 0)


def static_dtype(ctx: BuildContext, name: str) -> torch.dtype:
    """Floating tensors take the output dtype; the others (int, bool, fp8) keep the base's."""
    code = ctx.base.index[name].dtype
    return ctx.out_dtype if code in dtypes.FLOAT_CODES else dtypes.from_st(code)


def routed_specs(plan: Plan, ru: RoutedUnit, lin: Linear) -> list[TensorSpec]:
    """Shared weight (+ bias), then every expert's tensors of one routed linear."""
    dt = plan.float_dtype
    specs = [] if lin.tied else [TensorSpec(lin.weight, lin.shape, dt)]  # a tied head's W_s: the embedding
    if lin.bias:
        specs.append(TensorSpec(lin.bias_name, (lin.shape[0],), dt))
    for e in range(len(plan.ctx.sources)):
        specs += [TensorSpec(f"{lin.path}.experts.{e}.{k}", s, d) for k, (s, d) in plan.expert_shapes(ru, e, lin).items()]
    return specs


# ---------------------------------------------------------------- making the plan

def kind_of(ctx: BuildContext) -> tuple[ExpertKind, KindConfig]:
    """The recipe's kind and its parameters, checked against the experts."""
    routing = ctx.recipe.routing
    assert routing is not None
    spec = routing.expert
    kind = KINDS.get(spec.kind, file=ctx.file, field="routing.expert.kind")
    cfg = KindConfig(spec.rank, spec.density, spec.svd)
    kind.check(cfg, ctx.file)
    full = [s.name for s in ctx.sources if isinstance(s, FullSource)]
    if kind.needs_lora and full:
        raise RecipeError(ctx.file, "routing.expert.kind", f"kind 'lora' needs LoRA experts; {', '.join(full)} "
                                                           "are full checkpoints (use twin for a low-rank version)")
    return kind, cfg


def make_plan(ctx: BuildContext, progress: bool = True, metrics: dict | None = None) -> Plan:
    """Which units are routed (the recipe's selection rule) and how."""
    routing = ctx.recipe.routing
    assert routing is not None
    check_tap(ctx)
    check_head(ctx)
    units = candidate_units(ctx.base.index, ctx.n_layers, ctx.family, routing.modules, routing.head)
    if folds_norms(routing):
        ctx.folds = ctx.norm_folds([(u.layer, u.group, lin.name, lin.weight) for u in units for lin in u.linears])
    if routing.select.metric == ACTIVATION:
        return allocated_plan(ctx, units, progress)
    kind, cfg = kind_of(ctx)
    shared_is_base = routing.shared == "base" or (routing.shared is None and kind.needs_lora)
    plan = Plan(ctx, units, [], shared_is_base, metrics)
    if needs_metrics(routing.select) and plan.metrics is None:
        plan.metrics = analyze_units(ctx, units, progress)
    every = {u.path: RoutedUnit(u, kind, cfg) for u in units}
    chosen = select_units(list(every), routing.select, plan.metrics, lambda p: every[p].unit.layer,
                          lambda p: plan.unit_extra_bytes(every[p]), plan.base_bytes(), ctx.file)
    plan.routed = [every[p] for p in chosen]
    if not plan.routed:
        warnings.warn("no unit was selected for routing: the result is a static merge with routers on nothing",
                      stacklevel=2)
    return plan


def check_head(ctx: BuildContext) -> None:
    """``routing.head``: the base has an output head (its own weight or tied input embeddings)."""
    fam = ctx.family
    if ctx.recipe.routing.head and ctx.stored_name(fam.lm_head) not in ctx.base.index:  # type: ignore[union-attr]
        raise RecipeError(ctx.file, "routing.head", f"the base has no output head ({fam.lm_head}, or {fam.embed} "
                                                    "with tied embeddings)")


def check_tap(ctx: BuildContext) -> None:
    router = ctx.recipe.routing.router  # type: ignore[union-attr]
    if router.tap is None:
        return
    if router.level != "sequence":
        raise RecipeError(ctx.file, "routing.router.tap", "a tap feeds the sequence-level router; token-level routers "
                                                          "read their own unit's input")
    if router.tap >= ctx.n_layers:
        raise RecipeError(ctx.file, "routing.router.tap", f"layer {router.tap} out of range 0..{ctx.n_layers - 1}")


def allocated_plan(ctx: BuildContext, units: list[Unit], progress: bool) -> Plan:
    """``select: {budget: ..., metric: activation}``: merge or route, kind and size per unit from activations
    (:mod:`.allocate`)."""
    routing = ctx.recipe.routing
    assert routing is not None
    try:
        ratio = routing.select.budget_ratio()
    except ValueError as exc:
        raise RecipeError(ctx.file, "routing.select.budget", str(exc)) from None
    if ratio is None:
        raise RecipeError(ctx.file, "routing.select", "metric 'activation' chooses within a storage budget: set "
                                                      "routing.select.budget (e.g. 1.05x)")
    base_bytes = Plan(ctx, units, [], False, None).base_bytes()
    alloc = allocate_plan(ctx, units, ratio, base_bytes, progress)
    plan = Plan(alloc.ctx, units, alloc.routed, alloc.shared_is_base, None)
    plan.shared_left = alloc.left
    if not plan.routed:
        warnings.warn("the allocation routes no unit: the result is a static merge with routers on nothing",
                      stacklevel=3)
    return plan


def static_plan(ctx: BuildContext) -> Plan:
    """The plan of a static merge: every tensor merged."""
    return Plan(ctx, [], [], False, None)


# ---------------------------------------------------------------- the printed plan

def plan_table(plan: Plan) -> list[str]:
    routed = {ru.unit.path: ru for ru in plan.routed}
    allocated = plan.shared_left is not None
    lines = [f"{'unit':<28} {'decision':<8} {'kind':<7} {'bytes':>12}" +
             ("  " + " ".join(f"{m:>13}" for m in METRICS) if plan.metrics else "") +
             (f"  {'error merged':>12} {'left':>10} {'gain/MB':>10}  per linear (expert options)" if allocated else "")]
    for u in plan.units:
        ru = routed.get(u.path)
        row = f"{u.path:<28} {'routed' if ru else 'merged':<8} {ru.kind.name if ru else '-':<7} " \
              f"{plan.unit_extra_bytes(ru) if ru else 0:>12,}"
        if plan.metrics:
            row += "  " + " ".join(f"{plan.metrics[u.path][m]:>13.4f}" for m in METRICS)
        if allocated and ru is not None and ru.gain is not None:
            g = ru.gain
            per_mb = (g["before"] - g["after"]) / max(g["bytes"] / 1e6, 1e-9)
            row += f"  {g['before']:>12.4g} {g['after']:>10.4g} {per_mb:>10.4g}  {option_summary(plan, ru)}"
        lines.append(row)
    return lines


def option_summary(plan: Plan, ru: RoutedUnit) -> str:
    """``q_proj 8/4/16/- ...``: each routed linear's option per expert (rank, density, or the kind; - = nothing)."""
    parts = []
    for lin in ru.unit.linears:
        cells = []
        for e in range(len(plan.ctx.sources)):
            cfg = ru.cfg_for(lin, e)
            cells.append("-" if cfg is None else str(cfg.rank) if cfg.rank is not None else
                         f"{cfg.density:g}" if cfg.density is not None else "+")
        parts.append(f"{lin.name or lin.path} " + ("all" if set(cells) == {"+"} else "/".join(cells)))
    return ", ".join(parts)


def describe(plan: Plan) -> list[str]:
    """The unit table (routed builds) and the totals: what ``moerge plan`` prints before the memory estimate."""
    base, extra = plan.base_bytes(), plan.extra_bytes()
    dt = dtypes.name(plan.float_dtype)
    if plan.ctx.recipe.routing is None:
        head = [f"static merge ({plan.ctx.recipe.merge.method}) of {len(plan.ctx.sources)} experts: every tensor merged"]
    else:
        total = f"{len(plan.routed)}/{len(plan.units)} units routed; {extra:,} extra bytes; "
        head = [*plan_table(plan), total + f"{(base + extra) / base:.3f}x the base ({base:,} bytes at {dt})"]
        if plan.shared_left:
            head.append("shared weight (measured error left after the allocation, lower is better): " + "; ".join(
                f"{k}: {v:.4g}" for k, v in plan.shared_left.items()) + f" -> {plan.ctx.recipe.merge.method}" +
                (" (routed linears over the base)" if plan.shared_is_base else ""))
    out = sum(s.nbytes for s in plan.outputs())
    shards = max(1, math.ceil(out / plan.ctx.recipe.output.shard_size))
    return [*head, (f"output: {out:,} bytes of weights in about {shards} shard(s) of at most "
                   f"{plan.ctx.recipe.output.shard_size:,} bytes (routers and gates aside)")]
