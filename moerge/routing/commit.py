"""Atomic edits of a built checkpoint: stage new files, then swap them in together (or not at all).

:class:`Staged` collects new versions of a few files of a folder.  :meth:`Staged.commit` assembles the whole new
folder beside the checkpoint (``.CKPT.moerge-tmp-<pid>-<hex>``: weight shards hard-linked, small files copied,
the staged files moved in with ``os.replace``) and swaps it with the checkpoint in one rename
(:func:`moerge.io.atomic.swap_in`), holding the checkpoint's lock: a reader or an interrupt sees the old
checkpoint or the new one, never a new router beside an old config.  Nothing is ever written into an existing
file, so folders that share big shards through hard links (:func:`link_copy`) stay independent.

``private=True`` is for a folder nobody else sees yet (an atomic output being assembled): the staged files are
moved straight into it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from pathlib import Path

from ..errors import OutputError
from ..io.atomic import make_parent, output_lock, remove, side_path, swap_in, sweep_stale

LINK_SUFFIXES = (".safetensors", ".bin")


class Staged:
    """New versions of files of ``folder``, swapped in by :meth:`commit`."""

    def __init__(self, folder: Path, *, private: bool = False) -> None:
        self.folder = Path(folder).resolve()  # a symlinked checkpoint is edited where it really is
        self.private = private
        self.files: dict[str, Path] = {}
        self._stack = ExitStack()
        self._stage: Path | None = None

    def _staging(self) -> Path:
        """The folder the new files are written to (locked and created on first use)."""
        if self._stage is None:
            if self.private:
                self._stage = self.folder
            else:
                make_parent(self.folder)
                self._stack.enter_context(output_lock(self.folder))
                sweep_stale(self.folder)
                stage = side_path(self.folder, "tmp")
                try:
                    stage.mkdir()
                except OSError as exc:
                    self._stack.close()
                    raise OutputError(self.folder.parent, None, f"cannot stage the update here ({exc.strerror}); "
                                                                "the checkpoint is unchanged") from None
                self._stage = stage
        return self._stage

    def path(self, name: str) -> Path:
        """Where to write the new version of ``name`` (a file name inside the folder)."""
        tmp = self._staging() / f".{name}.moerge-new"
        self.files[name] = tmp
        return tmp

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text)

    def commit(self) -> None:
        stage = self._staging()
        try:
            if not self.private:
                link_copy(self.folder, stage, skip=set(self.files))
            for name, tmp in self.files.items():
                target = self.folder / name
                if target.exists():
                    shutil.copymode(target, tmp)
                os.replace(tmp, stage / name)
            if not self.private:
                shutil.copymode(self.folder, stage)
                swap_in(stage, self.folder, force=True)
        except OSError as exc:
            self.discard()
            raise OutputError(self.folder, None, f"cannot update the checkpoint ({exc}); it is unchanged") from None
        except BaseException:
            self.discard()
            raise
        self._stack.close()

    def discard(self) -> None:
        if self.private:
            for tmp in self.files.values():
                tmp.unlink(missing_ok=True)
        elif self._stage is not None:
            remove(self._stage)
        self._stack.close()


def link_copy(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Copy a checkpoint folder's files into ``dst``: weight shards as hard links (copies where links are
    impossible), everything else as real copies.  Subfolders are copied; hidden names and ``skip`` are not."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith(".") or f.name in skip:
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
