"""The ``moerge`` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 user error (one line ``error: <file>: <field>: <what is wrong>``, no traceback
unless ``--debug``; bad command-line arguments too: ``error: --batch-size: must be an integer >= 1, got '0'``),
130 / 143 interrupted by SIGINT / SIGTERM (both clean up like Ctrl-C: no partial output is left), 1 unexpected
failure.  Warnings print as one ``warning: ...`` line each.  The CLI never runs code from a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .cliargs import Parser, device_arg, int_at_least, size
from .errors import MoergeError, OutputError
from .recipe import Recipe


class Terminated(KeyboardInterrupt):
    """SIGTERM (a plain ``kill``, job schedulers, systemd, Kubernetes), raised like Ctrl-C so cleanup runs."""


def _recipe(args: argparse.Namespace) -> Recipe:
    from .recipe import load_recipe

    return load_recipe(args.recipe, overrides=args.set)


def cmd_build(args: argparse.Namespace) -> int:
    from .pipeline import build

    recipe = _recipe(args)
    recipe.allow_pickle = recipe.allow_pickle or args.allow_pickle
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    out = build(recipe, args.out, force=args.force, progress=not args.quiet, file=str(args.recipe),
                device=args.device)
    print(f"wrote {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .pipeline.preflight import preflight

    recipe = _recipe(args)
    recipe.allow_pickle = recipe.allow_pickle or args.allow_pickle
    preflight(recipe, str(args.recipe))
    print(f"{args.recipe}: ok ({len(recipe.experts)} experts, merge {recipe.merge.method}"
          f"{', routed' if recipe.routing else ''})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint.summary import inspect_checkpoint

    print(inspect_checkpoint(Path(args.checkpoint)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .serve import generate_text

    for text in generate_text(Path(args.checkpoint), " ".join(args.prompt), max_new_tokens=args.max_new_tokens,
                              chat=args.chat, route=args.route, do_sample=args.sample):
        print(text)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .pipeline import analyze_text

    recipe = _recipe(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        report_folder(out, recipe)
    print(analyze_text(recipe, out, file=str(args.recipe), progress=not args.quiet, device=args.device))
    return 0


def report_folder(out: Path, recipe: Recipe) -> None:
    """``analyze --out``: a folder (made now, before the analysis) that is not one of the recipe's inputs."""
    from .io.atomic import check_inputs
    from .pipeline.preflight import recipe_inputs

    check_inputs(out, recipe_inputs(recipe))
    if out.exists() and not out.is_dir():
        raise OutputError(out, None, "output path exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, None, f"cannot create the folder ({exc.strerror})") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from .pipeline import plan_text

    print(plan_text(_recipe(args), file=str(args.recipe), device=args.device))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import REPORT_FILE, export_checkpoint
    from .export.report import report_lines

    out = export_checkpoint(Path(args.checkpoint), args.to, Path(args.out), force=args.force, progress=not args.quiet,
                            experts_per_token=args.experts_per_token, calibrate=args.calibrate,
                            from_data=args.from_data, shard_size=args.shard_size,
                            materialize=args.materialize, report=not args.no_report, device=args.device)
    if (out / REPORT_FILE).is_file():
        print("\n".join(report_lines(json.loads((out / REPORT_FILE).read_text()))))
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.workdir), force=args.force)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="moerge", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "build": (cmd_build, "build a merged or routed checkpoint from a recipe"),
        "validate": (cmd_validate, "check a recipe and its inputs without building"),
        "inspect": (cmd_inspect, "print a checkpoint's tensors and storage breakdown"),
        "generate": (cmd_generate, "generate text from a checkpoint"),
        "analyze": (cmd_analyze, "per-layer conflict metrics of a recipe's experts"),
        "plan": (cmd_plan, "print which units are merged or routed, and their bytes"),
        "export": (cmd_export, "write a moerge checkpoint as a native Mixtral / Qwen2-MoE / Qwen3-MoE model"),
        "demo": (cmd_demo, "build the bundled tiny demo, load it and generate"),
    }
    ps = {name: sub.add_parser(name, help=help_) for name, (_, help_) in commands.items()}
    for name, p in ps.items():
        _common(p)
        p.set_defaults(func=commands[name][0])
    for name in ("build", "validate", "analyze", "plan"):
        _recipe_args(ps[name])
    for name in ("build", "analyze", "plan", "export"):
        device_arg(ps[name])
    ps["build"].add_argument("out", help="output folder")
    ps["build"].add_argument("--force", action="store_true", help="replace a non-empty output folder")
    for name in ("build", "validate"):
        ps[name].add_argument("--allow-pickle", action="store_true", help="read .bin checkpoints (weights_only)")
    ps["analyze"].add_argument("--out", help="folder for conflict.json and the heatmap PNG")
    ps["inspect"].add_argument("checkpoint")
    g = ps["generate"]
    g.add_argument("checkpoint")
    g.add_argument("prompt", nargs="+", help="the prompt (several words are joined with spaces)")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt with the chat template")
    g.add_argument("--route", help="force the route to this expert (moerge checkpoints)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    x = ps["export"]
    x.add_argument("checkpoint", help="a built moerge checkpoint (routed MLP units)")
    x.add_argument("--to", required=True, choices=["mixtral", "qwen2_moe", "qwen3_moe"], help="native format")
    x.add_argument("out", help="output folder")
    x.add_argument("--experts-per-token", type=int_at_least(1), help="top-k (default: the checkpoint's top_k, else 2)")
    x.add_argument("--calibrate", action="store_true", help="fit the gate rows on the recipe's calibration data")
    x.add_argument("--from-data", action="store_true", help="measure the gate rows from the recipe's calibration "
                                                            "data even when the checkpoint has token prototypes")
    x.add_argument("--shard-size", type=size, default=10**9, help="output shard size (default 1GB)")
    x.add_argument("--materialize", action="store_true", help="write twin / lora / bit1 / sparse / wemoe experts as "
                                                              "dense W_s + delta_e")
    x.add_argument("--no-report", action="store_true", help="skip the logit comparison with the checkpoint "
                                                            "(export_report.json; loads both models in float32)")
    x.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    ps["demo"].add_argument("--workdir", default="demo_out", help="where the tiny models and the MoE go")
    ps["demo"].add_argument("--force", action="store_true")
    _register_late(sub)
    return ap


def _register_late(sub: argparse._SubParsersAction) -> None:
    """Subcommands that live in their own modules (calibration, add-expert)."""
    from .routing.cli import add_commands

    add_commands(sub, _common)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument (already printed as one line)
        return exc.code if isinstance(exc.code, int) else 2
    with _sigterm_as_interrupt(), _one_line_warnings():
        try:
            return int(args.func(args) or 0)
        except MoergeError as exc:
            if args.debug:
                traceback.print_exc()
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a path the system refuses (name too long, symlink loop, ...): the user's to fix
            if not exc.filename or args.debug:
                raise
            print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            if args.debug:
                traceback.print_exc()
            terminated = isinstance(exc, Terminated)
            print(f"error: interrupted{' (SIGTERM)' if terminated else ''}", file=sys.stderr)
            return 143 if terminated else 130


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn the first SIGTERM into :class:`Terminated` (later ones are ignored while cleanup runs)."""
    fired = []

    def handler(signum: int, frame: Any) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings print as ``warning: <message>`` (no file, line or source); recorders still see them."""
    previous = warnings.formatwarning

    def one_line(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        return f"warning: {' '.join(str(message).split())}\n"

    warnings.formatwarning = one_line  # type: ignore[assignment]
    try:
        yield
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    raise SystemExit(main())
