"""The moerge output writer: plan -> jobs -> executor -> routers -> index, config and side files.

Every file is written once, in this order, into the build's temporary folder (renamed into place by
:func:`moerge.io.atomic.atomic_output`): the weight shards; for a routed build the routers, computed from
those shards (:mod:`moerge.routing.prototype`) and written as their own shard; the index over all shards;
``config.json`` (the base's config for a static merge, the moerge config with its manifest for a routed
one); the base's side files, the remote code, the model card and the resolved recipe.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from .. import dtypes
from ..checkpoint import names
from ..checkpoint.index import write_index
from ..checkpoint.manifest import Manifest
from ..checkpoint.routers import RouterTensors, uniform_router, write_router_shard
from ..modeling import auto_map, write_remote_code
from ..recipe import Recipe
from ..routing.prototype import feature_model, prototype_routers
from .execute import execute
from .jobs import plan_jobs
from .plan import Plan


def copy_side_files(base: Path, out: Path) -> None:
    """Tokenizer, generation config and other small files of the base (never weights, never its README)."""
    for f in base.iterdir():
        if f.is_file() and names.is_side_file(f.name):
            shutil.copy2(f, out / f.name)


def static_config(plan: Plan) -> dict[str, Any]:
    config = dict(plan.ctx.base.config)
    config["dtype"] = dtypes.name(plan.float_dtype)
    config.pop("torch_dtype", None)
    return config


def moerge_config(plan: Plan, manifest: Manifest) -> dict[str, Any]:
    base_cfg = static_config(plan)
    return {"model_type": "moerge", "architectures": ["MoergeForCausalLM"], "auto_map": auto_map(),
            "base_config": base_cfg, "moerge": manifest.to_dict(), "tie_word_embeddings": plan.ctx.base.tied,
            "dtype": base_cfg["dtype"]}


def model_card(recipe: Recipe, kind: str) -> str:
    lines = [f"# {kind} built with moerge", "", f"Base: `{recipe.base}`", "", "Experts:"]
    lines += [f"- `{e.name}`: `{e.source}`" for e in recipe.experts]
    lines += ["", f"Static merge: `{recipe.merge.method}`"]
    if recipe.routing:
        r = recipe.routing
        lines += [f"Routed: {r.modules} units, kind `{r.expert.kind}`, router level `{r.router.level}`"]
    lines += ["", "Load with:", "```python", "import moerge  # or pass trust_remote_code=True",
              "from transformers import AutoModelForCausalLM", "model = AutoModelForCausalLM.from_pretrained(path)",
              "```", "", "The exact recipe is in `moerge_recipe.yaml`.", ""]
    return "\n".join(lines)


def initial_routers(plan: Plan, weights: list[Path], progress: bool) -> tuple[dict[str, RouterTensors], bool]:
    """The routers to write and whether they are initialised (prototypes need every expert's data)."""
    recipe = plan.ctx.recipe
    router = recipe.routing.router  # type: ignore[union-attr]
    uninit = plan.manifest(initialized=False)
    missing = [e.name for e in recipe.experts if e.calibration is None]
    if router.init == "uniform" or missing:
        if router.init != "uniform":
            warnings.warn(f"experts {', '.join(missing)} have no calibration data: the router stays uniform",
                          stacklevel=3)
        return {p: uniform_router(len(plan.ctx.sources), int(plan.ctx.base.config["hidden_size"]), router.scale)
                for p in uninit.router_prefixes()}, False

    model = feature_model(moerge_config(plan, uninit), uninit, weights)
    tok = plan.ctx.tokenizer()
    calibration = [e.calibration for e in recipe.experts]
    return prototype_routers(model, tok, uninit, calibration, router.scale), True  # type: ignore[arg-type]


def write_moerge(plan: Plan, tmp: Path, *, progress: bool = True) -> None:
    """A static merge or a routed moerge checkpoint of ``plan`` into the empty folder ``tmp``."""
    recipe, routed = plan.ctx.recipe, bool(plan.routed)
    plan.ctx.scratch = tmp  # big routed linears keep W_s in a scratch file there (unlinked at once)
    files = execute(plan_jobs(plan), tmp, recipe.output.shard_size, progress=progress,
                    desc="build" if recipe.routing else "merge", indexed=routed)
    order: dict[str, list[str]] = {}
    if recipe.routing is not None:
        routers, initialized = initial_routers(plan, files, progress) if routed else ({}, False)
        if routed:
            order[names.ROUTER_SHARD] = write_router_shard(tmp / names.ROUTER_SHARD, routers, plan.float_dtype)
            files.append(tmp / names.ROUTER_SHARD)
        config = moerge_config(plan, plan.manifest(initialized))
    else:
        config = static_config(plan)
    write_index(tmp, files, order)
    copy_side_files(plan.ctx.base.folder, tmp)
    (tmp / names.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if recipe.routing is not None:
        write_remote_code(tmp)
    (tmp / names.CARD).write_text(model_card(recipe, "Mixture-of-Experts model" if recipe.routing else "Merged model"))
    (tmp / names.RECIPE).write_text(recipe.to_yaml())
    if plan.metrics:
        (tmp / names.CONFLICT).write_text(json.dumps(plan.metrics, indent=2) + "\n")
