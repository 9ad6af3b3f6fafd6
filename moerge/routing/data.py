"""Calibration data: a recipe's ``calibration`` block or a calibrate data source -> list of prompt strings.

Local ``.jsonl``/``.json``/``.csv``/``.parquet`` files and hub dataset names all load through ``datasets``.
``chat_template: true`` wraps each text as one user message with the tokenizer's chat template and the
generation prompt; a field holding a list of ``{"role", "content"}`` messages is templated as it is.

A local file is checked before ``datasets`` sees it (it exists, can be read, is not empty, text formats are
UTF-8), and every row after: a string that is not blank (or a messages list), templated when asked.  All of it
runs in ``moerge validate`` and at the start of ``moerge build``, before any tensor is computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io.files import check_utf8, unreadable
from ..recipe import DataSource

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


def load_table(source: DataSource, file: str) -> Any:
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


def _load(datasets: Any, source: DataSource, path: Path, local: bool) -> Any:
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


def load_texts(source: DataSource, tokenizer: Any = None, file: str = "recipe") -> list[str]:
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
