"""Calibration data: a recipe's ``calibration`` block or a calibrate data source -> list of prompt strings.

Local ``.jsonl``/``.json``/``.csv``/``.parquet`` files and hub dataset names all load through ``datasets``.
``chat_template: true`` wraps each text as one user message with the tokenizer's chat template and the
generation prompt; a field holding a list of ``{"role", "content"}`` messages is templated as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe import DataSource

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_table(source: DataSource, file: str) -> Any:
    """A ``datasets.Dataset`` for the source (local file or hub name)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source.data)
    try:
        if path.suffix.lower() in _BUILDERS or path.exists():
            if not path.is_file():
                raise DataError(source.data, None, "calibration data file not found")
            if path.stat().st_size == 0:
                raise DataError(source.data, source.field, "calibration source is empty")
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(source.data, None, f"unknown data file type '{path.suffix}' (use .jsonl, .json, .csv "
                                                   "or .parquet)")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(source.data, split=source.split)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot read this source"
        raise DataError(file, source.data, f"cannot load calibration data ({type(exc).__name__}: {exc})") from None


def load_texts(source: DataSource, tokenizer: Any = None, file: str = "recipe") -> list[str]:
    """Prompts of one source, templated when asked, at most ``max_samples``."""
    table = load_table(source, file)
    if source.field not in table.column_names:
        raise DataError(source.data, source.field, f"no such field; columns: {', '.join(table.column_names)}")
    rows = table[source.field][: source.max_samples] if source.max_samples else table[source.field]
    if not rows:
        raise DataError(source.data, source.field, "calibration source is empty")
    return [to_prompt(r, tokenizer, source.chat_template, source.data) for r in rows]


def to_prompt(row: Any, tokenizer: Any, chat_template: bool, file: str) -> str:
    if isinstance(row, list):  # messages form
        if tokenizer is None:
            raise DataError(file, None, "messages need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(row, add_generation_prompt=True, tokenize=False)
    if not isinstance(row, str):
        raise DataError(file, None, f"expected text, got {type(row).__name__}")
    if chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(file, "chat_template", "the tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": row}], add_generation_prompt=True,
                                             tokenize=False)
    return row
