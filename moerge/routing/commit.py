"""Atomic edits of a built checkpoint: stage new files, then swap them in together (or not at all).

:class:`Staged` collects new versions of a few files of a folder (written beside them as hidden temporary
files); :meth:`Staged.commit` keeps hard links to the old versions, replaces every file with ``os.replace``
and, if any replace fails, puts the old versions back.  Nothing is ever written into an existing file, so
folders that share big shards through hard links (:func:`link_copy`) stay independent.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import OutputError

LINK_SUFFIXES = (".safetensors", ".bin")


class Staged:
    """New versions of files of ``folder``, swapped in by :meth:`commit`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tag = uuid.uuid4().hex[:8]
        self.files: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """Where to write the new version of ``name`` (a file name inside the folder)."""
        tmp = self.folder / f".{name}.moerge-new-{self.tag}"
        self.files[name] = tmp
        return tmp

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text)

    def commit(self) -> None:
        backups: dict[str, Path | None] = {}
        try:
            for name, tmp in self.files.items():
                target = self.folder / name
                backups[name] = self._backup(target)
                if target.exists():
                    shutil.copymode(target, tmp)
                os.replace(tmp, target)
        except OSError as exc:
            self._restore(backups)
            raise OutputError(self.folder, None, f"cannot update the checkpoint ({exc}); it is unchanged") from None
        finally:
            self.discard()
        for bak in backups.values():
            if bak is not None:
                bak.unlink(missing_ok=True)

    def _backup(self, target: Path) -> Path | None:
        if not target.exists():
            return None
        bak = self.folder / f".{target.name}.moerge-old-{self.tag}"
        os.link(target, bak)
        return bak

    def _restore(self, backups: dict[str, Path | None]) -> None:
        for name, bak in backups.items():
            target = self.folder / name
            if bak is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(bak, target)

    def discard(self) -> None:
        for tmp in self.files.values():
            tmp.unlink(missing_ok=True)


def link_copy(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder's files into ``dst``: weight shards as hard links (copies where links are
    impossible), everything else as real copies.  Subfolders are copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith("."):
            continue
        if f.is_dir():
            shutil.copytree(f, dst / f.name)
        elif f.suffix in LINK_SUFFIXES and not f.name.startswith("moerge_router"):
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
