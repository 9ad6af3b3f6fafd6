"""The build pipeline, one way through:

    recipe -> context (inputs opened, checked) -> analysis (when the selection needs it) -> plan (what every
    output tensor is, with its bytes) -> jobs -> executor -> writer -> finish (routers, index, config, files)

``context`` opens the inputs (:mod:`.context`), ``analyze`` streams the conflict metrics (:mod:`.analyze`),
``plan`` decides merge or route per unit (:mod:`.plan`), ``jobs`` compute tensors (:mod:`.jobs`), ``execute``
runs them into the sharded writer (:mod:`.execute`); the output format picks the writer at the end: a moerge
folder, static or routed (:mod:`.output`), or a native MoE (:mod:`moerge.export`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..analysis.report import gain_plot
from ..analysis.select import ACTIVATION
from ..export import export_from_plan
from ..io.atomic import atomic_output, check_output
from ..recipe import Recipe
from .analyze import analyze_recipe
from .context import BuildContext
from .memory import estimate
from .output import write_moerge
from .plan import Plan, describe, make_plan, static_plan
from .preflight import preflight, recipe_inputs


def plan_for(recipe: Recipe, file: str | None = None, *, progress: bool = True,
             device: str | torch.device | None = "auto") -> Plan:
    """Open and check every input (:func:`.preflight.preflight`: nothing computed), then plan the build (the
    conflict analysis runs here when the selection needs it)."""
    ctx = preflight(recipe, file, device)
    return make_plan(ctx, progress) if recipe.routing is not None else static_plan(ctx)


def build(recipe: Recipe, out: str | Path, *, force: bool = False, progress: bool = True, file: str | None = None,
          device: str | torch.device | None = "auto") -> Path:
    """Build the checkpoint described by ``recipe`` into ``out`` (atomically); returns ``out``."""
    out = Path(out)
    inputs = recipe_inputs(recipe)
    check_output(out.absolute(), force, inputs)
    plan = plan_for(recipe, file, progress=progress, device=device)
    if recipe.output.format != "moerge":
        return export_from_plan(plan, out, force=force, progress=progress, inputs=inputs)
    with atomic_output(out, force, inputs) as tmp:
        write_moerge(plan, tmp, progress=progress)
    return out


def plan_text(recipe: Recipe, file: str | None = None, device: str | torch.device | None = "auto") -> str:
    """What ``moerge plan`` prints: the plan, the output's bytes and a peak-memory estimate."""
    plan = plan_for(recipe, file, progress=False, device=device)
    return "\n".join([*describe(plan), estimate(plan).describe()])


def analyze_text(recipe: Recipe, out: Path | None = None, *, file: str | None = None, progress: bool = True,
                 device: str | torch.device | None = "auto") -> str:
    """``moerge analyze``: the conflict metrics (:func:`.analyze.analyze_recipe`); for a recipe that allocates by
    activations (``select.metric: activation``) also the measured gain per unit (``allocation.json`` and
    ``allocation.png`` with ``out``)."""
    text = analyze_recipe(recipe, out, file=file, progress=progress, device=device)
    routing = recipe.routing
    if routing is None or routing.select.metric != ACTIVATION:
        return text
    plan = plan_for(recipe, file, progress=progress, device=device)
    rows = [{"unit": ru.unit.path, "layer": ru.unit.layer, "group": ru.unit.group, "kind": ru.kind.name,
             **(ru.gain or {})} for ru in plan.routed]
    text += "\n\n" + "\n".join(describe(plan)[:-1])
    if out is not None:
        (out / "allocation.json").write_text(json.dumps({"units": rows, "shared": plan.shared_left}, indent=2) + "\n")
        text += f"\nwrote {out / 'allocation.json'} and {gain_plot(rows, out / 'allocation.png')}"
    return text


__all__ = ["BuildContext", "Plan", "analyze_text", "build", "make_plan", "plan_for", "plan_text"]
