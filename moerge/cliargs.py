"""Argument types of the command line: every bad value is one line ``error: --flag: what``, exit 2.

Shared by :mod:`moerge.cli` and the subcommands registered from their own modules (:mod:`moerge.routing.cli`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from .recipe import parse_size


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def finite_float(low: float | None = None, high: float | None = None, *, open_low: bool = False,
                 open_high: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (ends excluded where open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (low is None or (value > low if open_low else value >= low)) and (
            high is None or (value < high if open_high else value <= high))
        if not ok:
            if high is None:
                where = "" if low is None else f" {'>' if open_low else '>='} {low}"
            else:
                where = f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number{where}, got {text!r}")
        return value

    return parse


def size(text: str) -> int:

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line ``error: --flag: what`` instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("argument "):
            message = message.removeprefix("argument ")
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="where to compute: auto (the first GPU if there is one), cpu, "
                                                    "cuda or cuda:N")
