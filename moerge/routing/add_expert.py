"""``moerge add-expert``: extend a built checkpoint with one more expert, then recalibrate its router.

The new expert (a full checkpoint or a LoRA adapter of the same base) gets tensors of each routed unit's kind
in every routed linear, computed against the *stored* shared weight ``W_s`` with the build-side kind code
(``moerge.kinds``); they go to a new shard ``moerge_expert_<name>.safetensors``.  The manifest (experts and
each linear's expert shapes) and the index list them; the router grows by one output.  No existing tensor is
rewritten, so forcing an old expert gives exactly the logits it gave before.  Tensors outside the routed
units keep the checkpoint's static merge: the new expert contributes through its routed units only, with its own
input-norm scales folded into them as the build folded the others' (recipe ``routing.fold_norms``).

Anchors: a shared weight merged from the *other* experts lacks the new one's task vector, so a lossy kind (bit1,
twin, sparse) would compress ``τ_new - Σ τ_old`` rather than a delta that excludes the new expert's own
change, as the build's deltas do.  For a full-checkpoint expert in a unit of a kind that stores ``W_e - W_s``, the
new expert is stored against ``W_s + Σ_i c_i Δ_i`` instead, c the least-squares fit of its delta by the stored
experts' deltas over the unit's linears (``Δ_i`` by the serve-side math, so the fit uses what the model applies);
the manifest's ``anchors`` record c and the model adds ``Σ_i c_i Δ_i`` whenever the new expert is weighted.  On
the real full pool (bit1 over task arithmetic) this took tweets, added to the other three, from 0.756 to 0.878 of
its expert's accuracy (bench/RESULTS.md).  ``anchor=False`` (``--no-anchor``) stores against ``W_s``.
The fit reads each linear's stored deltas and new weight once, and the build reads them again (jobs are per linear,
the fit per unit).

Atomic: the new checkpoint is assembled in a folder beside the target (old shards hard-linked), calibrated
there, and swapped in only when complete.  All data is loaded and checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import dtypes
from ..arch import family_for
from ..checkpoint import Checkpoint, Manifest, names
from ..checkpoint.index import indexed_files, write_index
from ..checkpoint.manifest import LinearSpec
from ..checkpoint.routers import write_router_shard
from ..errors import CheckpointError, DataError, NotSupportedError, SourceError
from ..io.atomic import atomic_output
from ..io.loader import TensorLoader
from ..io.sources import FullSource, LoraSource, ModelFolder, open_source
from ..io.writer import TensorSpec
from ..kinds import KINDS, ExpertKind, KindConfig
from ..modeling import DELTAS
from ..pipeline.execute import Job, execute
from ..pipeline.units import fold_ratio, folds_norms, unit_input_norm
from ..recipe import Recipe, check_expert_name
from . import parallel
from .calibrate import CalibrateOptions, calibrate
from .commit import link_copy
from .data import Defaults, Examples, data_inputs, from_mapping, from_table, load_examples, require_experts

Source = FullSource | LoraSource
ONE_SHARD = 2**62
RIDGE = 1e-6  # x the Gram matrix's mean diagonal: keeps the anchor fit defined when stored deltas are collinear


# ---------------------------------------------------------------- inputs

def check_name(name: str, manifest: Manifest, folder: Path, what: str = "expert") -> None:
    """A new expert's or composed route's name: a plain word, not yet used by an expert or route."""
    try:
        check_expert_name(name)
    except ValueError as exc:
        raise DataError(None, "name", str(exc).replace("expert name", f"{what} name", 1)) from None
    if name in manifest.outputs:
        used = "an expert" if name in manifest.experts else "a composed route"
        raise DataError(folder / names.CONFIG, "moerge.experts", f"the checkpoint already has {used} '{name}'")


def open_base(base: str | Path | None, recipe: Recipe | None, folder: Path) -> ModelFolder:
    path = base or (recipe.base if recipe else None)
    if not path:
        raise CheckpointError(folder / names.RECIPE, "base", "no base model recorded; pass --base")
    return ModelFolder(Path(path), what="base")


def check_kind(manifest: Manifest, src: Source) -> None:
    for unit, spec in manifest.units.items():
        if KINDS.get(spec.kind).needs_lora and isinstance(src, FullSource):
            raise SourceError(src.path, unit, f"kind '{spec.kind}' stores LoRA factors: the new expert must be a "
                                              "LoRA adapter, not a full checkpoint")


def check_rank(rank: int | None, manifest: Manifest, src: Source) -> None:
    """``rank``: an integer >= 1, for a full checkpoint and a checkpoint with at least one unit of a ranked kind."""
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DataError(None, "rank", f"must be an integer >= 1, got {rank!r}")
    if not isinstance(src, FullSource):
        raise DataError(None, "rank", "applies to a full checkpoint; a LoRA adapter is stored at its own rank")
    if not any("rank" in KINDS.get(spec.kind).params for spec in manifest.units.values()):
        kinds = sorted({spec.kind for spec in manifest.units.values()})
        raise DataError(None, "rank", f"no routed unit has a ranked kind (twin); the checkpoint's kinds: {kinds}")


def kind_config(recipe: Recipe | None) -> KindConfig:
    expert = recipe.routing.expert if recipe and recipe.routing else None
    return KindConfig() if expert is None else KindConfig(expert.rank, expert.density, expert.svd)


# ---------------------------------------------------------------- calibration data

def previous_examples(ckpt: Checkpoint, experts: list[str], missing: list[str], tok: Any) -> Examples | None:
    """Examples of the ``missing`` old experts: from the data of the checkpoint's last calibration
    (``calibration.json``), else from the recipe's ``calibration`` blocks."""
    spec = _last_data_spec(ckpt.folder)
    parts: list[Examples] = []
    if missing and "table" in spec:
        parts.append(_table_part(spec["table"], experts, missing, tok))
        missing = [n for n in missing if parts[-1].counts().get(n, 0) == 0]
    recipe = ckpt.recipe()
    recipe_sources = {e.name: e.calibration.model_dump(mode="json") for e in (recipe.experts if recipe else [])
                      if e.calibration is not None}
    sources = {**recipe_sources, **(spec.get("sources") or {})}
    chosen = {n: sources[n] for n in missing if n in sources}
    if chosen:
        parts.append(from_mapping(chosen, experts, tok, Defaults(), ckpt.folder, str(ckpt.folder / names.REPORT)))
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def _table_part(t: dict[str, Any], experts: list[str], wanted: list[str], tok: Any) -> Examples:
    defaults = Defaults(field=t["field"], label_field=t["label_field"], split=t["split"],
                        max_samples=t.get("max_samples"), chat_template=t["chat_template"])
    ex = from_table(t["data"], experts, tok, defaults, require_labels=True, skip_unknown=True)
    return ex.subset([i for i, y in enumerate(ex.labels) if experts[y] in wanted])


def _last_data_spec(folder: Path) -> dict[str, Any]:
    path = folder / names.REPORT
    try:
        return (json.loads(path.read_text()).get("data") or {}) if path.is_file() else {}
    except ValueError:
        return {}


def gather_examples(ckpt: Checkpoint, data: str | Path | dict, experts: list[str], name: str, tok: Any,
                    opts: CalibrateOptions) -> Examples:
    """DATA (which must cover the new expert), completed with earlier data for the old experts it omits."""
    file = str(data) if not isinstance(data, dict) else "data"
    new = load_examples(data, experts, tok, opts.defaults, require_labels=opts.method == "supervised")
    counts = new.counts()
    if counts.get(name, 0) == 0 and new.labelled:
        raise DataError(file, name, f"the data has no examples of the new expert '{name}'")
    return completed(ckpt, new, experts, name, tok, opts, file)


def completed(ckpt: Checkpoint, new: Examples, outputs: list[str], name: str, tok: Any, opts: CalibrateOptions,
              file: str) -> Examples:
    """``new`` examples plus earlier data for the outputs (other than ``name``) that it omits."""
    counts = new.counts()
    missing = [e for e in outputs if e != name and counts.get(e, 0) == 0] if new.labelled else []
    old = previous_examples(ckpt, outputs, missing, tok) if missing else None
    examples = new if old is None else new + old
    if opts.method == "supervised":
        require_experts(examples, outputs, file)
    return examples


# ---------------------------------------------------------------- new expert tensors

def lora_rank(src: Source, weight: str) -> int | None:
    if not isinstance(src, LoraSource):
        return None
    parts = src.modules.get(weight, {})
    return src.index[parts["A"]].shape[0] if "A" in parts else 0


def expert_specs(path: str, lin: LinearSpec, kind: ExpertKind, cfg: KindConfig, src: Source,
                 shape: tuple[int, int], dtype: torch.dtype,
                 own_rank: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} of the new expert in one routed linear (``cfg``: `ExpertKind.config_like`,
    sized as the largest stored expert); checked against the stored experts' shapes (``own_rank``: a rank of the
    new expert's own, so only the tensor names are checked)."""
    raw = kind.shapes(shape[0], shape[1], cfg, lora_rank(src, f"{path}.weight"))
    specs = {k: (tuple(s), d or dtype) for k, (s, d) in raw.items()}
    if lin.bias:
        specs["bias_delta"] = ((shape[0],), dtype)
    if own_rank and any(set(specs) != set(shapes) for shapes in lin.experts):
        raise CheckpointError(path, "experts", f"the new expert's {kind.name} tensors {sorted(specs)} match none of "
                                               f"the stored experts' ({sorted(lin.experts[0])})")
    if not kind.needs_lora and not own_rank and {k: s for k, (s, _) in specs.items()} not in lin.experts:
        raise CheckpointError(path, "experts", f"the new expert's {kind.name} tensors {specs} match none of the "
                                               f"stored experts' (e.g. {lin.experts[0]})")
    return specs


class NormFolds:
    """The new expert's input-norm scale over the stored shared one, per routed linear (`fold_ratio`), when the
    checkpoint's build folded its experts' norms (``folds``: linear weight -> norm weight; empty: no folding)."""

    def __init__(self, folds: dict[str, str], src: Source, stored: TensorLoader, base: ModelFolder,
                 offset: float) -> None:
        self.folds, self.src, self.stored, self.base, self.offset = folds, src, stored, base, offset
        self.ratios: dict[str, torch.Tensor] = {}

    def apply(self, weight: str, w: torch.Tensor) -> torch.Tensor:
        """(O, I) -> (O, I) with the columns scaled by the ratio of the norm feeding ``weight`` (if folded)."""
        norm = self.folds.get(weight)
        if norm is None:
            return w
        if norm not in self.ratios:
            g_e = self.src.weight(norm, self.base.get(norm))
            self.ratios[norm] = fold_ratio(g_e, self.stored.get(norm), self.offset)
        return w * self.ratios[norm][None, :]


def norm_folds(manifest: Manifest, recipe: Recipe | None, src: Source, stored: TensorLoader,
               base: ModelFolder) -> NormFolds:
    """What the build folded: every routed linear fed by a norm the checkpoint stores, if its recipe folds."""
    family = family_for(base.config, str(base.folder / "config.json"))
    folds: dict[str, str] = {}
    if recipe is not None and recipe.routing is not None and folds_norms(recipe.routing):
        for unit, lin_name, _ in manifest.linears():
            norm = unit_input_norm(family, unit, lin_name)
            if norm is not None and norm in stored.index:
                folds[f"{names.linear_path(unit, lin_name)}.weight"] = norm
    return NormFolds(folds, src, stored, base, family.norm_offset)


# ---------------------------------------------------------------- anchors

def stored_deltas(path: str, lin: LinearSpec, kind: str, stored: TensorLoader, w_s: torch.Tensor) -> list[torch.Tensor]:
    """Δ_i (O, I) float32 of each stored expert of one routed linear, by the serve-side math (`DELTAS`)."""
    out = []
    for e, shapes in enumerate(lin.experts):
        t = {k: stored.get(names.expert_tensor(path, e, k)) for k in shapes if k != "bias_delta"}
        out.append(DELTAS[kind]({k: v.float() if v.is_floating_point() else v for k, v in t.items()}, w_s).float())
    return out


def anchor_weights(gram: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """argmin_c |Δ_new - Σ_i c_i Δ_i|² from G_ij = <Δ_i, Δ_j> (E, E) and b_i = <Δ_i, Δ_new> (E,), float64,
    ridge-regularised (`RIDGE`); zeros when every stored delta is zero."""
    scale = float(gram.diagonal().mean()) if gram.numel() else 0.0
    if scale <= 0.0:
        return torch.zeros_like(target)
    return torch.linalg.solve(gram + RIDGE * scale * torch.eye(len(gram), dtype=gram.dtype), target)


def unit_anchors(manifest: Manifest, src: Source, stored: TensorLoader, base: ModelFolder,
                 folds: NormFolds) -> dict[str, tuple[float, ...]]:
    """Per routed unit of an anchorable kind: the weights c (E,) of the stored experts' deltas that best fit the
    new full expert's delta over the unit's linears (see the module docstring); {} for a LoRA source (its delta is
    low-rank already, and the kinds store its factors exactly)."""
    if not isinstance(src, FullSource):
        return {}
    n_exp, out = len(manifest.experts), {}
    for unit, spec in manifest.units.items():
        if not KINDS.get(spec.kind).anchorable:
            continue
        gram = torch.zeros(n_exp, n_exp, dtype=torch.float64)
        target = torch.zeros(n_exp, dtype=torch.float64)
        for lin_name, lin in spec.linears.items():
            path = names.linear_path(unit, lin_name)
            w_s = stored.get(stored_weight(path, stored, base)).float()  # (O, I)
            m = torch.stack([d.flatten() for d in stored_deltas(path, lin, spec.kind, stored, w_s)])  # (E, O * I)
            gram += (m @ m.T).double()
            target += (m @ (new_weight(path, src, base, folds, stored) - w_s).flatten()).double()
        c = anchor_weights(gram, target)
        if bool(c.ne(0).any()):
            out[unit] = tuple(float(v) for v in c)
    return out


def stored_weight(path: str, stored: TensorLoader, base: ModelFolder) -> str:
    """The tensor holding routed linear ``path``'s shared weight in the checkpoint (and its weight in a source):
    ``{path}.weight``, or for the output head of a model with tied embeddings the input embedding."""
    return family_for(base.config, str(base.folder / "config.json")).holder(f"{path}.weight", stored.index)


def new_weight(path: str, src: Source, base: ModelFolder, folds: NormFolds, stored: TensorLoader) -> torch.Tensor:
    """The new expert's weight (O, I) float32 of one routed linear, its input norm folded as the build folds."""
    name = stored_weight(path, stored, base)
    return folds.apply(f"{path}.weight", src.weight(name, base.get(name)).float())


def reference(path: str, lin: LinearSpec, kind: str, stored: TensorLoader, anchor: tuple[float, ...] | None,
              bias: bool = False, weight: str | None = None) -> torch.Tensor:
    """What the new expert is stored against in one linear: ``W_s + Σ_i c_i Δ_i`` (``bias``: ``b_s + Σ_i c_i
    bias_delta_i``), float32; ``W_s`` (``b_s``) without an anchor."""
    name = f"{path}.bias" if bias else (weight or f"{path}.weight")
    ref = stored.get(name).float()
    if not anchor:
        return ref
    if bias:
        parts = [stored.get(names.expert_tensor(path, e, "bias_delta")).float() if "bias_delta" in shapes else None
                 for e, shapes in enumerate(lin.experts)]
    else:
        parts = stored_deltas(path, lin, kind, stored, ref)
    return ref + sum((c * d for c, d in zip(anchor, parts) if c and d is not None), torch.zeros_like(ref))


def linear_job(path: str, lin: LinearSpec, kind: ExpertKind, cfg: KindConfig, src: Source, e: int,
               stored: TensorLoader, base: ModelFolder, folds: NormFolds,
               anchor: tuple[float, ...] | None = None, rank: int | None = None) -> Job:
    w_info = stored.index[stored_weight(path, stored, base)]
    dtype = dtypes.from_st(w_info.dtype)
    cfg = kind.config_like(list(lin.experts), w_info.shape[0], w_info.shape[1], cfg)
    own_rank = rank is not None and "rank" in kind.params  # (check_rank refused a LoRA source)
    if own_rank:
        cfg = dataclasses.replace(cfg, rank=rank)
    specs = expert_specs(path, lin, kind, cfg, src, tuple(w_info.shape), dtype, own_rank)  # type: ignore[arg-type]
    tensor = {k: names.expert_tensor(path, e, k) for k in specs}

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        ref = reference(path, lin, kind.name, stored, anchor, weight=stored_weight(path, stored, base))  # (O, I)
        w_new = new_weight(path, src, base, folds, stored)  # W_s above, or W_s + Σ_i c_i Δ_i with an anchor
        for k, t in kind.build(ref, w_new, src.lora_factors(f"{path}.weight"), cfg).items():
            yield tensor[k], t.to(dtype) if t.is_floating_point() else t
        if lin.bias:
            b_new = src.weight(f"{path}.bias", base.get(f"{path}.bias")).float()
            yield tensor["bias_delta"], (b_new - reference(path, lin, kind.name, stored, anchor, bias=True)).to(dtype)

    return Job(path, [TensorSpec(tensor[k], s, d) for k, (s, d) in specs.items()], run)


# ---------------------------------------------------------------- writing

def write_expert(tmp: Path, ckpt: Checkpoint, name: str, src: Source, base: ModelFolder, recipe: Recipe | None,
                 anchor: bool = True, rank: int | None = None) -> dict[str, tuple[float, ...]]:
    """New shard, grown router, index and config in ``tmp`` (a hard-linked copy of the checkpoint); returns the
    new expert's anchors (unit -> weights of the old experts, see the module docstring).  ``rank``: the new full
    expert's rank in units of a ranked kind (twin) instead of the largest stored one."""
    manifest, cfg = ckpt.require_routed(), kind_config(recipe)
    e = len(manifest.experts)
    stored = TensorLoader(Checkpoint.open(tmp).index())
    folds = norm_folds(manifest, recipe, src, stored, base)
    anchors = unit_anchors(manifest, src, stored, base, folds) if anchor else {}
    jobs, shapes = [], {}
    for unit, lin_name, lin in manifest.linears():
        kind = KINDS.get(manifest.units[unit].kind)
        job = linear_job(names.linear_path(unit, lin_name), lin, kind, cfg, src, e, stored, base, folds, anchors.get(unit), rank)
        jobs.append(job)
        shapes[(unit, lin_name)] = {s.name.rsplit(".", 1)[1]: s.shape for s in job.specs}
    files = indexed_files(tmp)
    shard = execute(jobs, tmp, ONE_SHARD, progress=False, prefix=names.expert_shard(name).removesuffix(".safetensors"))[0]
    stored.close()
    routers = {p: r.grown(at=e) for p, r in ckpt.routers().items()}  # before the composed routes' outputs
    (tmp / names.ROUTER_SHARD).unlink()  # a hard link to the old shard: a new file, not a rewrite in place
    order = write_router_shard(tmp / names.ROUTER_SHARD, routers, ckpt.router_dtype())
    write_index(tmp, [*files, shard.name], {names.ROUTER_SHARD: order})
    config = ckpt.config_with(manifest.with_expert(name, shapes, anchors))
    (tmp / names.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    card = tmp / names.CARD
    if card.is_file():
        card.write_text(card.read_text() + f"\nExpert `{name}` added with `moerge add-expert` from `{src.path}`.\n")
    return anchors


def note_unrouted(src: Source, manifest: Manifest) -> None:
    """Warn when a LoRA source adapts tensors outside the routed units (they are not added)."""
    if not isinstance(src, LoraSource):
        return
    routed = {f"{names.linear_path(u, lin)}.{p}" for u, lin, _ in manifest.linears() for p in ("weight", "bias")}
    outside = sorted(set(src.modules) - routed)
    if outside:
        warnings.warn(f"expert '{src.name}' adapts {len(outside)} tensor(s) outside the routed units (e.g. "
                      f"{outside[0]}); they keep the checkpoint's static merge", stacklevel=3)


# ---------------------------------------------------------------- the command

def add_expert(checkpoint: str | Path, name: str, source: str | Path, data: str | Path | dict[str, Any], *,
               base: str | Path | None = None, out: str | Path | None = None, force: bool = False,
               options: CalibrateOptions | None = None, anchor: bool = True,
               rank: int | None = None) -> dict[str, Any] | None:
    """Add expert ``name`` from ``source`` to every routed unit of ``checkpoint`` and calibrate the grown
    router on DATA (old experts that DATA omits use the last calibration's data or the recipe's).  ``anchor``: store
    a full expert against its least-squares fit by the stored experts where the kind allows (module docstring).
    ``rank``: a full expert's rank in twin units (default: each linear's largest stored rank); more bytes, a closer
    copy.  Returns the calibration report."""
    opts = options or CalibrateOptions()
    opts.check()
    if parallel.state().num_processes > 1:
        raise NotSupportedError(None, "add-expert", "run add-expert in one process (calibrate can be sharded)")
    ckpt = Checkpoint.open(checkpoint, routed=True)
    manifest = ckpt.require_routed()
    check_name(name, manifest, ckpt.folder)
    recipe = ckpt.recipe()
    base_model = open_base(base, recipe, ckpt.folder)
    src = open_source(name, Path(source), base_model)
    check_kind(manifest, src)
    check_rank(rank, manifest, src)
    outputs = [*manifest.experts, name, *manifest.routes]  # the grown router's outputs
    examples = gather_examples(ckpt, data, outputs, name, ckpt.tokenizer(), opts)
    note_unrouted(src, manifest)
    target = Path(out) if out is not None else ckpt.folder
    in_place = target.resolve() == ckpt.folder.resolve()
    inputs = [] if in_place else [("checkpoint", ckpt.folder), ("expert source", Path(source)),
                                  ("base", base_model.folder), *data_inputs(data)]
    with atomic_output(target, force=force or in_place, inputs=inputs) as tmp:
        link_copy(ckpt.folder, tmp)
        anchors = write_expert(tmp, ckpt, name, src, base_model, recipe, anchor, rank)
        report = calibrate(tmp, data, options=opts, examples=examples)
    assert report is not None
    report["checkpoint"] = str(target)
    report["added_expert"] = name
    report["anchored_units"] = len(anchors)
    return report
