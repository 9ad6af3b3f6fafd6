"""Atomic output folders: write into a temporary folder beside the target, rename at the end.

On any error or interrupt (KeyboardInterrupt included) the temporary folder is removed and the target is
left as it was.  An existing non-empty target is refused unless ``force``; with ``force`` the old folder is
replaced only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


def check_output(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(target, None, "output path exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise OutputError(target, None, "output folder exists and is not empty (use --force to replace it)")


@contextmanager
def atomic_output(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``target``."""
    target = Path(target).absolute()
    check_output(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(target.parent, None, f"cannot create the parent folder ({exc.strerror})") from None
    tmp = target.parent / f".{target.name}.moerge-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.moerge-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
