"""The typed manifest of a moerge checkpoint: ``config.json["moerge"]`` as dataclasses.

The build writes it (:meth:`Manifest.to_dict`), and calibrate, add-expert, remove-expert, export, inspect and
serve read it (:meth:`Manifest.from_dict`), so no caller indexes the raw dict by string.  The JSON layout is
the one of ``docs/FORMAT.md`` (version 1) and what ``modeling_moerge.py`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import CheckpointError
from . import names

Shapes = dict[str, tuple[int, ...]]  # stored tensor name of one expert -> shape


@dataclass(frozen=True)
class LinearSpec:
    """One routed linear: whether it has a bias, and each expert's stored tensor shapes."""

    bias: bool
    experts: tuple[Shapes, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"bias": self.bias, "experts": [{k: list(s) for k, s in e.items()} for e in self.experts]}

    @classmethod
    def from_dict(cls, raw: Any, file: str, where: str) -> LinearSpec:
        experts = _get(raw, "experts", list, file, where)
        return cls(bool(raw.get("bias", False)), tuple(
            {str(k): tuple(int(d) for d in s) for k, s in _mapping(e, file, f"{where}.experts").items()}
            for e in experts))


@dataclass(frozen=True)
class UnitSpec:
    """One routed unit: its expert kind and its routed linears (names relative to the unit)."""

    kind: str
    linears: dict[str, LinearSpec]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "linears": {n: lin.to_dict() for n, lin in self.linears.items()}}

    @classmethod
    def from_dict(cls, raw: Any, file: str, where: str) -> UnitSpec:
        lins = _get(raw, "linears", dict, file, where)
        return cls(_get(raw, "kind", str, file, where),
                   {str(n): LinearSpec.from_dict(v, file, f"{where}.linears.{n}") for n, v in lins.items()})


@dataclass(frozen=True)
class Fallback:
    """Rows whose top router probability is below ``threshold`` use the soft mix or the shared weights."""

    threshold: float
    mode: str = "soft"  # "soft" | "shared"

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "mode": self.mode}


@dataclass(frozen=True)
class Manifest:
    """``config.json["moerge"]``."""

    experts: tuple[str, ...]
    level: str = "sequence"
    top_k: int | None = 1
    router_input: str | None = None
    initialized: bool = False
    fallback: Fallback | None = None
    shared: str = "merge"  # "merge" | "base"
    units: dict[str, UnitSpec] = field(default_factory=dict)
    version: int = 1
    # the sequence router's input runs after some routed units: the model computes it with a pre-pass of the
    # shared model at prefill (written only when true, so older checkpoints read as False)
    prepass: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "experts": list(self.experts), "level": self.level, "top_k": self.top_k,
                "router_input": self.router_input, "initialized": self.initialized,
                "fallback": None if self.fallback is None else self.fallback.to_dict(), "shared": self.shared,
                "units": {p: u.to_dict() for p, u in self.units.items()}, **({"prepass": True} if self.prepass else {})}

    @classmethod
    def from_dict(cls, raw: Any, file: str) -> Manifest:
        if not isinstance(raw, dict) or not all(k in raw for k in ("experts", "level", "units")):
            raise CheckpointError(file, "moerge", "malformed moerge block (needs experts, level, units)")
        units = _get(raw, "units", dict, file, "moerge")
        fb = raw.get("fallback")
        fallback = None if not fb else Fallback(float(_get(fb, "threshold", (int, float), file, "moerge.fallback")),
                                                str(fb.get("mode", "soft")))
        return cls(tuple(str(e) for e in _get(raw, "experts", list, file, "moerge")), str(raw.get("level", "sequence")),
                   raw.get("top_k", 1), raw.get("router_input"), bool(raw.get("initialized", True)), fallback,
                   str(raw.get("shared", "merge")),
                   {str(p): UnitSpec.from_dict(u, file, f"moerge.units.{p}") for p, u in units.items()},
                   int(raw.get("version", 1)), bool(raw.get("prepass", False)))

    # ---- what callers ask
    @property
    def routed(self) -> bool:
        return bool(self.units)

    def router_prefixes(self) -> dict[str, str]:
        """Router tensor prefix -> the unit whose input feeds it."""
        if self.level == "sequence":
            return {names.ROUTER_PREFIX: self.router_input or next(iter(self.units), "")}
        return {names.router_prefix("token", u): u for u in self.units}

    def linears(self) -> list[tuple[str, str, LinearSpec]]:
        """(unit path, linear name, spec) of every routed linear, in order."""
        return [(p, n, lin) for p, u in self.units.items() for n, lin in u.linears.items()]

    def calibrated(self, fallback: Fallback | None) -> Manifest:
        return replace(self, initialized=True, fallback=fallback)

    def with_expert(self, name: str, shapes: dict[tuple[str, str], Shapes]) -> Manifest:
        """One more expert: ``shapes[(unit, linear)]`` gives its stored tensors in each routed linear."""
        units = {p: UnitSpec(u.kind, {n: LinearSpec(lin.bias, (*lin.experts, shapes[(p, n)]))
                                      for n, lin in u.linears.items()}) for p, u in self.units.items()}
        return replace(self, experts=(*self.experts, name), units=units)

    def without_expert(self, e: int) -> Manifest:
        """Expert ``e`` dropped everywhere (later experts move down one index)."""
        units = {p: UnitSpec(u.kind, {n: LinearSpec(lin.bias, lin.experts[:e] + lin.experts[e + 1:])
                                      for n, lin in u.linears.items()}) for p, u in self.units.items()}
        return replace(self, experts=self.experts[:e] + self.experts[e + 1:], units=units)


def _mapping(raw: Any, file: str, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise CheckpointError(file, where, f"expected a mapping, got {type(raw).__name__}")
    return raw


def _get(raw: Any, key: str, kind: type | tuple[type, ...], file: str, where: str) -> Any:
    value = _mapping(raw, file, where).get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else "number"
        raise CheckpointError(file, f"{where}.{key}", f"expected a {want}, got {type(value).__name__}")
    return value
