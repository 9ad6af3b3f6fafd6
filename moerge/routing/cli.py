"""``moerge calibrate`` and ``moerge add-expert``: registered on the main parser by ``moerge.cli._register_late``.

Both are thin: they turn flags into :class:`~moerge.routing.calibrate.CalibrateOptions` and call
:func:`moerge.routing.calibrate.calibrate` / :func:`moerge.routing.add_expert.add_expert`.  Under
``accelerate launch`` only the main process prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..cliargs import device_arg, finite_float, int_at_least
from .data import Defaults

if TYPE_CHECKING:
    from .calibrate import CalibrateOptions


def _options(args: argparse.Namespace) -> CalibrateOptions:
    from .calibrate import CalibrateOptions

    defaults = Defaults(field=args.field, label_field=args.label_field, split=args.split,
                        max_samples=args.max_samples or None, chat_template=args.chat_template)
    return CalibrateOptions(method=args.method, holdout=args.holdout, seed=args.seed, steps=args.steps, lr=args.lr,
                            fallback=args.fallback, threshold=args.threshold, batch_size=args.batch_size,
                            tokens_per_text=args.tokens_per_text, dtype=args.dtype, device=args.device,
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
    _print(calibrate(args.checkpoint, args.data, out=args.out, force=args.force, options=_options(args)))
    return 0


def cmd_add_expert(args: argparse.Namespace) -> int:
    from .add_expert import add_expert

    _quiet(args)
    _print(add_expert(args.checkpoint, args.name, args.source, args.data, base=args.base, out=args.out,
                      force=args.force, options=_options(args)))
    return 0


def _calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a built moerge checkpoint folder")
    p.add_argument("--data", required=True, help="YAML/JSON mapping expert -> data source, or one table with a "
                                                 "text column and an `expert` column")
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
    """Register ``calibrate`` and ``add-expert``."""
    cal = sub.add_parser("calibrate", help="fit a built checkpoint's router from a little task data")
    common(cal)
    _calibration_args(cal)
    cal.set_defaults(func=cmd_calibrate)
    add = sub.add_parser("add-expert", help="add an expert to a built checkpoint and recalibrate its router")
    common(add)
    _calibration_args(add)
    add.add_argument("--name", required=True, help="the new expert's name")
    add.add_argument("--source", required=True, help="full checkpoint or LoRA adapter of the same base")
    add.add_argument("--base", help="the base model folder (default: `base` of the checkpoint's moerge_recipe.yaml)")
    add.set_defaults(func=cmd_add_expert)
