"""Calibration data: prompts for routers, from a recipe's ``calibration`` block or ``moerge calibrate``'s DATA.

**Sources** (a recipe's ``calibration`` block): local ``.jsonl``/``.json``/``.csv``/``.parquet`` files and hub dataset names all load through ``datasets``.
``chat_template: true`` wraps each text as one user message with the tokenizer's chat template and the
generation prompt; a field holding a list of ``{"role", "content"}`` messages is templated as it is.

A local file is checked before ``datasets`` sees it (it exists, can be read, is not empty, text formats are
UTF-8), and every row after: a string that is not blank (or a messages list), templated when asked.  All of it
runs in ``moerge validate`` and at the start of ``moerge build``, before any tensor is computed.

**Labelled examples** (calibrate / add-expert DATA): DATA is one of

* a mapping expert name -> data source (a YAML/JSON file, or a dict from Python)::

      sentiment: {data: data/sentiment_calib.jsonl, field: prompt, chat_template: true}
      topic: data/topic.jsonl            # a bare string is the source's `data`

  A source has the shape of a recipe's ``calibration`` block (:class:`moerge.recipe.CalibrationData`); relative
  paths resolve against the mapping file's folder.  Keys a source leaves out take the command's defaults.
* one table (local jsonl/csv/parquet/json file or a ``datasets`` name) with a text column (``field``) and a
  label column (``label_field``, default ``expert``) naming an expert on every row.

Everything is loaded and checked (unknown expert, empty source, missing text field, unknown label) before
any model is loaded, so a bad file fails fast and leaves the checkpoint untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from ..errors import DataError
from ..io.files import check_utf8, read_text, unreadable
from ..recipe import CalibrationData
from ..registry import did_you_mean

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_TEXT = (".jsonl", ".json", ".csv")


def check_file(path: Path, field: str | None) -> None:
    """A local data file that exists, can be read, is not empty and (text formats) is UTF-8."""
    if not path.is_file():
        raise DataError(path, None, "calibration data is a folder, not a file" if path.is_dir()
                        else "calibration data file not found")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise DataError(path, None, unreadable(exc)) from None
    if size == 0:
        raise DataError(path, field, "calibration source is empty")
    if path.suffix.lower() not in _BUILDERS:
        raise DataError(path, None, f"unknown data file type '{path.suffix}' (use .jsonl, .json, .csv or .parquet)")
    if path.suffix.lower() in _TEXT:
        check_utf8(path, DataError)


def load_table(source: CalibrationData, file: str) -> Any:
    """A ``datasets.Dataset`` for the source (local file or hub name)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source.data)
    local = path.suffix.lower() in _BUILDERS or path.exists()
    if local:
        check_file(path, source.field)
    try:
        with _quiet_datasets(datasets):
            return _load(datasets, source, path, local)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot read this source"
        root = exc
        while root.__cause__ is not None:  # datasets wraps the parser's error: show the parser's
            root = root.__cause__
        detail = " ".join(f"{type(root).__name__}: {root}".split())
        where = (source.data, None) if local else (file, source.data)
        raise DataError(*where, f"cannot load calibration data ({detail[:300]})") from None


def _load(datasets: Any, source: CalibrationData, path: Path, local: bool) -> Any:
    if local:
        return datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
    return datasets.load_dataset(source.data, split=source.split)


@contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """datasets logs a parser error before raising it: the one-line DataError says it instead."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def load_texts(source: CalibrationData, tokenizer: Any = None, file: str = "recipe") -> list[str]:
    """Prompts of one source, templated when asked, at most ``max_samples``."""
    table = load_table(source, file)
    if source.field not in table.column_names:
        raise DataError(source.data, source.field, f"no such field; columns: {', '.join(table.column_names)}")
    rows = table[source.field][: source.max_samples] if source.max_samples else table[source.field]
    if not rows:
        raise DataError(source.data, source.field, "calibration source is empty")
    return [to_prompt(r, tokenizer, source.chat_template, source.data, source.field, i) for i, r in enumerate(rows)]


def to_prompt(row: Any, tokenizer: Any, chat_template: bool, file: str, field: str | None = None,
              index: int | None = None) -> str:
    """One row as the prompt text the model sees (templated when asked)."""
    where = "" if index is None else f"row {index}: "
    if isinstance(row, list):  # messages form
        return _template(tokenizer, row, file, field, where)
    if not isinstance(row, str):
        raise DataError(file, field, f"{where}expected text, got {type(row).__name__}")
    if not row.strip():
        raise DataError(file, field, f"{where}the text is empty")
    if chat_template:
        return _template(tokenizer, [{"role": "user", "content": row}], file, "chat_template", where)
    return row


def _template(tokenizer: Any, messages: list, file: str, field: str | None, where: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(file, field, "chat template requested but the tokenizer has no chat template")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja and transformers raise many types: all mean a bad row
        raise DataError(file, field, f"{where}cannot apply the chat template ({' '.join(str(exc).split())[:200]})") \
            from None


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
        raw = json.loads(read_text(path, DataError))
    except ValueError:
        return False
    return isinstance(raw, dict) and all(isinstance(v, (dict, str)) for v in raw.values())


def read_mapping(path: Path) -> dict[str, Any]:
    text = read_text(path, DataError, "data mapping file")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(path, None, f"cannot read the data mapping ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(path, None, "expected a mapping of expert name -> data source")
    return raw


def _source(name: str, value: Any, root: Path, defaults: Defaults, file: str) -> CalibrationData:
    raw = {"data": value} if isinstance(value, str) else value
    if not isinstance(raw, dict):
        raise DataError(file, name, "a data source is a mapping like {data: file.jsonl, field: prompt} or a path")
    merged = {"field": defaults.field, "split": defaults.split, "max_samples": defaults.max_samples,
              "chat_template": defaults.chat_template, **raw}
    try:
        source = CalibrationData.model_validate(merged)
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
               require_labels: bool) -> Examples:
    """A table with a text column and (unless not required) a label column naming experts."""
    source = CalibrationData(data=data, field=defaults.field, split=defaults.split, max_samples=None,
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
    labels = _table_labels(names, experts, data, defaults.label_field) if has_labels else [UNLABELLED] * len(rows)
    keep = _cap_per_label(labels, defaults.max_samples)
    if not keep:
        raise DataError(data, defaults.field, "calibration source is empty")
    texts = [to_prompt(rows[i], tokenizer, defaults.chat_template, data, defaults.field, i) for i in keep]
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


def data_inputs(data: str | Path | dict[str, Any]) -> list[tuple[str, Path]]:
    """The local files DATA reads (the mapping file and its sources, or the table): inputs an output must not
    touch.  Unreadable or malformed DATA yields what it can; loading it reports the error."""
    if isinstance(data, dict):
        mapping, root, out = data, Path.cwd(), []
    else:
        path = Path(data)
        if not path.exists():
            return []
        out = [("calibration data", path)]
        try:
            if not is_mapping_file(path):
                return out
            mapping, root = read_mapping(path), path.resolve().parent
        except DataError:
            return out
    for value in mapping.values():
        name = value if isinstance(value, str) else value.get("data") if isinstance(value, dict) else None
        if isinstance(name, str) and (root / name).exists():
            out.append(("calibration data", root / name))
    return out


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


# ---------------------------------------------------------------- held-out split

def holdout_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified, seeded split -> (train indices, held-out indices).  Each label keeps >= 1 training row
    and, when ``fraction`` > 0 and it has >= 2 rows, holds out >= 1."""
    gen = torch.Generator().manual_seed(seed)
    train: list[int] = []
    held: list[int] = []
    for y in sorted(set(labels)):
        rows = [i for i, v in enumerate(labels) if v == y]
        order = [rows[j] for j in torch.randperm(len(rows), generator=gen).tolist()]
        n_hold = min(max(round(fraction * len(rows)), 1 if fraction > 0 else 0), len(rows) - 1)
        held += order[:n_hold]
        train += order[n_hold:]
    return sorted(train), sorted(held)
