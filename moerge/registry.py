"""A small generic registry: name -> object, with "did you mean" errors.

Merge methods, routed-expert kinds and selection rules register themselves where they are defined, so adding
one touches at most two files (its own module and, if new, an import line).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import RecipeError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """Named objects of one kind (``what`` is used in error messages, e.g. "merge method")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str, *, file: str | None = None, field: str | None = None) -> T:
        if name not in self._items:
            choices = ", ".join(sorted(self._items))
            raise RecipeError(
                file, field, f"unknown {self.what} '{name}'{did_you_mean(name, self.names())}; one of: {choices}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
