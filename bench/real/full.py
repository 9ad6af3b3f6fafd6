"""The full fine-tune pool (issue 15): the methods of ``python -m bench.real.run --pool full``.

The four experts are full fine-tunes of the base (every tensor moves; ``tools/get_full_pool.py`` makes them
once into the moerge cache).  Rows:

* ``reference``: the base; each full expert alone on its task (the oracle);
* ``static``: task arithmetic at lambda 1 / 0.5 / 0.3, TIES, DARE-TIES, DELLA, breadcrumbs;
* ``peer``: mergekit-yaml TIES and mergekit-moe (hidden gates, top-2) over the full experts;
* ``moerge`` at a storage budget (1.03x / 1.05x / 1.10x the dense base): the activation-based allocation
  (``select: {budget: ..., metric: activation}``: merge or route, kind and rank per unit from the experts'
  calibration activations), the same with each output row's error weighted by the expert's answer's
  sensitivity to it (``allocate: {sensitivity: fisher}``), the weight-metric selections at the same budget (``sign_conflict`` and
  ``merge_error``, bit1 units), and a uniform twin rank over every unit with the same bytes;
* the 1.05x allocation with the router reading layer 8 / 16 / 24 of the shared model (``router.tap``);
* the moerge grid (full mode): every kind (dense, wemoe, twin ranks 2-64, bit1, sparse densities) over every
  unit, and one mixed build (imdb and tweets full fine-tunes, bbc and arith LoRA adapters);
* ``recipes/real_pool_full.yaml`` exactly as its header says.

Every routed row here has a task-arithmetic (lambda 1) shared weight, one sequence-level top-1 router, and is
scored after ``moerge calibrate --method supervised --holdout 0.2`` on the calib prompts (``-cal`` rows); the
grid also has the prototype router alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .evaluate import TASKS
from .methods import (
    REPO,
    WORK,
    Env,
    Loaded,
    Method,
    load_base_method,
    load_built,
    load_mergekit_moe,
    load_mergekit_ties,
    load_oracle,
    load_recipe_file,
    load_static,
    recipe_dict,
    tensor_shapes,
)
from .methods import full_expert as full_expert_folder

WORK_FULL = WORK.with_name(WORK.name + "_full")  # bench/_work/real_full: builds and results of this pool
TA = {"method": "task_arithmetic", "lambda": 1.0}
BUDGETS = ("1.03", "1.05", "1.10")
QUICK_BUDGET = "1.05"
RECIPE = REPO / "recipes" / "real_pool_full.yaml"
RECIPE_CALIB = REPO / "recipes" / "real_pool_calib.yaml"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def routing(select: dict, expert: dict | None = None, allocate: dict | None = None) -> dict:
    out = {"select": select, "modules": "both", "router": {"level": "sequence", "init": "prototype", "top_k": 1}}
    out.update({k: v for k, v in (("expert", expert), ("allocate", allocate)) if v})
    return out


def uniform_twin_rank(env: Env, budget: str) -> int:
    """The largest twin rank whose every-unit build stays within ``budget`` x the base (fp32, 4 experts): each
    rank costs 4 bytes x experts x (O + I) per linear; 1% of the budget's room is left to routers and headers."""
    shapes = tensor_shapes(env.base)
    per_rank = 4 * len(TASKS) * sum(s[0] + s[1] for n, s in shapes.items() if n.rsplit(".", 2)[-2] in LINEARS)
    base = 4 * sum(_numel(s) for s in shapes.values())
    return int(0.99 * (float(budget) - 1.0) * base // per_rank)


def _numel(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def budget_recipe(select: dict, expert: dict | None = None, allocate: dict | None = None) -> Callable[[Env], dict]:
    return lambda env: recipe_dict(env, TA, routing(select, expert, allocate))


def uniform_recipe(budget: str) -> Callable[[Env], dict]:
    def raw(env: Env) -> dict:
        return recipe_dict(env, TA, routing({"all": True}, {"kind": "twin", "rank": uniform_twin_rank(env, budget)}))

    return raw


def mixed_recipe(env: Env) -> dict:
    """imdb and tweets as full fine-tunes, bbc and arith as the pool's LoRA adapters, allocated at 1.05x."""
    raw = recipe_dict(env, TA, routing({"budget": "1.05x", "metric": "activation"}))
    for e in raw["experts"]:
        if e["name"] in ("bbc", "arith"):
            e["source"] = str(env.pool / "experts" / e["name"])
    return raw


def routed_methods(key: str, label: str, recipe_of: Callable[[Env], dict], quick: bool, params: dict,
                   prototype: bool = False) -> list[Method]:
    """The calibrated row (and the prototype router's, when asked) of one build."""
    cals = (False, True) if prototype else (True,)
    return [Method(f"{key}{'-cal' if cal else ''}", f"{label} / {'calibrated' if cal else 'prototype'}", "moerge",
                   load_built(key, recipe_of, cal), quick and cal, {**params, "cal": cal}) for cal in cals]


COMPARED = ("1.03", "1.05")  # budgets where the allocation meets the weight-metric selections and a uniform rank
SENSITIVITIES = {"fisher_global": "fisher row weights"}  # ("fisher": per-expert row weights, measured 12-07: no
# better than fisher_global; `--only alloc-fisher-` is not in the default grid any more, to fit the 60-minute run)


def budget_methods() -> list[Method]:
    """Per budget: the allocation (plain and fisher-weighted); at the compared budgets also the two weight-metric
    selections and the uniform twin rank of the same bytes."""
    ms: list[Method] = []
    for b in BUDGETS:
        quick = b == QUICK_BUDGET  # (the allocation at the quick budget is the recipe row's build)
        sel = {"budget": f"{b}x", "metric": "activation"}
        ms += routed_methods(f"alloc-{b}", f"moerge allocation {b}x (activation)", budget_recipe(sel), False,
                             {"sel": sel, "v": 1})
        for sens, what in SENSITIVITIES.items():
            alloc = {"sensitivity": sens}
            ms += routed_methods(f"alloc-{sens}-{b}", f"moerge allocation {b}x (activation, {what})",
                                 budget_recipe(sel, allocate=alloc), False, {"sel": sel, "allocate": alloc})
        if b not in COMPARED:
            continue
        for metric in ("sign_conflict", "merge_error"):
            sel = {"budget": f"{b}x", "metric": metric}
            ms += routed_methods(f"sel-{metric}-bit1-{b}", f"moerge {metric} selection {b}x (bit1 units)",
                                 budget_recipe(sel, {"kind": "bit1"}), False, {"sel": sel})
        ms += routed_methods(f"twin-uniform-{b}", f"moerge twin, uniform rank within {b}x, every unit",
                             uniform_recipe(b), quick, {"budget": b})
    return ms


TAPS = (8, 16, 24)  # of the base's 30 layers
TAP_BUDGETS = ("1.03", "1.05", "1.10")  # fisher-weighted allocations with a tap: run on demand (`--only tap8-fisher`)


def tap_recipe(tap: int, sel: dict, allocate: dict | None = None, head: bool = False) -> Callable[[Env], dict]:
    def raw(env: Env) -> dict:
        out = recipe_dict(env, TA, routing(sel, allocate=allocate))
        out["routing"]["router"]["tap"] = tap
        if head:
            out["routing"]["head"] = True
        return out

    return raw


def tap_methods() -> list[Method]:
    """The 1.05x allocation with its router reading layer K of the shared model (``router.tap``) instead of the
    first routed unit's input (token embeddings here: a bag of words)."""
    sel = {"budget": "1.05x", "metric": "activation"}
    return [m for k in TAPS for m in routed_methods(f"tap{k}-alloc-1.05", f"moerge allocation 1.05x, router reads "
                                                    f"layer {k}", tap_recipe(k, sel), False, {"sel": sel, "tap": k})]


def tap_fisher_methods() -> list[Method]:
    """The fisher-weighted allocation at each budget with the router reading layer 8 or 16: not in the default run
    (time); ``--only tap8-fisher tap16-fisher`` runs them."""
    alloc = {"sensitivity": "fisher_global"}
    ms: list[Method] = []
    for k in TAPS[:2]:
        for b in TAP_BUDGETS:
            sel = {"budget": f"{b}x", "metric": "activation"}
            ms += routed_methods(f"tap{k}-fisher-{b}", f"moerge allocation {b}x (fisher row weights), router reads "
                                 f"layer {k}", tap_recipe(k, sel, alloc), False,
                                 {"sel": sel, "tap": k, "allocate": alloc})
    return [replace(m, default=False) for m in ms]


def head_methods() -> list[Method]:
    """The fisher-weighted allocation with the router at layer 8 and the output head as one more candidate unit
    (``routing.head``: each expert's own head and final norm on the merged tied embedding); on demand
    (``--only head-fisher``)."""
    alloc = {"sensitivity": "fisher_global"}
    ms: list[Method] = []
    for b in TAP_BUDGETS:
        sel = {"budget": f"{b}x", "metric": "activation"}
        ms += routed_methods(f"head-fisher-{b}", f"moerge allocation {b}x (fisher row weights), router reads layer "
                             f"{TAPS[0]}, output head routable", tap_recipe(TAPS[0], sel, alloc, head=True), False,
                             {"sel": sel, "tap": TAPS[0], "allocate": alloc, "head": True})
    return [replace(m, default=False) for m in ms]


GRID_KINDS: dict[str, dict] = {
    "dense": {"kind": "dense"}, "wemoe": {"kind": "wemoe"}, "bit1": {"kind": "bit1"},
    **{f"twin{r}": {"kind": "twin", "rank": r} for r in (2, 8, 16, 64)},
    **{f"sparse{d:g}": {"kind": "sparse", "density": d} for d in (0.01, 0.1)},
}  # (twin 4 / 32 and sparse 0.03 left out of the default grid to fit the 60-minute run; the curve is monotone)


def grid_methods() -> list[Method]:
    ms: list[Method] = []
    for name, kind in GRID_KINDS.items():
        ms += routed_methods(f"grid-{name}-all", f"moerge {name} / all units", budget_recipe({"all": True}, kind),
                             False, {"kind": kind}, prototype=True)
    ms += routed_methods("mixed-alloc-1.05", "moerge allocation 1.05x, 2 full + 2 LoRA experts", mixed_recipe,
                         False, {"v": 1})
    return ms


def static_methods() -> list[Method]:
    statics = [("task_arithmetic", TA, True), ("ta0.5", {"method": "task_arithmetic", "lambda": 0.5}, False),
               ("ta0.3", {"method": "task_arithmetic", "lambda": 0.3}, False),
               ("ties", {"method": "ties", "density": 0.5, "lambda": 1.0}, True),
               ("dare_ties", {"method": "dare_ties", "density": 0.5, "lambda": 1.0}, False),
               ("della", {"method": "della", "density": 0.5, "epsilon": 0.15, "lambda": 1.0}, False),
               ("breadcrumbs", {"method": "breadcrumbs", "density": 0.9, "gamma": 0.01, "lambda": 1.0}, False)]
    return [Method(f"static-{name}", f"moerge static {merge['method']} "
                   f"({', '.join(f'{k} {v}' for k, v in merge.items() if k != 'method')})", "static",
                   load_static(merge), quick, merge, dense=True) for name, merge, quick in statics]


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS


def is_embedding(name: str) -> bool:
    """Token embeddings, the (untied) output head and the final norm: what every token passes through once."""
    return "embed" in name or name.startswith("lm_head") or name.endswith("model.norm.weight")


def static_merged_oracle(which: str) -> Callable[[Env], Loaded]:
    """Each expert alone, with its ``which`` tensors (``embeddings``: :func:`is_embedding`; ``input``: the input
    embedding only, the head keeping the expert's own; ``static``: every tensor that is not a routed linear:
    embeddings, final and per-layer norms, biases) replaced by their
    task-arithmetic (lambda 1) merge over the four experts: what merging those tensors costs when every linear is
    routed exactly (issue 15, item 3)."""
    pick = {"embeddings": is_embedding, "input": lambda n: "embed" in n}.get(which, lambda n: not is_linear(n))

    def load(env: Env) -> Loaded:
        from safetensors import safe_open

        from .methods import load_causal_lm

        t = time.perf_counter()
        folders = {task: full_expert_folder(env, task) for task in TASKS}
        merged: dict[str, torch.Tensor] = {}
        for folder in [env.base, *folders.values()]:
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as sf:
                    for name in filter(pick, sf.keys()):
                        w = sf.get_tensor(name).float()  # base: -3 x (base); experts: + each
                        merged[name] = merged.get(name, 0) + (w * (1 - len(TASKS)) if folder == env.base else w)
        current: dict[str, Any] = {}

        def model_for(task: str) -> Any:
            if task not in current:
                current.clear()
                model = load_causal_lm(folders[task])
                if which == "input":  # the head keeps the expert's own (tied) embedding: untie it first
                    head = model.get_output_embeddings()
                    head.weight = torch.nn.Parameter(head.weight.detach().clone())
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for name, w in merged.items():
                        if name in params:
                            params[name].copy_(w)
                current[task] = model
            return current[task]

        return Loaded(model_for, None, time.perf_counter() - t,
                      note=f"each expert on its task with its {which} tensors ({len(merged)}) task-arithmetic merged")

    return load


def static_tensor_methods() -> list[Method]:
    """Issue 15, item 3: what merging the non-linear tensors costs, and folding each expert's layer norms into its
    routed linears (the default) against merging them too."""
    sel = {"budget": "1.05x", "metric": "activation"}

    def nofold(env: Env) -> dict:
        out = recipe_dict(env, TA, routing(sel))
        out["routing"]["fold_norms"] = False
        return out

    return [Method(f"oracle-merged-{w}", f"expert alone, {w} tensors merged (task arithmetic)", "reference",
                   static_merged_oracle(w), False, {"which": w, "v": 1}, dense=True)
            for w in ("embeddings", "static")] + [
        replace(Method("oracle-merged-input", "expert alone, input embedding merged (task arithmetic), its own head",
                       "reference", static_merged_oracle("input"), False, {"which": "input", "v": 1}, dense=True),
                default=False)] + routed_methods(
        "alloc-nofold-1.05", "moerge allocation 1.05x, layer norms merged (not folded per expert)", nofold, False,
        {"sel": sel, "fold_norms": False})


def load_full_recipe(env: Env) -> Loaded:
    overrides = [f"experts.{i}.source={env.adapter(t)}" for i, t in enumerate(TASKS)]
    return load_recipe_file(env, RECIPE, RECIPE_CALIB, overrides)


def full_methods() -> list[Method]:
    ms = [Method("base", "base model", "reference", load_base_method, quick=True),
          Method("oracle", "full expert alone on its task (oracle)", "reference", load_oracle, quick=True, dense=True),
          *static_methods(),
          Method("mergekit-ties", "mergekit-yaml ties (density 0.5)", "peer", load_mergekit_ties, False, dense=True),
          Method("mergekit-moe", "mergekit-moe (hidden gates, top-2)", "peer", load_mergekit_moe, False)]
    ms.append(Method("recipe-real_pool_full", "recipes/real_pool_full.yaml (allocation 1.05x / calibrated)",
                     "moerge", load_full_recipe, True, {"recipe": _text(RECIPE), "calib": _text(RECIPE_CALIB)}))
    return (ms + static_tensor_methods() + budget_methods() + tap_methods() + tap_fisher_methods() + head_methods()
            + grid_methods())


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""
