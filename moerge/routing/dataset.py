"""Labelled calibration data for ``moerge calibrate`` / ``add-expert``: texts + expert labels, validated up front.

DATA is one of

* a mapping expert name -> data source (a YAML/JSON file, or a dict from Python)::

      sentiment: {data: data/sentiment_calib.jsonl, field: prompt, chat_template: true}
      topic: data/topic.jsonl            # a bare string is the source's `data`

  A source has the shape of a recipe's ``calibration`` block (:class:`moerge.recipe.DataSource`); relative
  paths resolve against the mapping file's folder.  Keys a source leaves out take the command's defaults.
* one table (local jsonl/csv/parquet/json file or a ``datasets`` name) with a text column (``field``) and a
  label column (``label_field``, default ``expert``) naming an expert on every row.

Everything is loaded and checked (unknown expert, empty source, missing text field, unknown label) before
any model is loaded, so a bad file fails fast and leaves the checkpoint untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from ..errors import DataError
from ..recipe import DataSource
from ..registry import did_you_mean
from .data import load_table, load_texts, to_prompt

MAPPING_SUFFIXES = (".yaml", ".yml")
UNLABELLED = -1


@dataclass
class Defaults:
    """Command-line defaults for what a data source or table leaves out."""

    field: str = "prompt"
    label_field: str = "expert"
    split: str = "train"
    max_samples: int | None = 64
    chat_template: bool = False


@dataclass
class Examples:
    """Templated texts and their expert index (``UNLABELLED`` = -1 when the data has no labels)."""

    texts: list[str]
    labels: list[int]
    experts: list[str]
    spec: dict[str, Any] = field(default_factory=dict)  # what was loaded, recorded in calibration.json

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def labelled(self) -> bool:
        return all(y != UNLABELLED for y in self.labels)

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(e) for e, name in enumerate(self.experts)}

    def subset(self, keep: list[int]) -> Examples:
        return Examples([self.texts[i] for i in keep], [self.labels[i] for i in keep], self.experts, self.spec)

    def __add__(self, other: Examples) -> Examples:
        spec = {**other.spec, **self.spec}
        if "sources" in self.spec or "sources" in other.spec:
            spec["sources"] = {**other.spec.get("sources", {}), **self.spec.get("sources", {})}
        return Examples(self.texts + other.texts, self.labels + other.labels, self.experts, spec)


# ---------------------------------------------------------------- reading DATA

def is_mapping_file(path: Path) -> bool:
    """YAML files, and JSON files holding one object whose values are sources (a JSON table is a list)."""
    if path.suffix.lower() in MAPPING_SUFFIXES:
        return True
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text())
    except ValueError:
        return False
    return isinstance(raw, dict) and all(isinstance(v, (dict, str)) for v in raw.values())


def read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(path, None, f"cannot read the data mapping ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(path, None, "expected a mapping of expert name -> data source")
    return raw


def _source(name: str, value: Any, root: Path, defaults: Defaults, file: str) -> DataSource:
    raw = {"data": value} if isinstance(value, str) else value
    if not isinstance(raw, dict):
        raise DataError(file, name, "a data source is a mapping like {data: file.jsonl, field: prompt} or a path")
    merged = {"field": defaults.field, "split": defaults.split, "max_samples": defaults.max_samples,
              "chat_template": defaults.chat_template, **raw}
    try:
        source = DataSource.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "model-")))
        msg = err["msg"].removeprefix("Value error, ")
        raise DataError(file, f"{name}.{where}" if where else name, msg) from None
    local = root / source.data
    if not Path(source.data).is_absolute() and (local.exists() or Path(source.data).suffix):
        source = source.model_copy(update={"data": str(local.resolve())})
    return source


def _check_names(names: list[str], experts: list[str], file: str) -> None:
    for name in names:
        if name not in experts:
            raise DataError(file, str(name), f"unknown expert '{name}'{did_you_mean(str(name), experts)}; "
                                             f"experts: {', '.join(experts)}")


def from_mapping(mapping: dict[str, Any], experts: list[str], tokenizer: Any, defaults: Defaults,
                 root: Path, file: str) -> Examples:
    """Every listed expert's texts, labelled with its index."""
    _check_names(list(mapping), experts, file)
    sources = {str(name): _source(str(name), value, root, defaults, file) for name, value in mapping.items()}
    texts: list[str] = []
    labels: list[int] = []
    for name, source in sources.items():
        got = load_texts(source, tokenizer, file=file)
        texts += got
        labels += [experts.index(name)] * len(got)
    spec = {"sources": {n: s.model_dump(mode="json") for n, s in sources.items()}}
    return Examples(texts, labels, experts, spec)


def from_table(data: str, experts: list[str], tokenizer: Any, defaults: Defaults, *,
               require_labels: bool, skip_unknown: bool = False) -> Examples:
    """A table with a text column and (unless not required) a label column naming experts.  ``skip_unknown``:
    rows naming an expert not in ``experts`` are left out (old data of a checkpoint that lost an expert)."""
    source = DataSource(data=data, field=defaults.field, split=defaults.split, max_samples=None,
                        chat_template=defaults.chat_template)
    table = load_table(source, "--data")
    columns = table.column_names
    if defaults.field not in columns:
        raise DataError(data, defaults.field, f"no such text field; columns: {', '.join(columns)}")
    has_labels = defaults.label_field in columns
    if require_labels and not has_labels:
        raise DataError(data, defaults.label_field, f"no such label column (it names each row's expert); "
                                                    f"columns: {', '.join(columns)}")
    rows = table[defaults.field]
    names = [str(v) for v in table[defaults.label_field]] if has_labels else []
    if skip_unknown and has_labels:
        known = [i for i, n in enumerate(names) if n in experts]
        rows, names = [rows[i] for i in known], [names[i] for i in known]
    labels = _table_labels(names, experts, data, defaults.label_field) if has_labels else [UNLABELLED] * len(rows)
    keep = _cap_per_label(labels, defaults.max_samples)
    if not keep:
        raise DataError(data, defaults.field, "calibration source is empty")
    texts = [to_prompt(rows[i], tokenizer, defaults.chat_template, data) for i in keep]
    local = Path(data)
    where = str(local.resolve()) if local.exists() else data  # a local table is recorded by absolute path
    spec = {"table": {**source.model_dump(mode="json"), "data": where, "label_field": defaults.label_field,
                      "max_samples": defaults.max_samples}}
    return Examples(texts, [labels[i] for i in keep], experts, spec)


def _table_labels(names: list[str], experts: list[str], file: str, label_field: str) -> list[int]:
    for row, name in enumerate(names):
        if name not in experts:
            raise DataError(file, label_field, f"row {row} names unknown expert '{name}'"
                                               f"{did_you_mean(name, experts)}; experts: {', '.join(experts)}")
    return [experts.index(n) for n in names]


def _cap_per_label(labels: list[int], cap: int | None) -> list[int]:
    """Row indices keeping at most ``cap`` rows per label, in file order."""
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        seen[y] = seen.get(y, 0) + 1
        if cap is None or seen[y] <= cap:
            keep.append(i)
    return keep


def load_examples(data: str | Path | dict[str, Any], experts: list[str], tokenizer: Any,
                  defaults: Defaults | None = None, *, require_labels: bool = True) -> Examples:
    """DATA (mapping file, mapping dict or table) -> :class:`Examples`, every row checked."""
    defaults = defaults or Defaults()
    if isinstance(data, dict):
        return from_mapping(data, experts, tokenizer, defaults, Path.cwd(), "data")
    path = Path(data)
    if is_mapping_file(path):
        return from_mapping(read_mapping(path), experts, tokenizer, defaults, path.resolve().parent, str(path))
    return from_table(str(data), experts, tokenizer, defaults, require_labels=require_labels)


def require_experts(examples: Examples, needed: list[str], file: str) -> None:
    """Every expert in ``needed`` has at least two examples (one to train on, one to hold out)."""
    counts = examples.counts()
    missing = [n for n in needed if counts.get(n, 0) == 0]
    if missing:
        raise DataError(file, None, f"no calibration data for expert(s) {', '.join(missing)} (supervised "
                                    "calibration needs examples of every expert)")
    few = [n for n in needed if counts.get(n, 0) < 2]
    if few:
        raise DataError(file, None, f"expert(s) {', '.join(few)} have a single example; at least 2 are needed")


def canonical(examples: Examples) -> Examples:
    """The examples grouped by expert name (file order within an expert): calibration then sees the same rows in
    the same order whatever the experts' indices are."""
    key = [(examples.experts[y] if y >= 0 else "", i) for i, y in enumerate(examples.labels)]
    return examples.subset(sorted(range(len(examples)), key=key.__getitem__))


# ---------------------------------------------------------------- held-out split

def holdout_split(labels: list[int], fraction: float, seed: int,
                  names: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Stratified, seeded split -> (train indices, held-out indices).  Each label keeps >= 1 training row
    and, when ``fraction`` > 0 and it has >= 2 rows, holds out >= 1.  With ``names`` (label -> expert name) the
    labels are visited in name order, so the split does not depend on where an expert sits in the list (an
    expert removed and added back gets the same split)."""
    gen = torch.Generator().manual_seed(seed)
    train: list[int] = []
    held: list[int] = []
    for y in sorted(set(labels), key=lambda v: (names[v] if names is not None and v >= 0 else "", v)):
        rows = [i for i, v in enumerate(labels) if v == y]
        order = [rows[j] for j in torch.randperm(len(rows), generator=gen).tolist()]
        n_hold = min(max(round(fraction * len(rows)), 1 if fraction > 0 else 0), len(rows) - 1)
        held += order[:n_hold]
        train += order[n_hold:]
    return sorted(train), sorted(held)
