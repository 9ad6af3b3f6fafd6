"""Native transformers MoE exports (Mixtral, Qwen2-MoE, Qwen3-MoE): no remote code, servable by any engine that
knows the architecture.

Two entry points, one pipeline:

* :func:`export_from_plan` - ``moerge build`` of a recipe with ``output.format: mixtral | qwen2_moe | qwen3_moe``;
* :func:`export_checkpoint` - ``moerge export CHECKPOINT --to FORMAT OUT`` of a built moerge checkpoint (dense
  experts; with ``--materialize`` any kind, written as ``W_s + Δ_e``, :mod:`.materialize`), followed by the
  logit comparison with the checkpoint, ``export_report.json`` (:mod:`.report`).

Pipeline (the writer at the end of :mod:`moerge.pipeline` for native formats): jobs (:mod:`.jobs`) stream every
weight through the executor into an atomic output folder (peak memory: one MLP linear of all experts); the router
rows are then measured at the router's true input on those written weights (:mod:`.gates`) and written once, in
the last shard; the index comes last.  Tensor names and shapes are the ones ``save_pretrained`` writes
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
* **Always untied.**  A tied base's embedding is written again as ``lm_head.weight`` and the config says
  ``tie_word_embeddings: false``: SGLang's Mixtral / Qwen2-MoE / Qwen3-MoE classes never tie the head (vLLM's
  do), so a tied export would serve an uninitialised head there (``tests/serving_engines.py`` has the rules).
* **Engines.**  The names and shapes are checked against vLLM's and SGLang's loaders for these classes
  (``tests/test_serving_names.py``).  SGLang's Qwen3-MoE ignores ``mlp_only_layers`` (every layer is MoE), so a
  Qwen3-MoE export with dense layers warns: route every layer to serve it there.
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
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import dtypes
from ..arch import FAMILIES
from ..checkpoint import names
from ..checkpoint.index import write_index
from ..errors import RecipeError
from ..io.atomic import Inputs, atomic_output, check_output
from ..io.index import CheckpointIndex
from ..io.loader import TensorLoader
from ..io.writer import ShardedWriter
from ..pipeline.execute import Job, run_jobs
from ..pipeline.plan import Plan
from ..routing.data import load_texts
from .formats import FORMATS, NativeFormat, check_base, get_format, native_config
from .gates import collect_stats, fit_rows, fit_temperature, prototype_rows, rows_from_prototypes
from .inputs import CheckpointInput, PlanInput
from .jobs import export_jobs, gate_specs
from .materialize import MaterializedInput
from .report import REPORT_FILE, logit_report

__all__ = ["FORMATS", "REPORT_FILE", "export_checkpoint", "export_from_plan"]
LLAMA = FAMILIES["llama"]  # the layout native targets keep outside their MoE blocks (:mod:`moerge.arch.native`)

def export_from_plan(plan: Plan, out: str | Path, *, force: bool = False, progress: bool = True,
                     calibrate: bool = False, inputs: Inputs = ()) -> Path:
    """Write the routed build ``plan`` in the recipe's native ``output.format``."""
    recipe = plan.ctx.recipe
    file = plan.ctx.file
    fmt = get_format(recipe.output.format, file, "output.format")
    if recipe.routing is None:
        raise RecipeError(file, "output.format", f"format {recipe.output.format} needs a routing section")
    kinds = sorted({ru.kind.name for ru in plan.routed} - {"dense"})
    if kinds or recipe.routing.expert.kind != "dense":
        kind = kinds[0] if kinds else recipe.routing.expert.kind
        raise RecipeError(file, "routing.expert.kind", f"format {fmt.name} stores full experts: the kind must be "
                                                       f"dense, not {kind}")
    if recipe.routing.router.level != "token":
        warnings.warn(f"format {fmt.name} routes every token: the recipe's sequence-level router becomes token level",
                      stacklevel=2)
    src = PlanInput(plan)
    card = _card(fmt, src.names, f"recipe `{file}`", top_k=recipe.output.experts_per_token)
    return _export(src, fmt, Path(out), top_k=recipe.output.experts_per_token, shard_size=recipe.output.shard_size,
                   force=force, progress=progress, calibrate=calibrate, card=card,
                   extra={"moerge_recipe.yaml": recipe.to_yaml()}, inputs=inputs)


def export_checkpoint(checkpoint: str | Path, to: str, out: str | Path, *, force: bool = False,
                      progress: bool = True, experts_per_token: int | None = None, calibrate: bool = False,
                      from_data: bool = False, shard_size: int = 10**9, materialize: bool = False,
                      report: bool = True, device: str | torch.device | None = "auto") -> Path:
    """Write a built moerge checkpoint as a native ``to`` checkpoint in ``out``.

    Routed units must be MLPs without bias deltas; their experts must be dense unless ``materialize`` (then every
    kind is written as the dense ``W_s + Δ_e``, :mod:`.materialize`).  Router rows: the stored token-level
    prototypes converted to rows, or (sequence level, ``from_data`` or ``calibrate``) measured from the calibration
    data of the checkpoint's ``moerge_recipe.yaml``.  ``report``: compare the export with the checkpoint, expert by
    expert, and write ``export_report.json`` (:mod:`.report`)."""
    check_output(Path(out).absolute(), force, [("source checkpoint", Path(checkpoint))])
    if experts_per_token is not None and (isinstance(experts_per_token, bool) or experts_per_token < 1):
        raise RecipeError(None, "--experts-per-token", f"must be an integer >= 1, got {experts_per_token!r}")
    src = (MaterializedInput if materialize else CheckpointInput)(checkpoint, device)
    fmt = get_format(to, str(checkpoint), "--to")
    top_k = experts_per_token or src.stored_top_k() or 2
    kinds = {unit: spec.kind for unit, spec in src.manifest.units.items()}
    card = _card(fmt, src.names, f"moerge checkpoint `{checkpoint}`", top_k=top_k, kinds=kinds)
    info = {"checkpoint": str(checkpoint), "format": fmt.name, "materialized": materialize, "kinds": kinds,
            "stored_dtype": str(src.out_dtype).replace("torch.", "")}
    vocab = int(src.base_cfg["vocab_size"])

    def finish(tmp: Path) -> None:
        rep = logit_report(Path(checkpoint), tmp, src.names, vocab, info, progress=progress)
        (tmp / REPORT_FILE).write_text(json.dumps(rep, indent=2) + "\n")

    return _export(src, fmt, Path(out), top_k=top_k, shard_size=shard_size, force=force, progress=progress,
                   calibrate=calibrate, from_data=from_data, card=card, finish=finish if report else None,
                   inputs=[("source checkpoint", Path(checkpoint))])


def _export(src: Any, fmt: NativeFormat, out: Path, *, top_k: int, shard_size: int, force: bool, progress: bool,
            calibrate: bool, card: str, from_data: bool = False, extra: dict[str, str] | None = None,
            finish: Callable[[Path], None] | None = None, inputs: Inputs = ()) -> Path:
    check_base(fmt, src.base_cfg, src.base_names, src.file)
    n = len(src.names)
    if top_k > n:
        warnings.warn(f"experts_per_token {top_k} > {n} experts: using {n}", stacklevel=3)
        top_k = n
    config = native_config(fmt, src.base_cfg, n_experts=n, top_k=top_k, routed=src.routed,
                           dtype=dtypes.name(src.out_dtype))
    _warn_engines(fmt, config)
    with atomic_output(out, force, inputs) as tmp:
        files = write_tensors(src, fmt, tmp, shard_size, progress=progress, calibrate=calibrate, from_data=from_data)
        write_index(tmp, files)
        _side_files(src.side_folder, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if finish is not None:
            finish(tmp)
    return out


def write_tensors(src: Any, fmt: NativeFormat, tmp: Path, shard_size: int, *, progress: bool, calibrate: bool,
                  from_data: bool) -> list[Path]:
    """The weights, then the gate rows measured on them (own shard): every tensor written once."""
    n, hidden = len(src.names), int(src.base_cfg["hidden_size"])
    jobs = export_jobs(src, fmt, n)
    jobs += untied_head(jobs)
    gates = gate_specs(fmt, fmt.moe_layers(int(src.base_cfg["num_hidden_layers"]), src.routed), n, hidden,
                       src.out_dtype)
    writer = ShardedWriter(tmp, [s for job in jobs for s in job.specs] + gates, shard_size, indexed=True,
                           breaks=frozenset(g.name for g in gates[:1]))
    run_jobs(jobs, writer, progress=progress, desc=f"export {fmt.name}")
    reader = TensorLoader(CheckpointIndex.from_files(tmp, writer.closed_files()))
    rows = router_rows(src, fmt, reader, calibrate=calibrate, from_data=from_data)
    reader.close()
    values = {g.name: rows[i] for i, g in _gate_layers(fmt, gates) if i in rows}

    def run() -> Any:
        for g in gates:
            yield g.name, values.get(g.name, torch.zeros(g.shape)).to(g.dtype)

    run_jobs([Job("gates", gates, run)], writer, progress=False, workers=1)
    return writer.finish()


def untied_head(jobs: list[Job]) -> list[Job]:
    """A tied base's ``lm_head.weight``: the exported embedding written a second time (the config says untied),
    because SGLang's Mixtral / Qwen2-MoE / Qwen3-MoE classes never tie it and would leave it uninitialised."""
    if any(job.label == LLAMA.lm_head for job in jobs):
        return []
    embed = next(job for job in jobs if job.label == LLAMA.embed)
    spec = replace(embed.specs[0], name=LLAMA.lm_head)  # (V, C)

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        for _, tensor in embed.run():
            yield spec.name, tensor

    return [Job(spec.name, [spec], run)]


def _warn_engines(fmt: NativeFormat, config: dict[str, Any]) -> None:
    """Exports transformers loads but a serving engine would load wrongly (``tests/serving_engines.py``)."""
    head_dim, hidden, heads = config.get("head_dim"), config["hidden_size"], config["num_attention_heads"]
    if head_dim and head_dim * heads != hidden and fmt.name in ("mixtral", "qwen2_moe"):
        engines = "SGLang's Mixtral" if fmt.name == "mixtral" else "vLLM's and SGLang's Qwen2-MoE"
        warnings.warn(f"{fmt.name} export with head_dim {head_dim} != hidden_size / num_attention_heads: {engines} "
                      "compute head_dim from the hidden size and cannot load this attention", stacklevel=3)
    if fmt.name == "qwen3_moe" and config["mlp_only_layers"]:
        warnings.warn(f"qwen3_moe export with dense layers {config['mlp_only_layers']} (mlp_only_layers): vLLM and "
                      "transformers serve it, SGLang's Qwen3-MoE makes every layer MoE and would leave them "
                      "uninitialised; route every layer to serve it with SGLang", stacklevel=3)


def _side_files(src: Path, out: Path) -> None:
    """Tokenizer, generation config and the like (never weights, remote code or the source's card)."""
    for f in src.iterdir():
        if f.is_file() and names.is_side_file(f.name):
            shutil.copy2(f, out / f.name)


def _gate_layers(fmt: NativeFormat, gates: list[Any]) -> list[tuple[int, Any]]:
    """(layer, spec) of every router-row spec (the shared-expert gates stay zero)."""
    return [(int(g.name.split(".")[2]), g) for g in gates if g.name.endswith(".gate.weight")]


def router_rows(src: Any, fmt: NativeFormat, loader: TensorLoader, *, calibrate: bool = False,
                from_data: bool = False) -> dict[int, torch.Tensor]:
    """Gate rows (E, C) per routed layer, measured on the written weights (``loader``); {} = uniform routing."""
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

    tok = AutoTokenizer.from_pretrained(src.side_folder, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [load_texts(ds, tok, file=f"experts[{e}].calibration") for e, ds in enumerate(init.calibration)]
    n_layers = int(src.base_cfg["num_hidden_layers"])
    embed = loader.get(LLAMA.embed)  # the export's float dtype: the pass computes in it
    moe = set(fmt.moe_layers(n_layers, src.routed))
    weights = layer_weights(loader, fmt, moe, int(src.base_cfg["intermediate_size"]), embed.dtype)
    stats = collect_stats(src.base_cfg, embed, weights, texts, tok, moe, sorted(src.routed))
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
                t = loader.get(f"{LLAMA.layer_path(layer)}.{key}")
            sd[key] = t.to(dtype)
        return sd

    return get


def _card(fmt: NativeFormat, names: list[str], origin: str, top_k: int, kinds: dict[str, str] | None = None) -> str:
    lines = [f"# {fmt.architecture} exported by moerge", "", f"Built from {origin}.", "", "Experts (index: name):"]
    lines += [f"- {e}: `{n}`" for e, n in enumerate(names)]
    lossy = sorted({k for k in (kinds or {}).values() if k != "dense"})
    if lossy:
        lines += ["", (f"Experts of kind {', '.join(lossy)} are materialized as dense `W_s + delta_e` (the moerge "
                      f"model's own delta math); `{REPORT_FILE}` gives the logit difference to the checkpoint.")]
    lines += ["", f"- {top_k} experts per token; routed MLP layers hold every expert's own MLP.",
              "- **Attention is the static merge of the experts** (a native MoE has one attention per layer).",
              "- `lm_head.weight` is always written (`tie_word_embeddings: false`): SGLang never ties it here.",
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
