"""Native transformers MoE exports (Mixtral, Qwen2-MoE, Qwen3-MoE): no remote code, servable by any engine that
knows the architecture.

Two entry points, one pipeline:

* :func:`export_from_plan` - ``moerge build`` of a recipe with ``output.format: mixtral | qwen2_moe | qwen3_moe``;
* :func:`export_checkpoint` - ``moerge export CHECKPOINT --to FORMAT OUT`` of a built moerge checkpoint.

Pipeline: jobs (:mod:`.jobs`) stream every tensor through the executor into an atomic output folder (peak memory:
one MLP linear of all experts), then the router rows are measured at the router's true input and patched into
the written gate tensors (:mod:`.gates`).  Tensor names and shapes are the ones ``save_pretrained`` writes
(:mod:`.formats`).

Design choices:

* **Attention is the static merge.**  A native format has one attention per layer, so only MLPs can be routed;
  a routed attention unit is refused with an error naming it, and the model card says attention is merged.
* **Unrouted layers.**  Qwen2-MoE / Qwen3-MoE keep them dense (``mlp_only_layers``, the static merge); Mixtral
  makes every layer MoE, so an unrouted layer gets the merged MLP as every expert and zero gate rows.
* **Qwen2-MoE shared expert = the merged MLP**, with its ``shared_expert_gate`` (Linear(C, 1), no bias) set to
  zero, i.e. a constant sigmoid(0) = 0.5.  A bias-free gate cannot be driven to 0 or 1 for every token, so the
  routed experts compensate instead: expert e is stored as the *residual* ``MLP_e(x) - 0.5 MLP_shared(x)``, an MLP
  of twice the intermediate size (``gate/up = [W_e; W_s]``, ``down = [D_e, -0.5 D_s]``).  With
  ``norm_topk_prob: true`` the block outputs ``sum_k r_k MLP_k(x)`` exactly: identical experts give the base,
  forced routing gives fine-tune t's MLP.  The price is ``moe_intermediate_size = 2 * intermediate_size``.
* **Top-k** is ``output.experts_per_token`` (clamped to the number of experts); top-k weights are renormalised
  (Mixtral always, Qwen via ``norm_topk_prob``), so top-1 of identical experts is the MLP itself.
* **Router rows** (:mod:`.gates`): prototype directions (the expert's mean minus the mean over experts, projected
  orthogonal to that mean so the missing bias is not needed), one temperature per layer fitted on the calibration
  tokens, optionally supervised calibration (``calibrate=True``).  Without calibration data the rows are zero
  (uniform routing) and a warning says so.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import RecipeError
from ..execute import execute
from ..io.atomic import atomic_output, check_output
from ..io.index import CheckpointIndex
from ..io.loader import TensorLoader
from .formats import FORMATS, NativeFormat, check_base, get_format, native_config
from .gates import collect_stats, fit_rows, fit_temperature, prototype_rows, rows_from_prototypes
from .jobs import export_jobs, patch_tensors, prefetched
from .sources import CheckpointSource, PlanSource

__all__ = ["FORMATS", "export_checkpoint", "export_from_plan"]

_SKIP = {"config.json", "README.md", "model.safetensors.index.json", "configuration_moerge.py", "modeling_moerge.py",
         "conflict.json"}
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def export_from_plan(plan: Any, out: str | Path, *, force: bool = False, progress: bool = True,
                     calibrate: bool = False) -> Path:
    """Write the routed build ``plan`` (``moerge.plan.RoutedPlan``) in the recipe's native ``output.format``."""
    recipe = plan.ctx.recipe
    file = plan.ctx.file
    fmt = get_format(recipe.output.format, file, "output.format")
    if plan.kind.name != "dense":
        raise RecipeError(file, "routing.expert.kind", f"format {fmt.name} stores full experts: the kind must be "
                                                       f"dense, not {plan.kind.name}")
    if recipe.routing.router.level != "token":
        warnings.warn(f"format {fmt.name} routes every token: the recipe's sequence-level router becomes token level",
                      stacklevel=2)
    src = PlanSource(plan)
    card = _card(fmt, src.names, f"recipe `{file}`", top_k=recipe.output.experts_per_token)
    return _export(src, fmt, Path(out), top_k=recipe.output.experts_per_token, shard_size=recipe.output.shard_size,
                   force=force, progress=progress, calibrate=calibrate, card=card,
                   extra={"moerge_recipe.yaml": recipe.to_yaml()})


def export_checkpoint(checkpoint: str | Path, to: str, out: str | Path, *, force: bool = False,
                      progress: bool = True, experts_per_token: int | None = None, calibrate: bool = False,
                      from_data: bool = False, shard_size: int = 10**9) -> Path:
    """Write a built moerge checkpoint (dense MLP experts only) as a native ``to`` checkpoint in ``out``.

    Router rows: the stored token-level prototypes converted to rows, or (sequence level, ``from_data`` or
    ``calibrate``) measured from the calibration data of the checkpoint's ``moerge_recipe.yaml``."""
    check_output(Path(out).absolute(), force, [("source checkpoint", Path(checkpoint))])
    if experts_per_token is not None and (isinstance(experts_per_token, bool) or experts_per_token < 1):
        raise RecipeError(None, "--experts-per-token", f"must be an integer >= 1, got {experts_per_token!r}")
    src = CheckpointSource(checkpoint)
    fmt = get_format(to, str(checkpoint), "--to")
    top_k = experts_per_token or src.stored_top_k() or 2
    card = _card(fmt, src.names, f"moerge checkpoint `{checkpoint}`", top_k=top_k)
    return _export(src, fmt, Path(out), top_k=top_k, shard_size=shard_size, force=force, progress=progress,
                   calibrate=calibrate, from_data=from_data, card=card)


def _export(src: Any, fmt: NativeFormat, out: Path, *, top_k: int, shard_size: int, force: bool, progress: bool,
            calibrate: bool, card: str, from_data: bool = False, extra: dict[str, str] | None = None) -> Path:
    check_base(fmt, src.base_cfg, src.base_names, src.file)
    n = len(src.names)
    if top_k > n:
        warnings.warn(f"experts_per_token {top_k} > {n} experts: using {n}", stacklevel=3)
        top_k = n
    dtype = str(src.out_dtype).replace("torch.", "")
    config = native_config(fmt, src.base_cfg, n_experts=n, top_k=top_k, routed=src.routed, dtype=dtype)
    with atomic_output(out, force) as tmp:
        execute(prefetched(export_jobs(src, fmt, n)), tmp, shard_size, progress=progress, desc=f"export {fmt.name}")
        _side_files(src.side_folder, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        rows = router_rows(src, fmt, tmp, calibrate=calibrate, from_data=from_data)
        if rows:
            patch_tensors(tmp, {fmt.router_name(i): r for i, r in rows.items()})
    return out


def _side_files(src: Path, out: Path) -> None:
    """Tokenizer, generation config and the like (never weights, remote code or the source's card)."""
    for f in src.iterdir():
        if f.is_file() and f.name not in _SKIP and not f.name.endswith(_WEIGHTS) and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)


def router_rows(src: Any, fmt: NativeFormat, folder: Path, *, calibrate: bool = False,
                from_data: bool = False) -> dict[int, torch.Tensor]:
    """Gate rows (E, C) per routed layer; {} leaves every gate at zero (uniform routing)."""
    init = src.router_init()
    if init.uniform or not src.routed:
        return {}
    if init.prototypes and not (calibrate or from_data):
        return {i: rows_from_prototypes(p) for i, p in init.prototypes.items()}
    if init.calibration is None:
        warnings.warn("some experts have no calibration data: the router rows are zero (uniform routing)",
                      stacklevel=3)
        return {}
    from transformers import AutoTokenizer

    from ..routing.data import load_texts

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [load_texts(ds, tok, file=f"experts[{e}].calibration") for e, ds in enumerate(init.calibration)]
    loader = TensorLoader(CheckpointIndex.from_folder(folder))
    n_layers = int(src.base_cfg["num_hidden_layers"])
    embed = loader.get("model.embed_tokens.weight")  # the export's float dtype: the pass computes in it
    moe = set(fmt.moe_layers(n_layers, src.routed))
    weights = layer_weights(loader, fmt, moe, int(src.base_cfg["intermediate_size"]), embed.dtype)
    stats = collect_stats(src.base_cfg, embed, weights, texts, tok, moe, sorted(src.routed))
    loader.close()
    rows = {}
    for i, st in stats.items():
        r = prototype_rows(st)
        r = r * fit_temperature(r, st)
        rows[i] = fit_rows(r, st) if calibrate else r
    return rows


def layer_weights(loader: TensorLoader, fmt: NativeFormat, moe: set[int], inter: int, dtype: torch.dtype) -> Any:
    """``(layer, expert, keys) -> state dict`` of the base's dense decoder layer, read from the export: the MLP is
    the expert's (the first half of a residual expert), everything else is stored under the base's names."""

    def get(layer: int, e: int, keys: list[str]) -> dict[str, torch.Tensor]:
        sd = {}
        for key in keys:
            lin = key.split(".")[1] if key.startswith("mlp.") else None
            if lin is not None and layer in moe:
                t = loader.get(fmt.expert_name(layer, e, lin))
                if fmt.residual_experts:
                    t = t[:, :inter] if lin == "down_proj" else t[:inter]
            else:
                t = loader.get(f"model.layers.{layer}.{key}")
            sd[key] = t.to(dtype)
        return sd

    return get


def _card(fmt: NativeFormat, names: list[str], origin: str, top_k: int) -> str:
    lines = [f"# {fmt.architecture} exported by moerge", "", f"Built from {origin}.", "", "Experts (index: name):"]
    lines += [f"- {e}: `{n}`" for e, n in enumerate(names)]
    lines += ["", f"- {top_k} experts per token; routed MLP layers hold every expert's own MLP.",
              "- **Attention is the static merge of the experts** (a native MoE has one attention per layer).",
              "- Unrouted layers hold the static merge "
              + ("(every expert of a Mixtral layer, with zero gate rows)." if fmt.every_layer_moe
                 else "as a dense MLP (`mlp_only_layers`)."),
              ]
    if fmt.shared_expert:
        lines.append("- The shared expert is the merged MLP; its gate weight is zero (sigmoid 0.5) and each routed "
                     "expert stores `MLP_e - 0.5 * MLP_shared` (twice the intermediate size), so a token routed to "
                     "expert e gets exactly `MLP_e`.")
    lines += [("- Router rows come from the experts' calibration prompts at each layer's post-attention norm output "
              "(or from a token-level moerge checkpoint's router prototypes; zero = uniform routing without data)."),
              "", "Load with plain transformers (no remote code):", "```python",
              "from transformers import AutoModelForCausalLM", "model = AutoModelForCausalLM.from_pretrained(path)",
              "```", ""]
    return "\n".join(lines)
