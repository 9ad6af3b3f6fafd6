"""``moerge calibrate``, ``add-expert`` and ``remove-expert``: registered on the main parser by
``moerge.cli._register_late``.

All are thin: they turn flags into :class:`~moerge.routing.calibrate.CalibrateOptions` and call
:func:`moerge.routing.calibrate.calibrate` (or :func:`moerge.routing.compose.compose` with ``--compose``),
:func:`moerge.routing.add_expert.add_expert` / :func:`moerge.routing.remove_expert.remove_expert`.  Under
``accelerate launch`` only the main process prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..cliargs import device_arg, finite_float, int_at_least
from .data import Defaults

UNKNOWN_QUANTILE = 0.995  # = routing.unknown.QUANTILE (kept here so that building the parser imports no torch)

if TYPE_CHECKING:
    from .calibrate import CalibrateOptions


def _options(args: argparse.Namespace) -> CalibrateOptions:
    from .calibrate import CalibrateOptions

    defaults = Defaults(field=args.field, label_field=args.label_field, split=args.split,
                        max_samples=args.max_samples or None, chat_template=args.chat_template)
    return CalibrateOptions(method=args.method, holdout=args.holdout, seed=args.seed, steps=args.steps, lr=args.lr,
                            fallback=args.fallback, threshold=args.threshold, batch_size=args.batch_size,
                            tokens_per_text=args.tokens_per_text, dtype=args.dtype, device=args.device,
                            unknown=args.unknown, unknown_quantile=args.unknown_quantile,
                            unknown_thresholds=args.unknown_thresholds, unknown_tail=args.unknown_tail,
                            defaults=defaults)


def _quiet(args: argparse.Namespace) -> None:
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()


def _print(report: dict | None) -> None:
    from .calibrate import format_report

    if report is not None:
        print(format_report(report))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    _quiet(args)
    if args.compose:
        return _compose(args)
    _print(calibrate(args.checkpoint, args.data, out=args.out, force=args.force, options=_options(args)))
    return 0


def _compose(args: argparse.Namespace) -> int:
    from .compose import ComposeOptions, compose

    over = None if args.compose_over is None else [e for e in args.compose_over.split(",") if e.strip()]
    copts = ComposeOptions(over=over, level=args.compose_level, steps=args.compose_steps, lr=args.compose_lr,
                           answer_field=args.answer_field, max_samples=args.compose_samples)
    report = compose(args.checkpoint, args.data, args.compose, out=args.out, force=args.force,
                     options=_options(args), compose_options=copts)
    c = report["compose"]
    print(f"composed route '{c['route']}' over {', '.join(c['over'])} ({c['level']} weights, {c['n']} examples): "
          f"answer loss {c['start_losses'][c['start']]:.4f} ({c['start']}) -> {c['final_loss']:.4f} in "
          f"{c['fit_s']:.0f} s")
    _print(report)
    return 0


def cmd_add_expert(args: argparse.Namespace) -> int:
    from .add_expert import add_expert

    _quiet(args)
    _print(add_expert(args.checkpoint, args.name, args.source, args.data, base=args.base, out=args.out,
                      force=args.force, options=_options(args), anchor=args.anchor, rank=args.rank))
    return 0


def cmd_remove_expert(args: argparse.Namespace) -> int:
    from .remove_expert import remove_expert

    _quiet(args)
    result = remove_expert(args.checkpoint, args.name, out=args.out, force=args.force, data=args.data,
                           options=_options(args))
    extra = ""
    if result["what"] == "expert":
        extra = (f" ({result['tensors_dropped']} tensors, {result['bytes_dropped'] / 1e6:.1f} MB dropped; "
                 f"{result['tensors_renamed']} renumbered in {result['shards_rewritten']} rewritten shard(s))")
    print(f"removed {result['what']} '{result['removed']}' from {result['checkpoint']}{extra}")
    _print(result["calibration"])
    return 0


def _calibration_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    p.add_argument("checkpoint", help="a built moerge checkpoint folder")
    p.add_argument("--data", required=data_required, help="YAML/JSON mapping expert -> data source, or one table "
                                                          "with a text column and an `expert` column")
    p.add_argument("--method", choices=["supervised", "entropy"], default="supervised")
    p.add_argument("--holdout", type=finite_float(0, 1, open_high=True), default=0.2, help="held-out fraction per expert (default 0.2)")
    p.add_argument("--out", help="write a calibrated copy here instead of changing the checkpoint in place")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="held-out split and sampling seed")
    p.add_argument("--steps", type=int_at_least(1), help="optimiser steps (default 300 supervised, 50 entropy)")
    p.add_argument("--lr", type=finite_float(0, open_low=True), help="learning rate (default 0.02 supervised, 0.05 entropy)")
    p.add_argument("--fallback", choices=["soft", "shared", "none"], default="soft",
                   help="below the confidence threshold use the soft mix or the shared weights (sequence level)")
    p.add_argument("--threshold", type=finite_float(0, 1), help="fixed fallback threshold instead of the held-out choice")
    p.add_argument("--unknown", choices=["keep", "shared", "none"], default="keep",
                   help="prompts unlike every known task take the shared weights: `shared` fits the detector, "
                        "`none` drops it, `keep` (default) refits it where the checkpoint has one (sequence level)")
    p.add_argument("--unknown-quantile", type=finite_float(0.5, 1), default=UNKNOWN_QUANTILE,
                   help=f"share of known (out-of-fold) calibration prompts the detector keeps routed, per route with "
                        f"per-route thresholds (default {UNKNOWN_QUANTILE}; 0.98 suits --unknown-thresholds global)")
    p.add_argument("--unknown-thresholds", choices=["keep", "global", "per_route"], default="keep",
                   help="one detector threshold for all routes, or one per route (each keeps --unknown-quantile of its "
                        "own prompts); keep (default): the checkpoint's choice, per_route for a new detector")
    p.add_argument("--unknown-tail", choices=["keep", "empirical", "exponential"], default="keep",
                   help="detector thresholds as empirical quantiles of the calibration prompts' scores, or from an "
                        "exponential tail fitted above their 0.9 quantile (may lie beyond the largest score); keep "
                        "(default): the checkpoint's choice, exponential for a new detector")
    p.add_argument("--field", default="prompt", help="text field of the data (default prompt)")
    p.add_argument("--label-field", default="expert", help="label column of a table (default expert)")
    p.add_argument("--split", default="train", help="split of hub datasets (default train)")
    p.add_argument("--max-samples", type=int_at_least(0), default=64, help="examples per expert (default 64; 0 = all)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap texts as a user message with the chat template (sources may set chat_template)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--tokens-per-text", type=int_at_least(1), default=16, help="token level: sampled tokens per example")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the checkpoint's")
    device_arg(p)


def add_commands(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``calibrate``, ``add-expert`` and ``remove-expert``."""
    cal = sub.add_parser("calibrate", help="fit a built checkpoint's router from a little task data")
    common(cal)
    _calibration_args(cal)
    cal.add_argument("--compose", metavar="NAME", help="learn a route NAME for the task of DATA (a table of prompt "
                                                       "-> answer rows) as a mix of the existing experts")
    cal.add_argument("--compose-over", metavar="A,B", help="experts the route may mix (default: all)")
    cal.add_argument("--compose-level", choices=["unit", "layer", "global"], default="layer",
                     help="one weight per expert and routed unit, per layer (default) or for the whole model")
    cal.add_argument("--compose-steps", type=int, default=12, help="Adam steps over the examples (default 12)")
    cal.add_argument("--compose-lr", type=float, default=0.1, help="learning rate of the route weights (default 0.1)")
    cal.add_argument("--compose-samples", type=int, default=32, help="examples to learn from (default 32)")
    cal.add_argument("--answer-field", default="answer", help="answer column of the --compose data (default answer)")
    cal.set_defaults(func=cmd_calibrate)
    add = sub.add_parser("add-expert", help="add an expert to a built checkpoint and recalibrate its router")
    common(add)
    _calibration_args(add)
    add.add_argument("--name", required=True, help="the new expert's name")
    add.add_argument("--source", required=True, help="full checkpoint or LoRA adapter of the same base")
    add.add_argument("--base", help="the base model folder (default: `base` of the checkpoint's moerge_recipe.yaml)")
    add.add_argument("--no-anchor", dest="anchor", action="store_false",
                     help="store a full expert against the shared weight only, not against its least-squares fit by "
                          "the stored experts (the default, where the unit's kind allows)")
    add.add_argument("--rank", type=int_at_least(1), help="a full expert's rank in twin units (default: each "
                     "linear's largest stored rank); more bytes, a closer copy of the expert (real full fine-tunes of a 135M "
                     "model: 64 keeps 0.93-1.01 of an added expert's accuracy, 128 0.975-1.03, bench/RESULTS.md)")
    add.set_defaults(func=cmd_add_expert)
    rem = sub.add_parser("remove-expert", help="drop an expert (or composed route) from a built checkpoint")
    common(rem)
    _calibration_args(rem, data_required=False)
    rem.add_argument("name", help="the expert or composed route to remove")
    rem.set_defaults(func=cmd_remove_expert)
