"""``moerge add-expert``: extend a built checkpoint with one more expert, then recalibrate its router.

The new expert (a full checkpoint or a LoRA adapter of the same base) gets tensors of the checkpoint's kind
in every routed linear, computed against the *stored* shared weight ``W_s`` with the build-side kind code
(``KINDS.get(kind).build``); they go to a new shard ``moerge_expert_<name>.safetensors``.  ``config.json``
(``moerge.experts`` and each linear's ``experts`` shapes) and the index list them; the router grows by one
output.  No existing tensor is rewritten, so forcing an old expert gives exactly the logits it gave before.
Tensors outside the routed units keep the checkpoint's static merge: the new expert contributes through its
routed units only.

Atomic: the new checkpoint is assembled in a folder beside the target (old shards hard-linked), calibrated
there, and swapped in only when complete.  All data is loaded and checked before anything is written.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import CheckpointError, DataError, NotSupportedError, SourceError
from ..execute import Job, execute
from ..experts import KINDS, KindConfig
from ..io.atomic import atomic_output
from ..io.files import read_text
from ..io.index import CheckpointIndex, read_safetensors_header
from ..io.loader import TensorLoader
from ..io.sources import FullSource, LoraSource, ModelFolder, open_source
from ..io.writer import TensorSpec
from ..recipe import check_expert_name
from . import parallel
from .calibrate import REPORT_FILE, CalibrateOptions, calibrate, load_tokenizer, read_config
from .commit import link_copy
from .dataset import Defaults, Examples, data_inputs, from_mapping, from_table, load_examples, require_experts
from .prototype import ROUTER_FILE, write_router_tensors

Source = FullSource | LoraSource
ONE_SHARD = 2**62


# ---------------------------------------------------------------- inputs

def read_recipe(folder: Path) -> dict[str, Any]:
    path = folder / "moerge_recipe.yaml"
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(path, None, f"not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, None, "not a recipe (a mapping of keys to values)")
    return raw


def check_name(name: str, experts: list[str], folder: Path) -> None:
    try:
        check_expert_name(name)
    except ValueError as exc:
        raise DataError(None, "name", str(exc)) from None
    if name in experts:
        raise DataError(folder / "config.json", "moerge.experts", f"the checkpoint already has an expert '{name}'")


def open_base(base: str | Path | None, recipe: dict[str, Any], folder: Path) -> ModelFolder:
    path = base or recipe.get("base")
    if not path:
        raise CheckpointError(folder / "moerge_recipe.yaml", "base", "no base model recorded; pass --base")
    return ModelFolder(Path(path), what="base")


def check_kind(config: dict[str, Any], src: Source) -> None:
    for unit, spec in config["moerge"]["units"].items():
        if KINDS.get(spec["kind"]).needs_lora and isinstance(src, FullSource):
            raise SourceError(src.path, unit, f"kind '{spec['kind']}' stores LoRA factors: the new expert must be a "
                                              "LoRA adapter, not a full checkpoint")


def kind_config(recipe: dict[str, Any]) -> KindConfig:
    expert = ((recipe.get("routing") or {}).get("expert") or {})
    return KindConfig(expert.get("rank"), expert.get("density"))


# ---------------------------------------------------------------- calibration data

def previous_examples(folder: Path, experts: list[str], missing: list[str], tok: Any,
                      recipe: dict[str, Any]) -> Examples | None:
    """Examples of the ``missing`` old experts: from the data of the checkpoint's last calibration
    (``calibration.json``), else from the recipe's ``calibration`` blocks."""
    spec = _last_data_spec(folder)
    parts: list[Examples] = []
    if missing and "table" in spec:
        parts.append(_table_part(spec["table"], experts, missing, tok))
        missing = [n for n in missing if parts[-1].counts().get(n, 0) == 0]
    recipe_sources = {e.get("name"): e["calibration"] for e in recipe.get("experts") or [] if e.get("calibration")}
    sources = {**recipe_sources, **(spec.get("sources") or {})}
    chosen = {n: sources[n] for n in missing if n in sources}
    if chosen:
        parts.append(from_mapping(chosen, experts, tok, Defaults(), folder, str(folder / REPORT_FILE)))
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def _table_part(t: dict[str, Any], experts: list[str], wanted: list[str], tok: Any) -> Examples:
    defaults = Defaults(field=t["field"], label_field=t["label_field"], split=t["split"],
                        max_samples=t.get("max_samples"), chat_template=t["chat_template"])
    ex = from_table(t["data"], experts, tok, defaults, require_labels=True)
    return ex.subset([i for i, y in enumerate(ex.labels) if experts[y] in wanted])


def _last_data_spec(folder: Path) -> dict[str, Any]:
    path = folder / REPORT_FILE
    try:
        return (json.loads(path.read_text()).get("data") or {}) if path.is_file() else {}
    except ValueError:
        return {}


def gather_examples(folder: Path, data: str | Path | dict, experts: list[str], name: str, tok: Any,
                    opts: CalibrateOptions, recipe: dict[str, Any]) -> Examples:
    """DATA (which must cover the new expert), completed with earlier data for the old experts it omits."""
    file = str(data) if not isinstance(data, dict) else "data"
    new = load_examples(data, experts, tok, opts.defaults, require_labels=opts.method == "supervised")
    counts = new.counts()
    if counts.get(name, 0) == 0 and new.labelled:
        raise DataError(file, name, f"the data has no examples of the new expert '{name}'")
    missing = [e for e in experts[:-1] if counts.get(e, 0) == 0] if new.labelled else []
    old = previous_examples(folder, experts, missing, tok, recipe) if missing else None
    examples = new if old is None else new + old
    if opts.method == "supervised":
        require_experts(examples, experts, file)
    return examples


# ---------------------------------------------------------------- new expert tensors

def lora_rank(src: Source, weight: str) -> int | None:
    if not isinstance(src, LoraSource):
        return None
    parts = src.modules.get(weight, {})
    return src.index[parts["A"]].shape[0] if "A" in parts else 0


def expert_specs(path: str, lin: dict[str, Any], kind: Any, cfg: KindConfig, src: Source,
                 shape: tuple[int, int], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} of the new expert in one routed linear; checked against expert 0."""
    raw = kind.shapes(shape[0], shape[1], cfg, lora_rank(src, f"{path}.weight"))
    specs = {k: (tuple(s), dtype if d == "float" else getattr(torch, d)) for k, (s, d) in raw.items()}
    if lin["bias"]:
        specs["bias_delta"] = ((shape[0],), dtype)
    old = lin["experts"][0]
    if not kind.needs_lora and {k: list(s) for k, (s, _) in specs.items()} != old:
        raise CheckpointError(path, "experts", f"the new expert's {kind.name} tensors {specs} do not match the "
                                               f"stored ones {old} (was the recipe's rank/density changed?)")
    return specs


def linear_job(path: str, lin: dict[str, Any], kind: Any, cfg: KindConfig, src: Source, e: int,
               stored: TensorLoader, base: ModelFolder) -> Job:
    w_info = stored.index[f"{path}.weight"]
    dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[w_info.dtype])
    specs = expert_specs(path, lin, kind, cfg, src, tuple(w_info.shape), dtype)  # type: ignore[arg-type]
    names = {k: f"{path}.experts.{e}.{k}" for k in specs}

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        w_s = stored.get(f"{path}.weight").float()  # (O, I) the stored shared weight
        w_new = new_weight(src, f"{path}.weight", base)
        for k, t in kind.build(w_s, w_new, src.lora_factors(f"{path}.weight"), cfg).items():
            yield names[k], t.to(dtype) if t.is_floating_point() else t
        if lin["bias"]:
            b_new = new_weight(src, f"{path}.bias", base)
            yield names["bias_delta"], (b_new - stored.get(f"{path}.bias").float()).to(dtype)

    job_specs = [TensorSpec(names[k], s, d) for k, (s, d) in specs.items()]
    return Job(path, job_specs, run)


def new_weight(src: Source, name: str, base: ModelFolder) -> torch.Tensor:
    """The new expert's own fp32 tensor (a LoRA source: base + its delta)."""
    b = base.get(name)
    if isinstance(src, FullSource):
        return src.weight(name, b).float()
    delta = src.delta(name, b)
    return b.float() if delta is None else b.float() + delta


def shapes_for_config(job: Job) -> dict[str, list[int]]:
    return {s.name.rsplit(".", 1)[1]: list(s.shape) for s in job.specs}


# ---------------------------------------------------------------- writing

def write_expert(tmp: Path, config: dict[str, Any], name: str, src: Source, base: ModelFolder,
                 cfg: KindConfig) -> None:
    """New shard, grown router, index and config in ``tmp`` (a hard-linked copy of the checkpoint)."""
    e = len(config["moerge"]["experts"])
    stored = TensorLoader(CheckpointIndex.from_folder(tmp))
    jobs, shapes = [], {}
    for unit, spec in config["moerge"]["units"].items():
        kind = KINDS.get(spec["kind"])
        for lin_name, lin in spec["linears"].items():
            job = linear_job(f"{unit}.{lin_name}", lin, kind, cfg, src, e, stored, base)
            jobs.append(job)
            shapes[(unit, lin_name)] = shapes_for_config(job)
    shard = execute(jobs, tmp, ONE_SHARD, progress=False, prefix=f"moerge_expert_{name}")[0]
    stored.close()
    grow_router(tmp)
    update_index(tmp, shard)
    new_config = json.loads(json.dumps(config))
    new_config["moerge"]["experts"].append(name)
    for (unit, lin_name), s in shapes.items():
        new_config["moerge"]["units"][unit]["linears"][lin_name]["experts"].append(s)
    (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    card = tmp / "README.md"
    if card.is_file():
        card.write_text(card.read_text() + f"\nExpert `{name}` added with `moerge add-expert` from `{src.path}`.\n")


def grow_router(folder: Path) -> None:
    """One more router output: a zero prototype row and a zero bias (calibration sets them)."""
    from safetensors.torch import load_file

    updates = {key: torch.cat([t, torch.zeros(1, *t.shape[1:], dtype=t.dtype)])  # (E+1, ...)
               for key, t in load_file(folder / ROUTER_FILE).items() if key.endswith((".prototypes", ".bias"))}
    write_router_tensors(folder, updates, resize=True)  # a new file replaces the old one: no shared inode


def update_index(folder: Path, shard: Path) -> None:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for tname in read_safetensors_header(shard):
        index["weight_map"][tname] = shard.name
    files = set(index["weight_map"].values())
    index["metadata"]["total_size"] = sum(i.nbytes for f in files for i in read_safetensors_header(folder / f).values())
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def note_unrouted(src: Source, config: dict[str, Any]) -> None:
    """Warn when a LoRA source adapts tensors outside the routed units (they are not added)."""
    if not isinstance(src, LoraSource):
        return
    routed = {f"{u}.{lin}.{p}" for u, s in config["moerge"]["units"].items() for lin in s["linears"]
              for p in ("weight", "bias")}
    outside = sorted(set(src.modules) - routed)
    if outside:
        warnings.warn(f"expert '{src.name}' adapts {len(outside)} tensor(s) outside the routed units (e.g. "
                      f"{outside[0]}); they keep the checkpoint's static merge", stacklevel=3)


# ---------------------------------------------------------------- the command

def add_expert(checkpoint: str | Path, name: str, source: str | Path, data: str | Path | dict[str, Any], *,
               base: str | Path | None = None, out: str | Path | None = None, force: bool = False,
               options: CalibrateOptions | None = None) -> dict[str, Any] | None:
    """Add expert ``name`` from ``source`` to every routed unit of ``checkpoint`` and calibrate the grown
    router on DATA (old experts that DATA omits use the last calibration's data or the recipe's).  Returns
    the calibration report."""
    opts = options or CalibrateOptions()
    opts.check()
    if parallel.state().num_processes > 1:
        raise NotSupportedError(None, "add-expert", "run add-expert in one process (calibrate can be sharded)")
    folder = Path(checkpoint)
    config = read_config(folder)
    experts = list(config["moerge"]["experts"])
    check_name(name, experts, folder)
    recipe = read_recipe(folder)
    base_model = open_base(base, recipe, folder)
    src = open_source(name, Path(source), base_model)
    check_kind(config, src)
    examples = gather_examples(folder, data, [*experts, name], name, load_tokenizer(folder), opts, recipe)
    note_unrouted(src, config)
    target = Path(out) if out is not None else folder
    in_place = target.resolve() == folder.resolve()
    inputs = [] if in_place else [("checkpoint", folder), ("expert source", Path(source)), ("base", base_model.folder),
                                  *data_inputs(data)]
    with atomic_output(target, force=force or in_place, inputs=inputs) as tmp:
        link_copy(folder, tmp)
        write_expert(tmp, config, name, src, base_model, kind_config(recipe))
        report = calibrate(tmp, data, options=opts, examples=examples)
    assert report is not None
    report["checkpoint"] = str(target)
    report["added_expert"] = name
    return report
