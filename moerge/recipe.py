"""The typed recipe: what to build, validated at load time.

A recipe is YAML (or a dict); this module turns it into :class:`Recipe`, a tree of pydantic v2 models in
which unknown keys are errors that name the key and suggest the closest valid one.  Paths resolve relative
to the recipe file.  ``--set a.b=c`` overrides are applied to the raw mapping before validation.

    base: path/to/base
    dtype: bfloat16            # optional, default: the base's
    seed: 0
    experts:
      - name: sentiment
        source: path/to/full_checkpoint_or_lora_adapter
        calibration: {data: prompts.jsonl, field: prompt, max_samples: 64, chat_template: true}
    merge: {method: ties, density: 0.5, lambda: 1.0, weights: {sentiment: 1.0}}
    routing:                   # optional: without it the build is a static merge
      select: {metric: sign_conflict, top_fraction: 0.25}
      modules: mlp
      expert: {kind: twin, rank: 16}
      router: {level: sequence, init: prototype}
    output: {shard_size: 1GB}

Every value is checked against its meaning here, before any file is opened: numbers are finite (NaN and inf are
refused everywhere), ranges hold (density in (0, 1], top-k >= 1, a budget like ``1.3x``), the weights of a
``linear`` merge do not sum to zero, names are usable as file names.  ``routing.modules`` is ``mlp``,
``attention``, ``both``, or a list of the first two (``[attention, mlp]``, as mergekit users write it);
``routing.head: true`` adds the output head (``lm_head``, or the tied input embedding's transpose) as one more
candidate unit after the last layer.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import RecipeError
from .io.files import read_text
from .registry import did_you_mean

DTYPES = ("float32", "float16", "bfloat16")
ROUTER_SCALE = 20.0  # the cosine router's initial scale (logits = scale * cos + bias)
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 2**29, ``1000`` -> 1000."""
    if isinstance(value, int) and not isinstance(value, bool):  # a bool is no size: its text fails below
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"'{value}' is not a size like 1GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def parse_budget(value: object) -> float:
    """``"1.3x"`` / ``1.3`` -> 1.3: a finite storage budget of at least the base's size."""
    text = str(value).strip().lower().removesuffix("x").strip()
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError(f"budget '{value}' must look like 1.3x") from None
    if not math.isfinite(ratio):
        raise ValueError(f"budget '{value}' must be a finite multiple of the base's size, like 1.3x")
    if ratio < 1.0:
        raise ValueError(f"budget {ratio}x is below the base model's size (1.0x)")
    return ratio


def _not_empty_path(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("path must not be empty")
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("path contains a NUL character")
    if isinstance(value, str) and any(len(part.encode()) > 255 for part in value.split("/")):
        raise ValueError("path has a name longer than 255 bytes")
    return value


class Strict(BaseModel):
    """Base model: unknown keys are errors with a "did you mean" hint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        valid = {f.alias or name for name, f in cls.model_fields.items()}
        accepted = valid | set(cls.model_fields)
        for key in data:
            if key not in accepted:
                hint = did_you_mean(str(key), sorted(valid))
                raise ValueError(f"unknown key '{key}'{hint}; valid keys: {', '.join(sorted(valid))}")
        return data


class CalibrationData(Strict):
    """Where calibration prompts come from: a local jsonl/csv/parquet/json file or a datasets name."""

    data: str = Field(min_length=1)
    field: str = Field("prompt", min_length=1)

    @field_validator("data")
    @classmethod
    def _data_ok(cls, v: str) -> str:
        return _not_empty_path(v)
    split: str = "train"
    max_samples: int | None = Field(64, gt=0)
    chat_template: bool = False


def check_expert_name(name: str) -> str:
    """Letters, digits, ``_ - .``, not only dots (``.``/``..`` are folder names), at most 100 characters."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"expert name '{name}' may only use letters, digits, '_', '-', '.'")
    if set(name) == {"."}:
        raise ValueError(f"expert name '{name}' must have a letter or digit (it is used in file names)")
    if len(name) > 100:
        raise ValueError(f"expert name is {len(name)} characters long; at most 100")
    return name


class ExpertSpec(Strict):
    name: str = Field(min_length=1)
    source: Path
    calibration: CalibrationData | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_expert_name(v)

    @field_validator("source", mode="before")
    @classmethod
    def _source_ok(cls, v: Any) -> Any:
        return _not_empty_path(v)


class MergeSpec(Strict):
    """The static merge. Method parameters are flat keys; unused ones are rejected by the method."""

    method: str = "task_arithmetic"
    density: float | None = None
    lambda_: float = Field(1.0, alias="lambda")
    weights: dict[str, float] = Field(default_factory=dict)
    epsilon: float | None = Field(None, ge=0, lt=1)
    gamma: float | None = Field(None, ge=0, lt=1)
    normalize: bool | None = None
    rescale: bool | None = None

    @field_validator("density")
    @classmethod
    def _density(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {v}")
        return v


class SelectSpec(Strict):
    """Which units become routed: exactly one of threshold / top_fraction / layers / budget / all."""

    metric: str = "sign_conflict"
    threshold: float | None = None
    top_fraction: float | None = Field(None, gt=0, le=1)
    layers: list[int] | None = None
    budget: str | float | None = None
    all: bool | None = None

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError(f"layer indices must be >= 0, got {[i for i in v if i < 0]}")
        return v

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        if v is not None:
            parse_budget(v)
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> SelectSpec:
        rules = [k for k in ("threshold", "top_fraction", "layers", "budget", "all") if getattr(self, k) is not None]
        if len(rules) > 1:
            raise ValueError(f"choose one selection rule, got {', '.join(rules)}")
        if not rules:
            self.all = True
        return self

    def budget_ratio(self) -> float | None:
        return None if self.budget is None else parse_budget(self.budget)


class ExpertKindSpec(Strict):
    kind: str = "dense"
    rank: int | None = Field(None, gt=0)
    density: float | None = Field(None, gt=0, le=1)
    svd: Literal["auto", "exact", "randomized"] | None = None  # twin: exact or randomized SVD (None = auto)


class RouterSpec(Strict):
    level: Literal["sequence", "token"] = "sequence"
    init: Literal["prototype", "uniform"] = "prototype"
    top_k: int | None = Field(None, gt=0)
    scale: float = Field(ROUTER_SCALE, gt=0)
    # sequence level: the router reads the shared model's hidden state entering this layer (its attention input),
    # computed once per prompt; None = the first routed unit's input
    tap: int | None = Field(None, ge=0)


class AllocateSpec(Strict):
    """The options an activation-based allocation (``select: {budget: ..., metric: activation}``) chooses from."""

    kinds: list[Literal["twin", "bit1", "sparse", "dense"]] = Field(
        default_factory=lambda: ["twin", "bit1", "dense"], min_length=1)  # sparse: 8 bytes per kept entry
    ranks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])  # twin (0 = nothing, always)
    densities: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1])  # sparse (0 = nothing, always)
    damp: float = Field(0.01, gt=0)  # whitening damping, a fraction of mean(diag(C))
    normalize: Literal["tokens", "relative"] = "tokens"  # error per calibration token, or / the output's energy
    # fisher: each output row's error weighted by how much the expert's answer depends on it (diagonal K-FAC
    # output side, from a backward pass on the calib prompts), normalised to mean 1 per expert; fisher_global:
    # one normaliser for all experts, so an expert whose answers are more fragile also gets more of the bytes
    sensitivity: Literal["none", "fisher", "fisher_global"] = "none"
    # candidates for the shared weight (the static merge): each is measured, the least remaining error wins
    merges: list[MergeSpec | Literal["base"]] | None = None

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if not v or any(r <= 0 for r in v) or v != sorted(set(v)):
            raise ValueError(f"ranks must be positive and increasing, got {v}")
        return v

    @field_validator("densities")
    @classmethod
    def _densities(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < d <= 1 for d in v) or v != sorted(set(v)):
            raise ValueError(f"densities must be increasing values in (0, 1], got {v}")
        return v


class RoutingSpec(Strict):
    select: SelectSpec = Field(default_factory=SelectSpec)
    modules: Literal["mlp", "attention", "both"] = "mlp"

    @field_validator("modules", mode="before")
    @classmethod
    def _modules(cls, v: Any) -> Any:
        """``[mlp]`` -> mlp, ``[attention, mlp]`` -> both (mergekit style)."""
        if not isinstance(v, (list, tuple)):
            return v
        if not v:
            raise ValueError("an empty list routes nothing; use mlp, attention, both or a list of mlp / attention")
        for item in v:
            if item not in ("mlp", "attention"):
                hint = did_you_mean(str(item), ["attention", "mlp"])
                raise ValueError(f"unknown module '{item}'{hint}; a list holds mlp and/or attention")
        return "both" if set(v) == {"mlp", "attention"} else v[0]
    expert: ExpertKindSpec = Field(default_factory=ExpertKindSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    shared: Literal["merge", "base"] | None = None
    allocate: AllocateSpec | None = None  # with select.metric: activation (defaults when left out)
    fold_norms: bool = True  # each expert's routed q/k/v and gate/up absorb its own input norm's scale
    # the output head (lm_head; with tied embeddings, the input embedding's merge is its shared weight) is one more
    # candidate unit, after the last layer; each expert's head absorbs its own final norm's scale
    head: bool = False


class OutputSpec(Strict):
    shard_size: int = 10**9
    format: Literal["moerge", "mixtral", "qwen2_moe", "qwen3_moe"] = "moerge"
    experts_per_token: int = Field(2, gt=0)

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        size = parse_size(v)
        if size <= 0:
            raise ValueError("shard_size must be positive")
        return size


class Recipe(Strict):
    base: Path
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: int = 0
    experts: list[ExpertSpec]
    merge: MergeSpec = Field(default_factory=MergeSpec)
    routing: RoutingSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    allow_pickle: bool = False
    _file: str = PrivateAttr(default="recipe")

    @property
    def file(self) -> str:
        """The file the recipe was loaded from: what build-time errors about recipe keys name."""
        return self._file

    @field_validator("base", mode="before")
    @classmethod
    def _base_ok(cls, v: Any) -> Any:
        return _not_empty_path(v)

    @field_validator("experts")
    @classmethod
    def _experts_ok(cls, experts: list[ExpertSpec]) -> list[ExpertSpec]:
        if not experts:
            raise ValueError("a recipe needs at least one expert, got none")
        seen: dict[str, int] = {}
        for i, e in enumerate(experts):
            if e.name in seen:
                raise ValueError(f"@experts[{i}].name: duplicate expert name '{e.name}' (also used by "
                                 f"experts[{seen[e.name]}])")
            seen[e.name] = i
        return experts

    @model_validator(mode="after")
    def _weights_ok(self) -> Recipe:
        seen = set(self.expert_names)
        for name in self.merge.weights:
            if name not in seen:
                raise ValueError(f"@merge.weights: unknown expert '{name}'{did_you_mean(name, sorted(seen))}")
        weights = [self.merge.weights.get(n, 1.0) for n in self.expert_names]
        if self.merge.method == "linear" and abs(sum(weights)) <= 1e-6 * max(1.0, *map(abs, weights)):
            raise ValueError(f"@merge.weights: the weights of a linear merge sum to 0 ({', '.join(map(str, weights))}); "
                             "the average of the experts is undefined (use task_arithmetic for differences)")
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def _loc(err: dict[str, Any], raw: dict[str, Any]) -> str:
    """Turn a pydantic error location into ``experts[1].name`` / ``merge.densty``."""
    out = ""
    for part in err["loc"]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "model-")) or part in ("function-after[_one_rule()]",):
            continue
        else:
            out += f".{part}" if out else part
    msg = _clean_msg(err["msg"])
    if msg.startswith("@"):
        return msg[1:].split(": ", 1)[0]
    m = re.search(r"unknown key '([^']+)'", msg)
    if m:
        out = f"{out}.{m.group(1)}" if out else m.group(1)
    return out or "(top level)"


def _clean_msg(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return " ".join(msg.split())


def _message(err: dict[str, Any]) -> str:
    """One line saying what is wrong with the value (pydantic's words, the value added where it helps)."""
    if err["type"] == "missing":
        return "required key is missing"
    msg = _clean_msg(err["msg"])
    if msg.startswith("@"):
        msg = msg.split(": ", 1)[1]
    if err["type"] == "finite_number":
        return f"must be a finite number, got {err.get('input')!r}"
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short",
                       "string_too_short", "int_parsing", "float_parsing", "literal_error", "bool_parsing"):
        shown = repr(err.get("input"))
        return f"{msg}, got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return msg


def apply_overrides(raw: dict[str, Any], overrides: list[str], file: str) -> dict[str, Any]:
    """Apply ``key.path=value`` strings (value parsed as YAML) to a raw recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(file, item, "--set expects key.path=value")
        path, value = item.split("=", 1)
        path = path.strip()
        node: Any = raw
        keys = path.split(".")
        for i, key in enumerate(keys[:-1]):
            container, k = _slot(node, key, file, path, ".".join(keys[:i]))
            if isinstance(container, dict) and container.get(k) is None:
                container[k] = {}
            node = container[k]
        container, k = _slot(node, keys[-1], file, path, ".".join(keys[:-1]))
        try:
            container[k] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(file, path, f"--set value is not valid YAML ({' '.join(str(exc).split())})") from None
    return raw


def _slot(node: Any, key: str, file: str, path: str, parent: str) -> tuple[Any, Any]:
    """Where one ``--set`` path step goes: ``(mapping, key)`` or ``(list, index)``; else a RecipeError."""
    if isinstance(node, dict):
        return node, key
    if isinstance(node, list):
        if key.isdigit() and int(key) < len(node):
            return node, int(key)
        raise RecipeError(file, path, f"'{parent}' is a list of {len(node)} item(s); '{key}' is not an index in it")
    raise RecipeError(file, path, f"'{parent}' is a {type(node).__name__} value, not a mapping")


def _resolve_paths(raw: dict[str, Any], root: Path) -> None:
    def fix(value: Any) -> Any:
        if isinstance(value, str) and value.strip() and "\x00" not in value and not Path(value).is_absolute():
            try:
                return str((root / value).resolve())
            except (OSError, RuntimeError):  # a symlink loop, a name too long: the validator says what is wrong
                return value
        return value

    if "base" in raw:
        raw["base"] = fix(raw["base"])
    experts = raw.get("experts")
    for e in experts if isinstance(experts, list) else []:
        if isinstance(e, dict):
            e["source"] = fix(e.get("source"))
            cal = e.get("calibration")
            if isinstance(cal, dict) and isinstance(cal.get("data"), str) and "\x00" not in cal["data"]:
                local = root / cal["data"]
                if _exists(local) or "/" in cal["data"] or Path(cal["data"]).suffix:
                    cal["data"] = fix(cal["data"])


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # name too long, NUL byte: not an existing file
        return False


def recipe_from_dict(raw: dict[str, Any], *, file: str = "<recipe>", root: Path | None = None) -> Recipe:
    """Validate a raw mapping; relative paths resolve against ``root`` (default: the current folder)."""
    if not isinstance(raw, dict):
        raise RecipeError(file, None, "a recipe must be a mapping of keys to values")
    raw = dict(raw)
    _resolve_paths(raw, root or Path.cwd())
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RecipeError(file, _loc(err, raw), _message(err)) from None
    recipe._file = file
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, resolve and validate a YAML recipe."""

    path = Path(path)
    text = read_text(path, RecipeError, "recipe file")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(path, None, f"not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise RecipeError(path, None, "a recipe must be a mapping of keys to values")
    raw = apply_overrides(raw, overrides or [], str(path))
    return recipe_from_dict(raw, file=str(path), root=path.resolve().parent)
