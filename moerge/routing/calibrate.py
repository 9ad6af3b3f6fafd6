"""``moerge calibrate``: fit the router of a built checkpoint from a little task data, without rebuilding it.

Steps (all data is loaded and checked before the model is loaded; nothing is written before the end):

1. DATA -> templated texts + expert labels (:mod:`moerge.routing.data`); a stratified, seeded held-out
   split that is never used for training or model selection.
2. Features, computed once per example (sharded across ``accelerate`` processes, :mod:`.parallel`):
   sequence level: the pooled input of ``router_input``, whose forward stops right there (routes do not
   affect it); token level: sampled token inputs of every routed unit, with the route forced to the
   example's expert (the path its tokens take when routing is right).
3. Router fit on the main process: ``supervised`` = task-id cross-entropy on the cached features
   (:func:`.fit.fit_supervised`), then the temperature on the held-out split; ``entropy`` = entropy
   minimisation of the model's predictions (:mod:`.entropy`, no labels used).
4. Sequence level: the fallback threshold (Mediator style) on the held-out split; rows whose top route
   probability is below it use the soft mix or the shared weights (``fallback.mode``).  With ``unknown``
   (``--unknown shared``, kept by later calibrations): the unknown-prompt detector (:mod:`.unknown`) fitted on
   the training split, its threshold from out-of-fold scores; prompts unlike every route take the shared weights.
5. Report (accuracy, per-expert precision/recall, entropy, fallback rate, confusion PNG) and an atomic
   write of the router tensors, ``config.json`` and ``calibration.json`` (in place, or into a copy with
   ``out``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import device as devices
from ..checkpoint import Checkpoint, Fallback, Manifest, RouterTensors, Unknown, names
from ..checkpoint.routers import UnknownTensors, write_router_shard
from ..errors import DataError
from ..io.atomic import atomic_output, check_output
from ..recipe import ROUTER_SCALE
from . import parallel
from .commit import Staged, link_copy
from .data import Defaults, Examples, canonical, data_inputs, holdout_split, load_examples, require_experts
from .diagnostics import confusion_png, format_metrics, routing_metrics
from .entropy import minimise_entropy, spread_prototypes
from .features import pooled_and_segments, token_inputs
from .fit import fallback_threshold, fit_supervised, fit_temperature, standardiser
from .unknown import (
    QUANTILE,
    SEGMENTS,
    TAIL,
    TAILS,
    THRESHOLDS,
    choose_threshold,
    fit_unknown,
    out_of_fold_scores,
    route_thresholds,
    with_route_thresholds,
)

REPORT_FILE = names.REPORT
CONFUSION_FILE = names.CONFUSION
DEFAULT_STEPS = {"supervised": 300, "entropy": 50}
DEFAULT_LR = {"supervised": 0.02, "entropy": 0.05}
REPORT_QUANTILES = (0.9, 0.95, 0.98, 0.99, 0.995, 1.0)  # out-of-fold score quantiles in the report (thresholds
# another --unknown-quantile would choose)


@dataclass
class CalibrateOptions:
    """How to calibrate (the CLI's flags)."""

    method: Literal["supervised", "entropy"] = "supervised"
    holdout: float = 0.2
    seed: int = 0
    steps: int | None = None  # None: DEFAULT_STEPS[method]
    lr: float | None = None  # None: DEFAULT_LR[method]
    fallback: Literal["soft", "shared", "none"] = "soft"
    threshold: float | None = None  # fixed threshold instead of the held-out choice
    batch_size: int = 8
    tokens_per_text: int = 16  # token level: sampled token features per example and unit
    dtype: str | None = None  # None: the checkpoint's
    unknown: Literal["keep", "shared", "none"] = "keep"  # keep: refit the checkpoint's detector if it has one
    unknown_quantile: float = QUANTILE  # share of known (out-of-fold) prompts that stay routed
    unknown_segments: int = SEGMENTS
    unknown_thresholds: Literal["keep", "global", "per_route"] = "keep"  # keep: the checkpoint's (new: THRESHOLDS)
    unknown_tail: Literal["keep", "empirical", "exponential"] = "keep"  # keep: the checkpoint's (new: TAIL)
    device: str = "auto"  # auto: device_map="auto" (GPUs, then CPU memory); cpu / cuda[:N]: all of it there
    defaults: Defaults = field(default_factory=Defaults)

    def check(self) -> None:
        if self.method not in DEFAULT_STEPS:
            raise DataError(None, "method", f"unknown method '{self.method}'; one of supervised, entropy")
        if not (math.isfinite(self.holdout) and 0.0 <= self.holdout < 1.0):
            raise DataError(None, "holdout", f"must be in [0, 1), got {self.holdout}")
        if self.fallback not in ("soft", "shared", "none"):
            raise DataError(None, "fallback", f"unknown fallback mode '{self.fallback}'; one of soft, shared, none")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise DataError(None, "threshold", f"must be in [0, 1], got {self.threshold}")
        for name in ("steps", "batch_size", "tokens_per_text"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DataError(None, name, f"must be an integer >= 1, got {value!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise DataError(None, "lr", f"must be a finite number > 0, got {self.lr}")
        if self.device != "auto":
            devices.resolve(self.device)  # a device this machine lacks fails here, before any work
        if self.defaults.max_samples is not None and self.defaults.max_samples < 1:
            raise DataError(None, "max_samples", f"must be >= 1 (or None for all), got {self.defaults.max_samples}")
        if self.unknown not in ("keep", "shared", "none"):
            raise DataError(None, "unknown", f"unknown mode '{self.unknown}'; one of keep, shared, none")
        if not 0.5 <= self.unknown_quantile <= 1.0:
            raise DataError(None, "unknown_quantile", f"must be in [0.5, 1], got {self.unknown_quantile}")
        if self.unknown_segments < 1:
            raise DataError(None, "unknown_segments", f"must be >= 1, got {self.unknown_segments}")
        if self.unknown_tail not in ("keep", *TAILS):
            raise DataError(None, "unknown_tail", f"unknown tail '{self.unknown_tail}'; one of keep, "
                            + ", ".join(TAILS))
        if self.unknown_thresholds not in ("keep", "global", "per_route"):
            raise DataError(None, "unknown_thresholds", f"unknown mode '{self.unknown_thresholds}'; one of keep, "
                            "global, per_route")

    def per_route(self, manifest: Manifest) -> bool:
        """Whether the detector gets one threshold per route (keep: as the checkpoint's detector, else THRESHOLDS)."""
        if self.unknown_thresholds == "keep":
            return manifest.unknown.per_route if manifest.unknown is not None else THRESHOLDS == "per_route"
        return self.unknown_thresholds == "per_route"

    def tail(self, manifest: Manifest) -> str:
        """How the detector's quantiles are taken: the option, or (keep) the checkpoint's, TAIL for a new one."""
        if self.unknown_tail == "keep":
            return manifest.unknown.tail if manifest.unknown is not None else TAIL
        return self.unknown_tail

    def segments(self, manifest: Manifest) -> int:
        """Segments of the unknown-prompt detector to fit (0: none)."""
        if self.unknown == "none" or manifest.level != "sequence":
            return 0
        if self.unknown == "keep":
            return 0 if manifest.unknown is None else manifest.unknown.segments
        return self.unknown_segments


@dataclass
class Features:
    """Per router prefix: feature rows (M, C) and the example each row belongs to (M,)."""

    rows: dict[str, torch.Tensor]
    owner: torch.Tensor
    n_examples: int
    segments: torch.Tensor | None = None  # (N, S * C) segment means at the sequence router's input, or None

    def select(self, prefix: str, examples: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``examples`` and their position in ``examples``."""
        pos = torch.full((self.n_examples,), -1, dtype=torch.long)
        pos[torch.tensor(examples, dtype=torch.long)] = torch.arange(len(examples))
        where = pos[self.owner]  # (M,)
        keep = where >= 0
        return self.rows[prefix][keep], where[keep]


# ---------------------------------------------------------------- checkpoint and model

def load_model(ckpt: Checkpoint, dtype: str | None, device: str = "auto") -> Any:
    """The checkpoint on this process's device (one process: ``--device auto`` is ``device_map="auto"``, which
    spreads a large model over the available GPUs and CPU memory; ``cpu`` / ``cuda[:N]`` put all of it there)."""
    st = parallel.state()
    if st.num_processes > 1:
        device_map: Any = {"": st.device}
    else:
        device_map = "auto" if device == "auto" else {"": str(devices.resolve(device))}
    return ckpt.load_model(getattr(torch, dtype) if dtype else "auto", device_map)


# ---------------------------------------------------------------- features

def extract(model: Any, tok: Any, examples: Examples, manifest: Manifest, opts: CalibrateOptions) -> Features:
    """Features of every example (sharded across processes), gathered in example order."""
    prefixes = manifest.router_prefixes()
    units = list(dict.fromkeys(prefixes.values()))
    segments = opts.segments(manifest)
    if manifest.level == "sequence":
        def fn(idx: list[int]) -> list[dict[str, torch.Tensor]]:
            feats, segs = pooled_and_segments(model, tok, [examples.texts[i] for i in idx], units, segments,
                                              batch_size=opts.batch_size)
            extra = {SEGMENT_KEY: segs[units[0]]} if segments else {}
            return [{k: v[j:j + 1] for k, v in {**{p: feats[u] for p, u in prefixes.items()}, **extra}.items()}
                    for j in range(len(idx))]
    else:
        def fn(idx: list[int]) -> list[dict[str, torch.Tensor]]:
            return _token_features(model, tok, examples, idx, prefixes, opts)
    per_example = parallel.sharded_map(fn, len(examples))
    owner = torch.cat([torch.full((f[next(iter(prefixes))].shape[0],), i) for i, f in enumerate(per_example)])
    rows = {p: torch.cat([f[p] for f in per_example]) for p in prefixes}
    segs = torch.cat([f[SEGMENT_KEY] for f in per_example]) if segments else None
    return Features(rows, owner.long(), len(examples), segs)


SEGMENT_KEY = "#segments"  # not a router prefix


def _token_features(model: Any, tok: Any, examples: Examples, idx: list[int], prefixes: dict[str, str],
                    opts: CalibrateOptions) -> list[dict[str, torch.Tensor]]:
    """Per example of ``idx``: {prefix: (k, C)}, the route forced to its expert (unlabelled: routed)."""
    units = list(dict.fromkeys(prefixes.values()))
    out: dict[int, dict[str, torch.Tensor]] = {}
    for label in sorted({examples.labels[i] for i in idx}):
        group = [i for i in idx if examples.labels[i] == label]
        model.force_route(label if label >= 0 else None)
        try:
            feats = token_inputs(model, tok, [examples.texts[i] for i in group], units,
                                 per_text=opts.tokens_per_text, seed=opts.seed, batch_size=opts.batch_size)
        finally:
            model.force_route(None)
        for j, i in enumerate(group):
            out[i] = {p: feats[u][j] for p, u in prefixes.items()}
    return [out[i] for i in idx]


# ---------------------------------------------------------------- evaluation

def example_probs(routers: dict[str, RouterTensors], feats: Features, examples: list[int]) -> torch.Tensor:
    """(len(examples), E): each example's route probabilities, averaged over its rows and all routers (the
    sequence route itself at sequence level; a token-level vote otherwise)."""
    total = None
    for prefix, router in routers.items():
        x, pos = feats.select(prefix, examples)
        probs = router.probs(x)  # (M, E)
        sums = torch.zeros(len(examples), probs.shape[1]).index_add_(0, pos, probs)
        counts = torch.bincount(pos, minlength=len(examples)).clamp_min(1)[:, None]
        total = sums / counts if total is None else total + sums / counts
    assert total is not None
    return total / len(routers)


def labels_of(examples: Examples, idx: list[int]) -> torch.Tensor:
    return torch.tensor([examples.labels[i] for i in idx], dtype=torch.long)


# ---------------------------------------------------------------- fitting

def fit_routers(feats: Features, examples: Examples, train: list[int], opts: CalibrateOptions,
                init_scale: float) -> dict[str, RouterTensors]:
    """Supervised: one router per prefix from its training rows."""
    n_exp = len(examples.experts)
    y_ex = labels_of(examples, train)
    out = {}
    for prefix in feats.rows:
        x, pos = feats.select(prefix, train)
        out[prefix] = fit_supervised(x, y_ex[pos], n_exp, steps=opts.steps or DEFAULT_STEPS["supervised"],
                                     lr=opts.lr or DEFAULT_LR["supervised"], init_scale=init_scale)
    return out


def temper(routers: dict[str, RouterTensors], feats: Features, examples: Examples,
           held: list[int]) -> tuple[dict[str, RouterTensors], dict[str, float]]:
    """Per router, the held-out temperature folded into scale and bias."""
    y_ex = labels_of(examples, held)
    out, temps = {}, {}
    for prefix, router in routers.items():
        x, pos = feats.select(prefix, held)
        temps[prefix] = fit_temperature(router.logits(x), y_ex[pos])
        out[prefix] = router.tempered(temps[prefix])
    return out, temps


def entropy_routers(model: Any, tok: Any, feats: Features, examples: Examples, train: list[int],
                    old: dict[str, RouterTensors], initialized: bool,
                    opts: CalibrateOptions) -> dict[str, RouterTensors]:
    """Entropy minimisation from the stored routers (an uninitialised one starts near uniform)."""

    inits, stats = {}, {}
    for prefix, router in old.items():
        x, _ = feats.select(prefix, train)
        mu, s = standardiser(x)
        stats[prefix] = (mu, s)
        if initialized:
            inits[prefix] = RouterTensors(spread_prototypes(router.prototypes, opts.seed), router.center,
                                          router.scale, router.bias)
        else:  # random directions at scale 1: a near-uniform start that the objective has to sharpen
            inits[prefix] = RouterTensors(spread_prototypes(router.prototypes, opts.seed), mu, torch.ones(()),
                                          router.bias)
    return minimise_entropy(model, tok, [examples.texts[i] for i in train], inits, stats,
                            steps=opts.steps or DEFAULT_STEPS["entropy"], lr=opts.lr or DEFAULT_LR["entropy"],
                            batch_size=opts.batch_size, seed=opts.seed)


def choose_fallback(probs: torch.Tensor, y: torch.Tensor, manifest: Manifest,
                    opts: CalibrateOptions) -> Fallback | None:
    """The manifest's ``fallback`` (sequence level only; token level ignores fallback)."""
    if manifest.level != "sequence" or opts.fallback == "none":
        return None
    threshold = opts.threshold
    if threshold is None:
        if probs.shape[0] == 0 or bool((y < 0).any()):
            return manifest.fallback  # nothing labelled to choose on: keep what is there
        top = probs.max(-1)
        threshold = fallback_threshold(top.values, top.indices == y, probs.shape[1])
    return Fallback(round(float(threshold), 6), opts.fallback)


def unknown_detector(feats: Features, examples: Examples, train: list[int], held: list[int], manifest: Manifest,
                     opts: CalibrateOptions, old: dict[str, RouterTensors],
                     dtype: torch.dtype) -> tuple[UnknownTensors | None, Unknown | None, dict[str, Any] | None]:
    """The unknown-prompt detector (fitted on the training split, in the checkpoint's dtype), its manifest
    block and its report; (None, None, None) when there is none to fit."""
    segments = opts.segments(manifest)
    if not segments:
        return None, None, None
    if not examples.labelled:  # entropy calibration: nothing to fit the route means on
        if opts.unknown == "shared":
            raise DataError(None, "unknown", "the unknown-prompt detector needs labelled data (--method supervised)")
        return next(iter(old.values())).unknown, manifest.unknown, None
    assert feats.segments is not None
    x, y = feats.segments[train], labels_of(examples, train)  # (N, S * C), (N,)
    n_out = len(examples.experts)
    per_route, tail = opts.per_route(manifest), opts.tail(manifest)
    oof = out_of_fold_scores(x, y, n_out, seed=opts.seed, own=per_route)  # (N,)
    det = fit_unknown(x, y, n_out)
    chosen = f"{opts.unknown_quantile:g}"  # the report's thresholds at each quantile, the chosen one among them
    quantiles = {f"{q:g}": q for q in sorted({*REPORT_QUANTILES, opts.unknown_quantile})}
    if per_route:  # (O,) per quantile; the scalar threshold is the loosest route's
        table = {k: route_thresholds(oof, y, n_out, q, tail) for k, q in quantiles.items()}
        det, threshold = with_route_thresholds(det, table[chosen])
    else:
        scalars = {k: choose_threshold(oof, q, tail) for k, q in quantiles.items()}
        threshold = scalars[chosen]
    det = det.map(lambda t: t.to(dtype).float())
    spec = Unknown(round(threshold, 6), segments, det.factor.shape[0], det.background_factor.shape[0],
                   per_route=per_route, tail=tail)
    held_x = feats.segments[held] if held else x
    rate = float((det.score(held_x) > spec.threshold).float().mean()) if len(held_x) else 0.0
    report = {**spec.to_dict(), "quantile": opts.unknown_quantile,
              "known_fallback_rate": rate, "evaluated_on": "heldout" if held else "train"}
    if per_route:  # each route's own threshold at the report's quantiles; the scalar one is the loosest route's
        report["out_of_fold_quantiles"] = {q: round(float(t.max()), 6) for q, t in table.items()}
        report["route_thresholds"] = {name: {q: round(float(t[o]), 6) for q, t in table.items()}
                                      for o, name in enumerate(examples.experts)}
    else:  # the thresholds another --unknown-quantile would choose
        report["out_of_fold_quantiles"] = {q: round(t, 6) for q, t in scalars.items()}
    return det, spec, report


# ---------------------------------------------------------------- the command

def prepare(checkpoint: str | Path, data: str | Path | dict[str, Any], out: str | Path | None, force: bool,
            opts: CalibrateOptions, examples: Examples | None) -> tuple[Checkpoint, Examples]:
    """Everything that can fail on user input, before any model is loaded: options, checkpoint, output
    folder, DATA (every row), the per-expert counts."""
    opts.check()
    ckpt = Checkpoint.open(checkpoint, routed=True)
    if out is not None and Path(out).resolve() != ckpt.folder.resolve():
        check_output(Path(out).absolute(), force, [("checkpoint", ckpt.folder), *data_inputs(data)])
    experts = list(ckpt.require_routed().outputs)
    if examples is None:
        examples = load_examples(data, experts, ckpt.tokenizer(), opts.defaults,
                                 require_labels=opts.method == "supervised")
    if opts.method == "supervised":
        require_experts(examples, experts, str(data) if not isinstance(data, dict) else "data")
    return ckpt, canonical(examples)


def calibrate(checkpoint: str | Path, data: str | Path | dict[str, Any], *, out: str | Path | None = None,
              force: bool = False, options: CalibrateOptions | None = None,
              examples: Examples | None = None) -> dict[str, Any] | None:
    """Calibrate the router of ``checkpoint`` from DATA; returns the report (None on non-main processes).

    In place (atomically) unless ``out`` is given, in which case the checkpoint is copied there first
    (weight shards hard-linked) and only the copy changes.  ``examples`` skips loading DATA (already loaded
    and checked by the caller)."""
    clock = Clock()
    opts = options or CalibrateOptions()
    ckpt, examples = prepare(checkpoint, data, out, force, opts, examples)
    train, held = holdout_split(examples.labels, opts.holdout, opts.seed, examples.experts)
    clock.lap("data_s")
    model, tok = load_model(ckpt, opts.dtype, opts.device), ckpt.tokenizer()
    clock.lap("load_s")
    feats = extract(model, tok, examples, ckpt.require_routed(), opts)
    clock.lap("features_s")
    if not parallel.is_main():
        return None
    result = fit_and_report(model, tok, ckpt, examples, feats, train, held, opts)
    clock.lap("fit_s")
    del model
    report = result["report"]
    report.update(timing=clock.laps, processes=parallel.state().num_processes, data=examples.spec)
    report["timing"]["total_s"] = clock.total()  # up to the write
    target = write_result(ckpt, None if out is None else Path(out), force, result)
    report["checkpoint"] = str(target)
    return report


class Clock:
    """Named laps in seconds."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now

    def total(self) -> float:
        return time.perf_counter() - self.start


def fit_and_report(model: Any, tok: Any, ckpt: Checkpoint, examples: Examples, feats: Features, train: list[int],
                   held: list[int], opts: CalibrateOptions) -> dict[str, Any]:
    """New routers, the fallback block and the report (no I/O besides reading the stored routers)."""
    manifest = ckpt.require_routed()
    old = ckpt.routers()
    initialized = manifest.initialized
    recipe = ckpt.recipe()
    init_scale = recipe.routing.router.scale if recipe and recipe.routing else ROUTER_SCALE
    dtype = ckpt.router_dtype()
    temps: dict[str, float] = {}
    if opts.method == "supervised":
        new = fit_routers(feats, examples, train, opts, init_scale)
        if held:
            new, temps = temper(new, feats, examples, held)
    else:
        new = entropy_routers(model, tok, feats, examples, train, old, initialized, opts)
    new = {p: r.cast(dtype) for p, r in new.items()}
    detector, unknown, unknown_report = unknown_detector(feats, examples, train, held, manifest, opts, old, dtype)
    new = {p: r.with_unknown(detector) for p, r in new.items()}
    eval_idx = held or train
    y_eval = labels_of(examples, eval_idx)
    probs = example_probs(new, feats, eval_idx)
    fallback = choose_fallback(probs, y_eval, manifest, opts)
    threshold = fallback.threshold if fallback else None
    old_fb = manifest.fallback if manifest.level == "sequence" else None
    report = {
        "method": opts.method, "level": manifest.level, "experts": examples.experts,
        "seed": opts.seed, "holdout": opts.holdout, "evaluated_on": "heldout" if held else "train",
        "n_train": _count(examples, train), "n_heldout": _count(examples, held),
        "steps": opts.steps or DEFAULT_STEPS[opts.method], "lr": opts.lr or DEFAULT_LR[opts.method],
        "temperature": temps, "fallback": None if fallback is None else fallback.to_dict(),
        "heldout": routing_metrics(probs, y_eval, examples.experts, threshold),
        "before": routing_metrics(example_probs(old, feats, eval_idx), y_eval, examples.experts,
                                  old_fb.threshold if old_fb else None),
        "train_accuracy": routing_metrics(example_probs(new, feats, train), labels_of(examples, train),
                                          examples.experts).get("accuracy"),
    }
    report["accuracy"] = report["heldout"].get("accuracy")  # the headline number (read by `moerge inspect`)
    report["unknown"] = unknown_report
    return {"routers": new, "fallback": fallback, "unknown": unknown, "report": report}


def _count(examples: Examples, idx: list[int]) -> dict[str, int]:
    sub = examples.subset(idx)
    counts = sub.counts()
    unlabelled = sum(1 for y in sub.labels if y < 0)
    return {**counts, "(unlabelled)": unlabelled} if unlabelled else counts


# ---------------------------------------------------------------- writing

def write_result(ckpt: Checkpoint, out: Path | None, force: bool, result: dict[str, Any]) -> Path:
    """Write in place, or into a hard-linked copy at ``out`` that replaces ``out`` only when complete."""
    folder = ckpt.folder
    if out is None or out.resolve() == folder.resolve():
        stage_and_commit(folder, ckpt, result)
        return folder
    with atomic_output(out, force, [("checkpoint", folder)]) as tmp:
        link_copy(folder, tmp)
        stage_and_commit(tmp, ckpt, result, private=True)
    return out


def stage_and_commit(folder: Path, ckpt: Checkpoint, result: dict[str, Any], *, private: bool = False) -> None:
    """Router shard, config.json, calibration.json and the confusion PNG, swapped in together (``private``: the
    folder is an output being assembled, nobody reads it yet)."""
    staged = Staged(folder, private=private)
    try:
        write_router_shard(staged.path(names.ROUTER_SHARD), result["routers"], ckpt.router_dtype())
        config = ckpt.config_with(ckpt.require_routed().calibrated(result["fallback"], result.get("unknown")))
        staged.write_text(names.CONFIG, json.dumps(config, indent=2) + "\n")
        report = result["report"]
        conf = report["heldout"].get("confusion")
        if conf is not None:
            split = "held-out" if report["evaluated_on"] == "heldout" else report["evaluated_on"]
            title = f"routing on the {split} split ({report['method']})"
            confusion_png(conf, report["experts"], staged.path(CONFUSION_FILE), title)
            report["confusion_png"] = CONFUSION_FILE
        staged.write_text(REPORT_FILE, json.dumps(report, indent=2) + "\n")
    except BaseException:
        staged.discard()
        raise
    staged.commit()


def format_report(report: dict[str, Any]) -> str:
    """The report as printed by the CLI."""
    split = report["evaluated_on"]
    n_train, n_held = sum(report["n_train"].values()), sum(report["n_heldout"].values())
    head = (f"calibrated {report['checkpoint']} ({report['method']}, {report['level']} level, {n_train} training / "
            f"{n_held} held-out examples)")
    lines = [head]
    lines.append(format_metrics(report["before"], f"before, {split} split"))
    lines.append(format_metrics(report["heldout"], f"after, {split} split"))
    if report["temperature"]:
        lines.append("temperature: " + ", ".join(f"{t:.3g}" for t in report["temperature"].values()))
    fb = report["fallback"]
    lines.append("fallback: " + ("none" if not fb else f"threshold {fb['threshold']:.4f}, mode {fb['mode']}"))
    unk = report.get("unknown")
    if unk:
        lines.append(f"unknown prompts -> shared weights: score > {unk['threshold']:.4f} ({unk['segments']} segments);"
                     f" known prompts flagged {unk['known_fallback_rate']:.4f} ({unk['evaluated_on']} split)")
    t = report["timing"]
    lines.append(f"time: {t['total_s']:.1f} s (load {t['load_s']:.1f}, features {t['features_s']:.1f}, "
                 f"fit {t['fit_s']:.1f}; {report['processes']} process(es))")
    lines.append(f"wrote {Path(report['checkpoint']) / REPORT_FILE}"
                 + (f" and {CONFUSION_FILE}" if report.get("confusion_png") else ""))
    return "\n".join(lines)
