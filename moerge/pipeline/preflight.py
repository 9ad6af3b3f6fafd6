"""Everything a build can check without computing a tensor: what ``moerge validate`` runs, and the first thing
every ``moerge build`` does, so that a bad input fails in seconds instead of after hours of writing.

:func:`preflight` opens and checks, in order:

1. the recipe's merge parameters, the base and every expert (configs, every safetensors header, tensor names,
   shapes and dtypes against the base, LoRA configs): :meth:`moerge.pipeline.context.BuildContext.open`;
2. the routing section: the expert kind and its parameters, the selection metric and layers, ``top_k`` against
   the number of experts, and a native ``output.format`` against the base and the routed modules;
3. every calibration source: the file read, every row read and templated with the base's tokenizer;
4. experts identical to the base (same weight files, or a LoRA adapter whose ``lora_B`` are all zero) are
   reported in a warning: their task vector is zero.

:func:`recipe_inputs` lists what a build reads (recipe, base, experts, local data files): an output must never
be, contain or lie inside one of them (:func:`moerge.io.atomic.check_inputs`).
"""

from __future__ import annotations

import filecmp
import warnings
from pathlib import Path
from typing import Any

import torch

from ..analysis.conflict import METRICS
from ..analysis.select import ACTIVATION
from ..errors import CheckpointError, RecipeError
from ..export.formats import check_base, get_format, routed_layers
from ..io.index import CheckpointIndex
from ..io.sources import FullSource, LoraSource
from ..recipe import Recipe
from ..routing.data import load_texts
from .context import BuildContext
from .plan import check_tap, kind_of
from .units import candidate_units


def preflight(recipe: Recipe, file: str | None = None, device: str | torch.device | None = "cpu") -> BuildContext:
    """Open and check every input of ``recipe``; returns the opened context (no tensor computed)."""
    ctx = BuildContext.open(recipe, file, device)
    check_routing(ctx)
    check_calibration(ctx)
    warn_identical(ctx)
    return ctx


def recipe_inputs(recipe: Recipe) -> list[tuple[str, Path]]:
    """(what, path) of every local file or folder a build of ``recipe`` reads."""
    out = [("recipe", Path(recipe.file))] if Path(recipe.file).is_file() else []
    out.append(("base", recipe.base))
    for e in recipe.experts:
        out.append((f"expert '{e.name}'", e.source))
        if e.calibration is not None and Path(e.calibration.data).exists():
            out.append((f"calibration data of '{e.name}'", Path(e.calibration.data)))
    return out


# ---------------------------------------------------------------- routing and output format

def check_routing(ctx: BuildContext) -> None:
    """What :func:`moerge.pipeline.plan.make_plan` and the native exporters would refuse, from the recipe and
    headers."""
    recipe, file = ctx.recipe, ctx.file
    routing = recipe.routing
    if routing is None:
        if recipe.output.format != "moerge":
            raise RecipeError(file, "output.format", f"format {recipe.output.format} needs a routing section")
        return
    if routing.select.metric == ACTIVATION:
        check_allocation(ctx)
    kind, _ = kind_of(ctx)
    if routing.select.metric not in (*METRICS, ACTIVATION):
        raise RecipeError(file, "routing.select.metric", f"unknown metric '{routing.select.metric}'; one of: "
                                                         f"{', '.join(METRICS)}, {ACTIVATION} (with a budget)")
    check_tap(ctx)
    n_layers = ctx.n_layers
    bad = [i for i in routing.select.layers or [] if i >= n_layers]
    if bad:
        raise RecipeError(file, "routing.select.layers", f"layers {bad} out of range 0..{n_layers - 1}")
    top_k, n = routing.router.top_k, len(ctx.sources)
    if top_k is not None and top_k > n:
        raise RecipeError(file, "routing.router.top_k", f"top_k {top_k} is more than the {n} experts")
    if recipe.output.format != "moerge":
        units = candidate_units(ctx.base.index, n_layers, ctx.family, routing.modules)
        check_native(ctx, kind.name, [u.path for u in units])


def check_allocation(ctx: BuildContext) -> None:
    """``select.metric: activation``: a budget, calibration prompts for every expert, the moerge format."""
    routing, file = ctx.recipe.routing, ctx.file
    assert routing is not None
    if routing.select.budget is None:
        raise RecipeError(file, "routing.select", f"metric '{ACTIVATION}' chooses within a storage budget: set "
                                                  "routing.select.budget (e.g. 1.05x)")
    missing = [e.name for e in ctx.recipe.experts if e.calibration is None]
    if missing:
        raise RecipeError(file, "experts", f"metric '{ACTIVATION}' measures each expert on its calibration prompts; "
                                           f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} none")
    if ctx.recipe.output.format != "moerge":
        raise RecipeError(file, "output.format", f"metric '{ACTIVATION}' mixes kinds per unit: only the moerge "
                                                 "format stores that")


def check_native(ctx: BuildContext, kind: str, units: list[str]) -> None:
    fmt = get_format(ctx.recipe.output.format, ctx.file, "output.format")
    if kind != "dense":
        raise RecipeError(ctx.file, "routing.expert.kind", f"format {fmt.name} stores full experts: the kind must be "
                                                           f"dense, not {kind}")
    check_base(fmt, ctx.base.config, set(ctx.base.names), ctx.file)
    routed_layers(units, ctx.file, "routing.modules")


# ---------------------------------------------------------------- calibration data

def check_calibration(ctx: BuildContext) -> None:
    """Read and template every expert's calibration source, as the router initialisation will."""
    sources = [(i, e.calibration) for i, e in enumerate(ctx.recipe.experts) if e.calibration is not None]
    if not sources:
        return
    tok = base_tokenizer(ctx.base.folder)
    for _, source in sources:
        load_texts(source, tok, file=ctx.file)


def base_tokenizer(folder: Path) -> Any:
    """The base's tokenizer (what a built checkpoint carries), never running code from the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types: all mean "no usable tokenizer"
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(folder, None, f"cannot load the tokenizer ({type(exc).__name__}: {detail})") from None


# ---------------------------------------------------------------- experts that change nothing

def warn_identical(ctx: BuildContext) -> None:
    for src in ctx.sources:
        if isinstance(src, FullSource) and same_weights(ctx.base.index, src.model.index):
            warnings.warn(f"expert '{src.name}' ({src.path}) has the same weights as the base: its task vector is "
                          "zero", stacklevel=2)
        elif isinstance(src, LoraSource) and lora_is_zero(src):
            warnings.warn(f"expert '{src.name}' ({src.path}) is a LoRA adapter whose lora_B are all zero: it changes "
                          "nothing (an untrained adapter?)", stacklevel=2)


FULL_COMPARE = 1 << 30  # weight files up to this size (all shards together) are compared byte by byte
_WINDOW, _WINDOWS = 1 << 16, 64  # above it: the header, 64 windows of 64 KiB spread over each shard, and its end


def same_weights(a: CheckpointIndex, b: CheckpointIndex) -> bool:
    """Whether two safetensors checkpoints hold identical weight files: byte by byte up to :data:`FULL_COMPARE`
    bytes (stops at the first difference); above, the same sizes and the same bytes at spread windows (a 70B
    checkpoint is not read twice for a warning, and a fine-tune differs from its base nearly everywhere)."""
    if a.format != "safetensors" or b.format != "safetensors" or set(a.tensors) != set(b.tensors):
        return False
    files_a = sorted({t.file for t in a.tensors.values()}, key=lambda p: p.name)
    files_b = sorted({t.file for t in b.tensors.values()}, key=lambda p: p.name)
    if len(files_a) != len(files_b):
        return False
    try:
        sizes = [x.stat().st_size for x in files_a]
        if sizes != [y.stat().st_size for y in files_b]:
            return False
        whole = sum(sizes) <= FULL_COMPARE
        return all(filecmp.cmp(x, y, shallow=False) if whole else _same_windows(x, y, size)
                   for x, y, size in zip(files_a, files_b, sizes))
    except OSError:
        return False


def _same_windows(x: Path, y: Path, size: int) -> bool:
    starts = sorted({0, max(0, size - _WINDOW), *(i * size // _WINDOWS for i in range(_WINDOWS))})
    with open(x, "rb") as fx, open(y, "rb") as fy:
        for start in starts:
            fx.seek(start)
            fy.seek(start)
            if fx.read(_WINDOW) != fy.read(_WINDOW):
                return False
    return True


def lora_is_zero(src: LoraSource) -> bool:
    """Every ``lora_B`` (and lora bias) is zero and no full module is saved: the adapter is the identity."""
    if any("full" in parts for parts in src.modules.values()):
        return False
    keys = [parts[k] for parts in src.modules.values() for k in ("B", "EB", "bias") if k in parts]
    return bool(keys) and not any(bool(src.loader.get(k).any()) for k in keys)
