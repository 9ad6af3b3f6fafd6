"""Reading the small text files moerge is given (recipes, configs, index and data files) with one-line errors.

Every failure is a :class:`~moerge.errors.MoergeError` of the caller's type naming the file: "file not found",
"cannot be read (Permission denied)", "not UTF-8 text (byte 0xff at offset 12)", "not valid JSON (...)", "not a
JSON object (got list)".  A file that cannot be opened is never reported as truncated or corrupt.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, MoergeError

CHUNK = 1 << 20


def unreadable(exc: OSError) -> str:
    """``cannot be read (Permission denied)`` for an OSError raised while opening or reading a file."""
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def read_text(path: Path, error: type[MoergeError] = CheckpointError, what: str = "file") -> str:
    """The UTF-8 text of ``path``."""
    if not path.exists():
        raise error(path, None, f"{what} not found")
    if path.is_dir():
        raise error(path, None, f"{what} is a folder, not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(path, None, unreadable(exc)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(path, None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def check_utf8(path: Path, error: type[MoergeError], field: str | None = None) -> None:
    """Stream ``path`` through a UTF-8 decoder (no copy of a large file is kept)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    where = offset + exc.start
                    raise error(path, field, f"not UTF-8 text (byte 0x{chunk[exc.start]:02x} at offset "
                                             f"{where})") from None
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except OSError as exc:
        raise error(path, field, unreadable(exc)) from None
    except UnicodeDecodeError:
        raise error(path, field, f"not UTF-8 text (incomplete character at the end, offset {offset})") from None


def read_json(path: Path, error: type[MoergeError] = CheckpointError) -> dict[str, Any]:
    """A JSON file that must hold one object (a mapping)."""
    text = read_text(path, error)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise error(path, None, f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise error(path, None, f"not a JSON object (got {type(value).__name__})")
    return value
