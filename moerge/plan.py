"""Routed builds: recipe + conflict report -> per-tensor plan (merge | route) -> executor -> MoE checkpoint.

For every candidate unit (one layer's attention or MLP) the plan decides merged or routed.  A routed
linear ``P`` is written as its shared weight ``P.weight`` (the recipe's static merge, or the base for the
``lora`` kind) followed by each expert's tensors in the kind's format (``docs/FORMAT.md``); everything else
is merged statically.  Routers go to their own small shard so calibration rewrites only that file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .analysis import cache as analysis_cache
from .analysis.conflict import METRICS, UnitStats
from .analysis.select import needs_metrics, select_units
from .arch import Family, family_for
from .build import copy_side_files, model_card, static_jobs
from .context import BuildContext
from .errors import RecipeError
from .execute import Job, execute
from .experts import KINDS, ExpertKind, KindConfig
from .io.atomic import atomic_output
from .io.index import ST_DTYPES, TORCH_TO_ST
from .io.sources import FullSource, LoraSource
from .io.writer import TensorSpec
from .recipe import Recipe

ROUTER_SHARD = "moerge_router"


@dataclass(frozen=True)
class Linear:
    name: str  # e.g. "gate_proj"
    path: str  # e.g. "model.layers.0.mlp.gate_proj"
    shape: tuple[int, int]  # (out, in)
    bias: bool


@dataclass(frozen=True)
class Unit:
    layer: int
    group: str  # "attention" | "mlp"
    path: str  # e.g. "model.layers.0.mlp"
    linears: tuple[Linear, ...]


def candidate_units(ctx: BuildContext, family: Family, modules: str) -> list[Unit]:
    groups = ("attention", "mlp") if modules == "both" else (modules,)
    n_layers = int(ctx.base.config.get("num_hidden_layers", 0))
    units = []
    for layer in range(n_layers):
        for group in groups:
            path = family.unit_path(layer, group)
            lins = tuple(Linear(lin, f"{path}.{lin}", tuple(ctx.base.index[f"{path}.{lin}.weight"].shape),
                                f"{path}.{lin}.bias" in ctx.base.index)
                         for lin in family.linears(group) if f"{path}.{lin}.weight" in ctx.base.index)
            if lins:
                units.append(Unit(layer, group, path, lins))
    return units


# ---------------------------------------------------------------- conflict analysis (streaming, unit by unit)

def unit_metrics(ctx: BuildContext, unit: Unit, density: float) -> dict[str, float]:
    stats = UnitStats(len(ctx.sources), density)
    for lin in unit.linears:
        name = f"{lin.path}.weight"
        base = ctx.base.get(name).float()
        taus = ctx.deltas(name, base)
        full = torch.stack([t if t is not None else torch.zeros_like(base) for t in taus])  # (N, out, in)
        stats.add(full, ctx.merged(name, base, taus) - base)
    return stats.metrics()


def analyze_units(ctx: BuildContext, units: list[Unit], progress: bool = True) -> dict[str, dict[str, float]]:
    """Conflict metrics of every unit; units analysed before over the same inputs come from the analysis cache
    (:mod:`moerge.analysis.cache`), the others are streamed and added to it."""
    density = ctx.params.density if ctx.method.sparsify == "magnitude" and ctx.params.density < 1 else 0.2
    folders = [ctx.base.folder, *(Path(src.path) for src in ctx.sources)]
    key = analysis_cache.inputs_key(folders, ctx.recipe.merge.model_dump(mode="json"), ctx.recipe.seed, density)
    known = analysis_cache.load(key)
    todo = [u for u in units if u.path not in known]
    for u in tqdm(todo, desc="analyze", unit="unit", disable=not progress or not todo, dynamic_ncols=True):
        known[u.path] = unit_metrics(ctx, u, density)
    if todo:
        analysis_cache.save(key, known)
    return {u.path: known[u.path] for u in units}


# ---------------------------------------------------------------- routed plan

@dataclass
class RoutedPlan:
    ctx: BuildContext
    family: Family
    kind: ExpertKind
    kind_cfg: KindConfig
    units: list[Unit]  # candidates
    routed: list[Unit]
    shared_is_base: bool
    metrics: dict[str, dict[str, float]] | None

    @property
    def float_dtype(self) -> torch.dtype:
        return self.ctx.out_dtype

    def lora_rank(self, e: int, lin: Linear) -> int | None:
        src = self.ctx.sources[e]
        if not isinstance(src, LoraSource):
            return None
        parts = src.modules.get(f"{lin.path}.weight", {})
        return src.index[parts["A"]].shape[0] if "A" in parts else 0

    def expert_shapes(self, e: int, lin: Linear) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out, in_ = lin.shape
        raw = self.kind.shapes(out, in_, self.kind_cfg, self.lora_rank(e, lin))
        shapes = {k: (tuple(s), self.float_dtype if d == "float" else getattr(torch, d)) for k, (s, d) in raw.items()}
        if lin.bias:
            shapes["bias_delta"] = ((out,), self.float_dtype)
        return shapes

    def unit_extra_bytes(self, unit: Unit) -> int:
        total = 0
        for lin in unit.linears:
            for e in range(len(self.ctx.sources)):
                for shape, dtype in self.expert_shapes(e, lin).values():
                    total += _nbytes(shape, dtype)
        return total


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * ST_DTYPES[TORCH_TO_ST[str(dtype).replace("torch.", "")]]


def make_plan(ctx: BuildContext, progress: bool = True, metrics: dict | None = None) -> RoutedPlan:
    routing = ctx.recipe.routing
    assert routing is not None
    family = family_for(ctx.base.config, str(ctx.base.folder / "config.json"))
    kind = KINDS.get(routing.expert.kind, file=ctx.file, field="routing.expert.kind")
    _check_kind(ctx, kind)
    units = candidate_units(ctx, family, routing.modules)
    shared_is_base = routing.shared == "base" or (routing.shared is None and kind.needs_lora)
    plan = RoutedPlan(ctx, family, kind, KindConfig(routing.expert.rank, routing.expert.density), units, [],
                      shared_is_base, metrics)
    if needs_metrics(routing.select) and plan.metrics is None:
        plan.metrics = analyze_units(ctx, units, progress)
    base_bytes = sum(_nbytes(tuple(i.shape), ctx.out_dtype) for i in ctx.base.index.tensors.values())
    by_path = {u.path: u for u in units}
    chosen = select_units([u.path for u in units], routing.select, plan.metrics, lambda p: by_path[p].layer,
                          lambda p: plan.unit_extra_bytes(by_path[p]), base_bytes, ctx.file)
    plan.routed = [by_path[p] for p in chosen]
    if not plan.routed:
        warnings.warn("no unit was selected for routing: the result is a static merge with routers on nothing",
                      stacklevel=2)
    return plan


def _check_kind(ctx: BuildContext, kind: ExpertKind) -> None:
    routing = ctx.recipe.routing
    assert routing is not None
    if kind.needs_lora:
        full = [s.name for s in ctx.sources if isinstance(s, FullSource)]
        if full:
            raise RecipeError(ctx.file, "routing.expert.kind", f"kind 'lora' needs LoRA experts; {', '.join(full)} "
                                                               "are full checkpoints (use twin for a low-rank version)")
    if routing.expert.rank is not None and kind.name != "twin":
        raise RecipeError(ctx.file, "routing.expert.rank", f"'rank' is a parameter of kind twin, not {kind.name}")
    if routing.expert.density is not None and kind.name != "sparse":
        raise RecipeError(ctx.file, "routing.expert.density", f"'density' is a parameter of kind sparse, not {kind.name}")


# ---------------------------------------------------------------- jobs

def routed_linear_job(plan: RoutedPlan, lin: Linear) -> Job:
    ctx, dt = plan.ctx, plan.float_dtype
    specs = [TensorSpec(f"{lin.path}.weight", lin.shape, dt)]
    if lin.bias:
        specs.append(TensorSpec(f"{lin.path}.bias", (lin.shape[0],), dt))
    for e in range(len(ctx.sources)):
        specs += [TensorSpec(f"{lin.path}.experts.{e}.{k}", s, d) for k, (s, d) in plan.expert_shapes(e, lin).items()]

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        w_s, w_experts = _shared_and_experts(plan, f"{lin.path}.weight")
        yield f"{lin.path}.weight", w_s.to(dt)
        b_s, b_experts = _shared_and_experts(plan, f"{lin.path}.bias") if lin.bias else (None, [])
        if b_s is not None:
            yield f"{lin.path}.bias", b_s.to(dt)
        for e, src in enumerate(ctx.sources):
            factors = src.lora_factors(f"{lin.path}.weight")
            for k, t in plan.kind.build(w_s, w_experts[e], factors, plan.kind_cfg).items():
                yield f"{lin.path}.experts.{e}.{k}", t.to(dt) if t.is_floating_point() else t
            if b_s is not None:
                yield f"{lin.path}.experts.{e}.bias_delta", (b_experts[e] - b_s).to(dt)

    return Job(lin.path, specs, run)


def _shared_and_experts(plan: RoutedPlan, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 shared tensor and every expert's own fp32 tensor for one routed weight or bias."""
    ctx = plan.ctx
    base = ctx.base.get(name)
    taus = ctx.deltas(name, base)
    base32 = base.float()
    experts = [src.weight(name, base).float() if isinstance(src, FullSource) else
               (base32 + t if t is not None else base32) for src, t in zip(ctx.sources, taus)]
    shared = base32 if plan.shared_is_base else ctx.merged(name, base, taus)
    return shared, experts


def router_specs(plan: RoutedPlan) -> list[TensorSpec]:
    routing = plan.ctx.recipe.routing
    assert routing is not None
    n_e, dt = len(plan.ctx.sources), plan.float_dtype
    if not plan.routed:
        return []
    prefixes = ["moerge_router"] if routing.router.level == "sequence" else [f"{u.path}.moerge_router" for u in plan.routed]
    c = int(plan.ctx.base.config["hidden_size"])
    specs = []
    for p in prefixes:
        specs += [TensorSpec(f"{p}.prototypes", (n_e, c), dt), TensorSpec(f"{p}.center", (c,), dt),
                  TensorSpec(f"{p}.scale", (), dt), TensorSpec(f"{p}.bias", (n_e,), dt)]
    return specs


def router_job(plan: RoutedPlan) -> Job:
    specs = router_specs(plan)
    scale = plan.ctx.recipe.routing.router.scale  # type: ignore[union-attr]

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        for s in specs:
            value = torch.full(s.shape, scale) if s.name.endswith(".scale") else torch.zeros(s.shape)
            yield s.name, value.to(s.dtype)

    return Job("routers", specs, run)


def plan_jobs(plan: RoutedPlan) -> list[Job]:
    routed = {lin.path: lin for u in plan.routed for lin in u.linears}
    jobs: list[Job] = []
    for job in static_jobs(plan.ctx):
        path = job.label.rsplit(".", 1)[0]
        if path not in routed:
            jobs.append(job)
        elif job.label.endswith(".weight"):
            jobs.append(routed_linear_job(plan, routed[path]))
    return jobs


# ---------------------------------------------------------------- config and plan text

def moerge_block(plan: RoutedPlan) -> dict:
    routing = plan.ctx.recipe.routing
    assert routing is not None
    router = routing.router
    units = {}
    for u in plan.routed:
        lins = {}
        for lin in u.linears:
            experts = [{k: list(s) for k, (s, _) in plan.expert_shapes(e, lin).items()}
                       for e in range(len(plan.ctx.sources))]
            lins[lin.name] = {"bias": lin.bias, "experts": experts}
        units[u.path] = {"kind": plan.kind.name, "linears": lins}
    return {
        "version": 1,
        "experts": plan.ctx.names,
        "level": router.level,
        "top_k": router.top_k if router.top_k is not None else (1 if router.level == "sequence" else None),
        "router_input": plan.routed[0].path if plan.routed else None,
        "initialized": False,
        "fallback": None,
        "shared": "base" if plan.shared_is_base else "merge",
        "units": units,
    }


def moerge_config(plan: RoutedPlan) -> dict:
    base_cfg = dict(plan.ctx.base.config)
    base_cfg["dtype"] = str(plan.float_dtype).replace("torch.", "")
    base_cfg.pop("torch_dtype", None)
    from .modeling import auto_map

    return {
        "model_type": "moerge",
        "architectures": ["MoergeForCausalLM"],
        "auto_map": auto_map(),
        "base_config": base_cfg,
        "moerge": moerge_block(plan),
        "tie_word_embeddings": plan.ctx.base.tied,
        "dtype": base_cfg["dtype"],
    }


def plan_text(recipe: Recipe, file: str | None = None) -> str:
    ctx = BuildContext.open(recipe, file)
    if recipe.routing is None:
        return f"static merge ({recipe.merge.method}) of {len(ctx.sources)} experts: every tensor merged"
    plan = make_plan(ctx, progress=False)
    routed = {u.path for u in plan.routed}
    lines = [f"{'unit':<28} {'decision':<8} {'kind':<7} {'bytes':>12}" +
             ("  " + " ".join(f"{m:>13}" for m in METRICS) if plan.metrics else "")]
    for u in plan.units:
        is_r = u.path in routed
        row = f"{u.path:<28} {'routed' if is_r else 'merged':<8} {plan.kind.name if is_r else '-':<7} " \
              f"{plan.unit_extra_bytes(u) if is_r else 0:>12,}"
        if plan.metrics:
            row += "  " + " ".join(f"{plan.metrics[u.path][m]:>13.4f}" for m in METRICS)
        lines.append(row)
    base = sum(_nbytes(tuple(i.shape), ctx.out_dtype) for i in ctx.base.index.tensors.values())
    extra = sum(plan.unit_extra_bytes(u) for u in plan.routed)
    lines.append(f"{len(plan.routed)}/{len(plan.units)} units routed; {extra:,} extra bytes; "
                 f"{(base + extra) / base:.3f}x the base ({base:,} bytes at {str(ctx.out_dtype).replace('torch.', '')})")
    return "\n".join(lines)


# ---------------------------------------------------------------- build

def build_routed(ctx: BuildContext, out: Path, *, force: bool = False, progress: bool = True) -> Path:
    recipe = ctx.recipe
    if recipe.routing is None:
        raise RecipeError(ctx.file, "output.format", f"format {recipe.output.format} needs a routing section")
    plan = make_plan(ctx, progress)
    if recipe.output.format != "moerge":
        from .export import export_from_plan

        return export_from_plan(plan, out, force=force, progress=progress)
    with atomic_output(out, force) as tmp:
        execute(plan_jobs(plan), tmp, recipe.output.shard_size, progress=progress, desc="build")
        if plan.routed:
            execute([router_job(plan)], tmp, recipe.output.shard_size, progress=False, prefix=ROUTER_SHARD)
        finalize_folder(plan, tmp)
        if plan.routed and recipe.routing.router.init == "prototype":  # type: ignore[union-attr]
            from .routing.prototype import init_prototypes

            init_prototypes(tmp, recipe, progress=progress)
    return out


def finalize_folder(plan: RoutedPlan, folder: Path) -> None:
    """Index (weights + router shard), config, remote code, side files, card, recipe."""
    from .modeling import write_remote_code

    _merge_router_into_index(folder)
    copy_side_files(plan.ctx.base.folder, folder)
    (folder / "config.json").write_text(json.dumps(moerge_config(plan), indent=2) + "\n")
    write_remote_code(folder)
    (folder / "README.md").write_text(model_card(plan.ctx.recipe, "Mixture-of-Experts model"))
    (folder / "moerge_recipe.yaml").write_text(plan.ctx.recipe.to_yaml())
    if plan.metrics:
        (folder / "conflict.json").write_text(json.dumps(plan.metrics, indent=2) + "\n")


def _merge_router_into_index(folder: Path) -> None:
    from .io.index import read_safetensors_header

    router = folder / f"{ROUTER_SHARD}.safetensors"
    if not router.exists():
        return
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # transformers ignores an index when model.safetensors exists: give the one shard an indexed name
        single = folder / "model-00001-of-00001.safetensors"
        (folder / "model.safetensors").rename(single)
        index = {"metadata": {"total_size": 0}, "weight_map": {n: single.name for n in read_safetensors_header(single)}}
    for name in read_safetensors_header(router):
        index["weight_map"][name] = router.name
    total = sum(i.nbytes for f in set(index["weight_map"].values()) for i in read_safetensors_header(folder / f).values())
    index["metadata"]["total_size"] = total
    index_path.write_text(json.dumps(index, indent=2) + "\n")
