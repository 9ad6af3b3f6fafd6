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
RouteWeights = dict[str, tuple[float, ...]]  # unit -> one weight per expert (a composed route)


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
class Unknown:
    """Prompts whose :class:`~moerge.modeling.modeling_moerge.UnknownDetector` score exceeds ``threshold`` take
    the shared weights (the zero route).  ``segments``, ``rank`` and ``background_rank`` give its tensor shapes;
    ``per_route``: the detector carries one threshold offset per route (``unknown.offsets``), so each route keeps
    its own share of known prompts (``moerge calibrate --unknown-thresholds per_route``); ``tail``: how the
    thresholds were taken from the calibration scores (``empirical`` quantiles, or ``exponential``: an
    extrapolated tail; ``moerge calibrate --unknown-tail``), kept by later calibrations."""

    threshold: float
    segments: int
    rank: int
    background_rank: int
    score: str = "relative_mahalanobis"
    per_route: bool = False
    tail: str = "empirical"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"score": self.score, "threshold": self.threshold, "segments": self.segments,
                               "rank": self.rank, "background_rank": self.background_rank}
        if self.per_route:
            out["per_route"] = True
        if self.tail != "empirical":
            out["tail"] = self.tail
        return out

    @classmethod
    def from_dict(cls, raw: Any, file: str) -> Unknown:
        raw = _mapping(raw, file, "moerge.unknown")
        try:
            per_route = raw.get("per_route", False)
            if not isinstance(per_route, bool):
                raise TypeError(f"per_route must be true or false, got {per_route!r}")
            tail = raw.get("tail", "empirical")
            if tail not in ("empirical", "exponential"):
                raise ValueError(f"tail must be empirical or exponential, got {tail!r}")
            return cls(float(raw["threshold"]), int(raw["segments"]), int(raw["rank"]), int(raw["background_rank"]),
                       str(raw.get("score", "relative_mahalanobis")), per_route, tail)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(file, "moerge.unknown", f"malformed ({exc})") from None


@dataclass(frozen=True)
class Manifest:
    """``config.json["moerge"]``.  The router's outputs are the experts, then the composed ``routes`` (each a
    per-unit mix of the experts); ``unknown`` (optional) sends prompts unlike every route to the shared weights.

    ``anchors`` (optional; written by ``moerge add-expert``): expert -> {unit: one weight per expert}.  An anchored
    expert e was stored against ``W_s + Σ_i a_i Δ_i`` rather than ``W_s``, so in that unit its delta is
    ``Δ_e + Σ_i a_i Δ_i`` (``a_e = 0``); every route's expert weights ``w`` become ``w + w A`` there."""

    experts: tuple[str, ...]
    level: str = "sequence"
    top_k: int | None = 1
    router_input: str | None = None
    initialized: bool = False
    fallback: Fallback | None = None
    shared: str = "merge"  # "merge" | "base"
    units: dict[str, UnitSpec] = field(default_factory=dict)
    version: int = 1
    routes: dict[str, RouteWeights] = field(default_factory=dict)
    unknown: Unknown | None = None
    # the sequence router's input runs after some routed units: the model computes it with a pre-pass of the
    # shared model at prefill (written only when true, so older checkpoints read as False)
    prepass: bool = False
    anchors: dict[str, RouteWeights] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"version": self.version, "experts": list(self.experts), "level": self.level, "top_k": self.top_k,
               "router_input": self.router_input, "initialized": self.initialized,
               "fallback": None if self.fallback is None else self.fallback.to_dict(), "shared": self.shared,
               "units": {p: u.to_dict() for p, u in self.units.items()}}
        if self.routes:  # written only when there are some: older readers see an unchanged layout
            out["routes"] = {n: {u: list(w) for u, w in r.items()} for n, r in self.routes.items()}
        if self.unknown is not None:
            out["unknown"] = self.unknown.to_dict()
        if self.prepass:
            out["prepass"] = True
        if self.anchors:
            out["anchors"] = {n: {u: list(w) for u, w in r.items()} for n, r in self.anchors.items()}
        return out

    @classmethod
    def from_dict(cls, raw: Any, file: str) -> Manifest:
        if not isinstance(raw, dict) or not all(k in raw for k in ("experts", "level", "units")):
            raise CheckpointError(file, "moerge", "malformed moerge block (needs experts, level, units)")
        units = _get(raw, "units", dict, file, "moerge")
        fb = raw.get("fallback")
        fallback = None if not fb else Fallback(float(_get(fb, "threshold", (int, float), file, "moerge.fallback")),
                                                str(fb.get("mode", "soft")))
        experts = tuple(str(e) for e in _get(raw, "experts", list, file, "moerge"))
        unknown = Unknown.from_dict(raw["unknown"], file) if raw.get("unknown") else None
        return cls(experts, str(raw.get("level", "sequence")),
                   raw.get("top_k", 1), raw.get("router_input"), bool(raw.get("initialized", True)), fallback,
                   str(raw.get("shared", "merge")),
                   {str(p): UnitSpec.from_dict(u, file, f"moerge.units.{p}") for p, u in units.items()},
                   int(raw.get("version", 1)), _routes(raw.get("routes") or {}, len(experts), file), unknown,
                   bool(raw.get("prepass", False)), _anchors(raw.get("anchors") or {}, experts, file))

    # ---- what callers ask
    @property
    def routed(self) -> bool:
        return bool(self.units)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The router's outputs: the experts, then the composed routes."""
        return (*self.experts, *self.routes)

    def router_prefixes(self) -> dict[str, str]:
        """Router tensor prefix -> the unit whose input feeds it."""
        if self.level == "sequence":
            return {names.ROUTER_PREFIX: self.router_input or next(iter(self.units), "")}
        return {names.router_prefix("token", u): u for u in self.units}

    def linears(self) -> list[tuple[str, str, LinearSpec]]:
        """(unit path, linear name, spec) of every routed linear, in order."""
        return [(p, n, lin) for p, u in self.units.items() for n, lin in u.linears.items()]

    def calibrated(self, fallback: Fallback | None, unknown: Unknown | None = None) -> Manifest:
        return replace(self, initialized=True, fallback=fallback, unknown=unknown)

    def with_expert(self, name: str, shapes: dict[tuple[str, str], Shapes],
                    anchor: RouteWeights | None = None) -> Manifest:
        """One more expert (index E, before the composed routes, which give it weight 0 everywhere):
        ``shapes[(unit, linear)]`` gives its stored tensors in each routed linear; ``anchor[unit]`` (E weights
        over the old experts), the combination of them it was stored against (omitted or all zero: none)."""
        units = {p: UnitSpec(u.kind, {n: LinearSpec(lin.bias, (*lin.experts, shapes[(p, n)]))
                                      for n, lin in u.linears.items()}) for p, u in self.units.items()}
        routes = {r: {u: (*w, 0.0) for u, w in per.items()} for r, per in self.routes.items()}
        anchors = {r: {u: (*w, 0.0) for u, w in per.items()} for r, per in self.anchors.items()}
        kept = {u: (*map(float, w), 0.0) for u, w in (anchor or {}).items() if any(v != 0.0 for v in w)}
        if kept:
            anchors[name] = kept
        return replace(self, experts=(*self.experts, name), units=units, routes=routes, anchors=anchors)

    def without_expert(self, e: int) -> Manifest:
        """Expert ``e`` dropped everywhere (later experts move down one index; composed routes lose its weight)."""
        units = {p: UnitSpec(u.kind, {n: LinearSpec(lin.bias, lin.experts[:e] + lin.experts[e + 1:])
                                      for n, lin in u.linears.items()}) for p, u in self.units.items()}
        routes = {r: {u: w[:e] + w[e + 1:] for u, w in per.items()} for r, per in self.routes.items()}
        anchors = {r: {u: w[:e] + w[e + 1:] for u, w in per.items()} for r, per in self.anchors.items()
                   if r != self.experts[e]}
        return replace(self, experts=self.experts[:e] + self.experts[e + 1:], units=units, routes=routes,
                       anchors=anchors)

    def anchored_on(self, e: int) -> list[str]:
        """The experts stored against a combination that includes expert ``e``."""
        return [r for r, per in self.anchors.items() if any(w[e] != 0.0 for w in per.values())]

    def with_route(self, name: str, weights: RouteWeights) -> Manifest:
        """One more composed route (the last router output); ``weights[unit]`` has one weight per expert."""
        return replace(self, routes={**self.routes, name: {u: tuple(map(float, w)) for u, w in weights.items()}})

    def without_route(self, name: str) -> Manifest:
        return replace(self, routes={r: w for r, w in self.routes.items() if r != name})


def _routes(raw: Any, n_experts: int, file: str, key: str = "routes") -> dict[str, RouteWeights]:
    """``{name: {unit: [one weight per expert]}}``, checked."""
    out: dict[str, RouteWeights] = {}
    for name, per_unit in _mapping(raw, file, f"moerge.{key}").items():
        where = f"moerge.{key}.{name}"
        weights = {}
        for unit, w in _mapping(per_unit, file, where).items():
            if not isinstance(w, list) or len(w) != n_experts or not all(isinstance(v, (int, float)) for v in w):
                raise CheckpointError(file, f"{where}.{unit}", f"expected {n_experts} numbers (one per expert)")
            weights[str(unit)] = tuple(float(v) for v in w)
        out[str(name)] = weights
    return out


def _anchors(raw: Any, experts: tuple[str, ...], file: str) -> dict[str, RouteWeights]:
    """``{expert: {unit: [one weight per expert]}}``, checked: known experts, no weight on the expert itself."""
    out = _routes(raw, len(experts), file, "anchors")
    for name, per in out.items():
        if name not in experts:
            raise CheckpointError(file, f"moerge.anchors.{name}", f"no expert '{name}' (experts: {list(experts)})")
        if any(w[experts.index(name)] != 0.0 for w in per.values()):
            raise CheckpointError(file, f"moerge.anchors.{name}", "an expert cannot be anchored on itself")
    return out


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
