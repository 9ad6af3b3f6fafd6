"""``moerge.build``: recipe -> checkpoint folder (static merge, or routed MoE when the recipe has ``routing``).

Static merges keep the base's architecture and tensor names; every tensor is one job
(load base + expert task vectors -> merge -> cast -> write).  Routed builds are planned in
:mod:`moerge.plan`.  Output is atomic: a temporary folder beside the target, renamed at the end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from .context import BuildContext
from .dtypes import BY_ST
from .execute import Job, execute, plan_workers
from .io.atomic import atomic_output, check_output
from .io.writer import TensorSpec
from .recipe import Recipe

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", "config.json"}


def static_jobs(ctx: BuildContext) -> list[Job]:
    jobs = []
    for name in ctx.base.names:
        info = ctx.base.index[name]
        floating = info.mergeable  # ints, bools, 8-bit floats are copied as stored (moerge.dtypes)
        dtype = ctx.out_dtype if floating else BY_ST[info.dtype].torch

        def run(name: str = name, dtype: torch.dtype = dtype, floating: bool = floating) -> Iterator[tuple[str, torch.Tensor]]:
            base = ctx.base.get(name)
            if not floating:
                yield name, base
                return
            yield name, ctx.merged(name, base, ctx.deltas(name, base)).to(dtype)

        jobs.append(Job(name, [TensorSpec(name, tuple(info.shape), dtype)], run))
    return jobs


def copy_side_files(base: Path, out: Path) -> None:
    """Tokenizer, generation config and other small files of the base (never weights, never its README)."""
    for f in base.iterdir():
        if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)


def write_config(ctx: BuildContext, out: Path) -> None:
    config = dict(ctx.base.config)
    config["dtype"] = str(ctx.out_dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


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


def build(recipe: Recipe, out: str | Path, *, force: bool = False, progress: bool = True, file: str | None = None) -> Path:
    """Build the checkpoint described by ``recipe`` into ``out`` (atomically); returns ``out``."""
    from .preflight import preflight, recipe_inputs

    out = Path(out)
    check_output(out.absolute(), force, recipe_inputs(recipe))
    ctx = preflight(recipe, file)  # every input opened and checked before any tensor is computed
    if recipe.routing is not None or recipe.output.format != "moerge":
        from .plan import build_routed

        return build_routed(ctx, out, force=force, progress=progress)
    with atomic_output(out, force) as tmp:
        jobs = static_jobs(ctx)
        execute(jobs, tmp, recipe.output.shard_size, progress=progress, desc="merge", workers=plan_workers(jobs))
        copy_side_files(ctx.base.folder, tmp)
        write_config(ctx, tmp)
        (tmp / "README.md").write_text(model_card(recipe, "Merged model"))
        (tmp / "moerge_recipe.yaml").write_text(recipe.to_yaml())
    return out
