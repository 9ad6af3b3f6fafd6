"""``moerge calibrate CKPT --data PAIRS --compose NAME``: a route for a task that has data but no expert.

From a few labelled examples (prompt -> answer) it learns how to mix the checkpoint's experts: one weight per
expert and per routed unit, tied per layer by default (AdaMerging's layer-wise coefficients, Yang et al. 2024,
https://arxiv.org/abs/2310.02575; LoraHub's few-shot composition of LoRA modules, Huang et al. 2023,
https://arxiv.org/abs/2307.13269, with gradients instead of a gradient-free search).  The route means, in unit u,
the weight ``W_s + Σ_e w[u, e] Δ_e``: weights are free reals (not a convex mix), so the zero route (the shared
weights), any single expert, their average and their task-arithmetic sum are all routes it can learn, and so is
the base model where the shared weight is a task-arithmetic merge (`base_route`).

Fitting: the answer tokens' cross-entropy (the answer followed by the tokenizer's end-of-sequence token, after the
templated prompt) under the forced route, by Adam on the weights only (the model is frozen); it starts from the
best of the simple routes above (the base among them) on the examples and keeps the best weights seen.  Stored as one more entry of
``config.moerge["routes"]`` and one more router output, which ``force_route(NAME)`` and the router pick; the
router is then recalibrated on the examples' prompts (labelled NAME) and the earlier calibration data, as
``moerge add-expert`` does.  Atomic: written into a hard-linked copy, swapped in when complete.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint, Manifest, names
from ..checkpoint.index import indexed_files, write_index
from ..checkpoint.routers import write_router_shard
from ..errors import DataError, NotSupportedError
from ..io.atomic import atomic_output
from ..recipe import CalibrationData
from ..registry import did_you_mean
from .add_expert import check_name, completed
from .calibrate import CalibrateOptions, calibrate
from .commit import link_copy
from .data import Examples, data_inputs, load_table, to_prompt

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


@dataclass
class ComposeOptions:
    """How to learn a composed route (the CLI's ``--compose-*`` flags)."""

    over: list[str] | None = None  # experts to mix (None: all)
    level: str = "layer"  # unit | layer | global: which units share their weights
    steps: int = 12  # Adam steps over the whole set of examples
    lr: float = 0.1
    answer_field: str = "answer"
    max_samples: int = 32
    batch_size: int = 8
    amp: bool | None = None  # bf16 autocast on CPU (the model stays in its dtype); None: where the CPU has bf16 GEMMs
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def autocast(self) -> bool:
        """Whether the forwards run under CPU bf16 autocast (``amp``, or by default where it is fast)."""
        from ..dtypes import cpu_bf16_native

        return cpu_bf16_native() if self.amp is None else self.amp

    def check(self) -> None:
        if self.level not in ("unit", "layer", "global"):
            raise DataError(None, "compose_level", f"unknown level '{self.level}'; one of unit, layer, global")
        if self.steps < 0 or self.lr <= 0 or self.max_samples < 1 or self.batch_size < 1:
            raise DataError(None, "compose", "steps >= 0, lr > 0, max_samples >= 1 and batch_size >= 1 are needed")


# ---------------------------------------------------------------- data

@dataclass
class Pairs:
    prompts: list[str]  # templated
    answers: list[str]
    source: CalibrationData


def load_pairs(data: str | Path, tok: Any, opts: ComposeOptions, cal: CalibrateOptions) -> Pairs:
    """The first ``max_samples`` (prompt, answer) rows of a table, every row checked."""
    if isinstance(data, dict) or Path(str(data)).suffix.lower() in (".yaml", ".yml"):
        raise DataError(str(data), None, "--compose reads one table of prompt -> answer rows (jsonl/csv/json/"
                                         "parquet), not a mapping of experts")
    d = cal.defaults
    source = CalibrationData(data=str(data), field=d.field, split=d.split, max_samples=opts.max_samples,
                             chat_template=d.chat_template)
    table = load_table(source, "--data")
    cols = table.column_names
    for col, what in ((d.field, "text"), (opts.answer_field, "answer")):
        if col not in cols:
            raise DataError(data, col, f"no such {what} field (--compose learns from prompt -> answer rows); "
                                       f"columns: {', '.join(cols)}")
    rows, answers = table[d.field][: opts.max_samples], table[opts.answer_field][: opts.max_samples]
    if not rows:
        raise DataError(data, d.field, "no examples")
    for i, a in enumerate(answers):
        if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
            raise DataError(data, opts.answer_field, f"row {i}: the answer must be a non-empty text or number, "
                                                     f"got {a!r}")
    prompts = [to_prompt(r, tok, d.chat_template, str(data)) for r in rows]
    local = Path(str(data))
    source = source.model_copy(update={"data": str(local.resolve()) if local.exists() else str(data)})
    return Pairs(prompts, [str(a).strip() for a in answers], source)


Batch = dict[str, torch.Tensor]


def batches(tok: Any, pairs: Pairs, size: int) -> list[Batch]:
    """Left-padded batches of prompt + answer + eos; ``targets`` (B, K - 1) are the next tokens of the last K
    positions, -100 outside the answers (K = longest answer + 1)."""
    eos = tok.eos_token or ""
    items = []
    for p, a in zip(pairs.prompts, pairs.answers):
        prompt = tok(p, add_special_tokens=False).input_ids
        answer = tok(a + eos, add_special_tokens=False).input_ids
        items.append((prompt + answer, len(answer)))
    out = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(items), size):
        group = items[s:s + size]
        width, keep = max(len(ids) for ids, _ in group), max(n for _, n in group) + 1
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), keep - 1), -100, dtype=torch.long)
        for b, (seq, n) in enumerate(group):
            ids[b, width - len(seq):], mask[b, width - len(seq):] = torch.tensor(seq), 1
            targets[b, keep - 1 - n:] = ids[b, width - n:]  # answer tokens, predicted from the position before
        out.append({"input_ids": ids, "attention_mask": mask, "targets": targets, "keep": torch.tensor(keep)})
    return out


# ---------------------------------------------------------------- the route's weights

def unit_groups(manifest: Manifest, level: str) -> tuple[dict[str, int], int]:
    """Unit -> index of its shared weights, and the number of groups (per unit, per layer or one)."""
    if level == "global":
        return dict.fromkeys(manifest.units, 0), 1
    keys = [u if level == "unit" else (_LAYER.match(u).group(1) if _LAYER.match(u) else u) for u in manifest.units]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return {u: index[k] for u, k in zip(manifest.units, keys)}, len(index)


def simple_routes(experts: list[str], over: list[int]) -> dict[str, torch.Tensor]:
    """Starting points, each (E,): the shared weights, each expert alone, their mean and their sum."""
    n = len(experts)
    out = {"shared": torch.zeros(n)}
    for e in over:
        out[experts[e]] = F.one_hot(torch.tensor(e), n).float()
    mask = torch.zeros(n)
    mask[over] = 1.0
    out["mean"], out["sum"] = mask / len(over), mask.clone()
    return out


def base_route(ckpt: Checkpoint, manifest: Manifest, over: list[int]) -> torch.Tensor | None:
    """(E,) expert weights whose deltas cancel a task-arithmetic shared weight, i.e. the base model as a route
    (None where there is no such route).  With ``W_s = W_0 + λ Σ_i w_i τ_i`` and ``Δ_i = τ_i - λ Σ_j w_j τ_j``,
    weights ``a_i = k w_i`` give ``Σ_i a_i Δ_i = -λ Σ_j w_j τ_j`` for ``k = λ / (λ Σ_j w_j - 1)``: exact for exact
    kinds, up to the compression of the others.  Needs every merged expert stored and in ``over``."""
    recipe = ckpt.recipe()
    if manifest.shared != "merge" or recipe is None or recipe.merge.method != "task_arithmetic":
        return None
    lam, merged = recipe.merge.lambda_, {e.name: recipe.merge.weights.get(e.name, 1.0) for e in recipe.experts}
    if any(name not in manifest.experts or manifest.experts.index(name) not in over
           for name, w in merged.items() if w):
        return None
    total = lam * sum(merged.values())
    if abs(total - 1.0) < 1e-6:
        return None
    return torch.tensor([lam / (total - 1.0) * merged.get(e, 0.0) for e in manifest.experts])


def set_route(model: Any, weights: torch.Tensor, groups: dict[str, int], row: int) -> None:
    """Row ``row`` of every routed linear's mix = its unit's group's weights (G, E) (may require grad)."""
    from ..modeling import RoutedLinear

    for module in model.modules():
        if isinstance(module, RoutedLinear):
            base = module.mix.detach()
            module.set_mix(torch.cat([base[:row], weights[groups[module.unit]][None], base[row + 1:]]))


def answer_loss(model: Any, batch: Batch, amp: bool) -> torch.Tensor:
    """Summed cross-entropy of the batch's answer tokens."""
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos, use_cache=False,
                    logits_to_keep=int(batch["keep"]))
    logits = out.logits[:, :-1].float()  # (B, K - 1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), reduction="sum",
                           ignore_index=-100)


def mean_loss(model: Any, data: list[Batch], amp: bool) -> float:
    n = sum(int((b["targets"] >= 0).sum()) for b in data)
    with torch.no_grad():
        return sum(float(answer_loss(model, b, amp)) for b in data) / max(n, 1)


def fit_route(model: Any, data: list[Batch], start: torch.Tensor, free: torch.Tensor, groups: dict[str, int],
              row: int, opts: ComposeOptions) -> tuple[torch.Tensor, list[float]]:
    """Adam on the (G, E) weights (``free`` (E,) masks the experts it may use); the best weights seen by the
    examples' mean answer loss, and the loss history (step 0 = ``start``)."""
    n_tok = sum(int((b["targets"] >= 0).sum()) for b in data)
    w = start.clone().requires_grad_()
    opt = torch.optim.Adam([w], lr=opts.lr)
    best, history = start.clone(), []
    for _ in range(opts.steps + 1):
        opt.zero_grad()
        total = 0.0
        for b in data:
            set_route(model, w * free, groups, row)
            loss = answer_loss(model, b, opts.autocast()) / n_tok
            loss.backward()
            total += float(loss.detach())
        if not history or total < min(history):
            best = (w.detach() * free).clone()
        history.append(total)
        opt.step()
    set_route(model, best, groups, row)
    return best, history


# ---------------------------------------------------------------- the command

def prepare(ckpt: Checkpoint, name: str, copts: ComposeOptions) -> tuple[Manifest, list[int]]:
    """Checks before any model is loaded: sequence level, a free name, the experts to mix."""
    manifest = ckpt.require_routed()
    if manifest.level != "sequence":
        raise NotSupportedError(ckpt.folder / names.CONFIG, "moerge.level", "composed routes need a sequence-level "
                                                                           "router")
    check_name(name, manifest, ckpt.folder, "route")
    over = list(manifest.experts) if copts.over is None else list(copts.over)
    if not over:
        raise DataError(None, "compose_over", "no experts to compose (--compose-over is empty)")
    for e in over:
        if e not in manifest.experts:
            raise DataError(None, "compose_over", f"unknown expert '{e}'{did_you_mean(e, list(manifest.experts))}; "
                                                  f"experts: {', '.join(manifest.experts)}")
    return manifest, [manifest.experts.index(e) for e in dict.fromkeys(over)]


def learn(ckpt: Checkpoint, pairs: Pairs, name: str, over: list[int], copts: ComposeOptions,
          tok: Any) -> dict[str, Any]:
    """Load the model, score the simple routes, fit; the route's per-unit weights and a report."""
    torch.manual_seed(copts.seed)
    manifest = ckpt.require_routed()
    model = ckpt.load_model(torch.float32).requires_grad_(False)
    model.add_route(name, {})
    model.force_route(name)
    row = len(manifest.routes)
    groups, n_groups = unit_groups(manifest, copts.level)
    data = batches(tok, pairs, copts.batch_size)
    candidates = simple_routes(list(manifest.experts), over)
    base = base_route(ckpt, manifest, over)
    if base is not None:
        candidates["base"] = base
    starts = {}
    for label, w in candidates.items():
        set_route(model, w.expand(n_groups, -1), groups, row)
        starts[label] = mean_loss(model, data, copts.autocast())
    first = min(starts, key=starts.get)
    free = torch.zeros(len(manifest.experts))
    free[over] = 1.0
    start = candidates[first].expand(n_groups, -1)
    weights, history = fit_route(model, data, start, free, groups, row, copts)
    per_unit = {u: [round(float(v), 6) for v in weights[g]] for u, g in groups.items()}
    return {"weights": per_unit, "start": first, "start_losses": starts, "loss": history,
            "final_loss": min(history)}


def write_route(tmp: Path, ckpt: Checkpoint, name: str, weights: dict[str, list[float]]) -> None:
    """Manifest, grown router and index in ``tmp`` (a hard-linked copy of the checkpoint)."""
    manifest = ckpt.require_routed()
    routers = {p: r.grown() for p, r in ckpt.routers().items()}  # the last output: after the other routes
    (tmp / names.ROUTER_SHARD).unlink()
    order = write_router_shard(tmp / names.ROUTER_SHARD, routers, ckpt.router_dtype())
    write_index(tmp, indexed_files(tmp), {names.ROUTER_SHARD: order})
    config = ckpt.config_with(manifest.with_route(name, weights))
    (tmp / names.CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def compose(checkpoint: str | Path, data: str | Path, name: str, *, out: str | Path | None = None,
            force: bool = False, options: CalibrateOptions | None = None,
            compose_options: ComposeOptions | None = None) -> dict[str, Any]:
    """Learn composed route ``name`` from the (prompt, answer) rows of ``data``, store it and recalibrate the
    router with its prompts; returns the calibration report with a ``compose`` entry."""
    clock = time.perf_counter()
    opts, copts = options or CalibrateOptions(), compose_options or ComposeOptions()
    opts.check()
    copts.check()
    ckpt = Checkpoint.open(checkpoint, routed=True)
    manifest, over = prepare(ckpt, name, copts)
    tok = ckpt.tokenizer()
    pairs = load_pairs(data, tok, copts, opts)
    outputs = [*manifest.outputs, name]
    new = Examples(pairs.prompts, [len(outputs) - 1] * len(pairs.prompts), outputs,
                   {"sources": {name: pairs.source.model_dump(mode="json")}})
    examples = completed(ckpt, new, outputs, name, tok, opts, str(data))
    fitted = learn(ckpt, pairs, name, over, copts, tok)
    fit_s = time.perf_counter() - clock
    target = Path(out) if out is not None else ckpt.folder
    in_place = target.resolve() == ckpt.folder.resolve()
    inputs = [] if in_place else [("checkpoint", ckpt.folder), *data_inputs(data)]
    with atomic_output(target, force=force or in_place, inputs=inputs) as tmp:
        link_copy(ckpt.folder, tmp)
        write_route(tmp, ckpt, name, fitted["weights"])
        report = calibrate(tmp, data, options=opts, examples=examples)
    assert report is not None
    report["checkpoint"] = str(target)
    report["compose"] = {k: v for k, v in fitted.items() if k != "weights"} | {
        "route": name, "over": [manifest.experts[e] for e in over], "level": copts.level, "n": len(pairs.prompts),
        "steps": copts.steps, "lr": copts.lr, "fit_s": fit_s, "finite": all(map(math.isfinite, fitted["loss"]))}
    return report
