"""Atomic output folders: write into a temporary folder beside the target, swap it in at the end.

Beside a target ``OUT`` live, only while a moerge process writes it:

* ``.OUT.moerge-lock``: held (``flock``) by the one process writing ``OUT``; a second writer fails at once,
  naming the holder's pid, instead of both printing "wrote" and one result being lost.  The kernel drops the
  lock when its process dies, even by ``kill -9``.
* ``.OUT.moerge-tmp-<pid>-<hex>``: the folder being written.  On any error or interrupt (KeyboardInterrupt,
  and SIGTERM, which the CLI turns into one) it is removed and ``OUT`` is left as it was.
* ``.OUT.moerge-old-<pid>-<hex>``: the previous ``OUT`` while ``--force`` swaps it out (only where the kernel
  cannot exchange two folders in one rename).

A process killed outright leaves its temporary folder behind; the next writer of the same target removes the
ones whose process is gone (it holds the lock, so nobody else is writing them) and names any others in one
warning.  Without ``force`` the final rename never replaces a folder that appeared during the build.

Inputs are never outputs: :func:`check_output` refuses a target that is, contains or lies inside an input of
the run (symlinks resolved), with or without ``force`` (in-place edits pass no such input).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import signal
import sys
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

# errors that mean "the output cannot be written here", whatever file was being written
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}
_SIDE = re.compile(r"\.moerge-(tmp|old)-(?:(\d+)-)?[0-9a-f]+$")

Inputs = Sequence[tuple[str, Path]]  # (what, path): ("base", /x/base), ("expert 'imdb'", ...)


def side_path(target: Path, kind: str) -> Path:
    """A fresh ``.OUT.moerge-<kind>-<pid>-<hex>`` beside ``target``."""
    return target.parent / f".{target.name}.moerge-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_inputs(target: Path, inputs: Inputs) -> None:
    """Refuse a target that is, contains or lies inside an input of the run (paths resolved)."""
    out = target.resolve()
    for what, path in inputs:
        inp = Path(path).resolve()
        if out == inp:
            how = "is"
        elif out in inp.parents:
            how = "contains"
        elif inp in out.parents:
            how = "lies inside"
        else:
            continue
        raise OutputError(target, None, f"output folder {how} an input of this run ({what}: {inp}); "
                                        "moerge never writes over its inputs")


def check_output(target: Path, force: bool, inputs: Inputs = ()) -> None:
    check_inputs(target, inputs)
    if target.exists() and not target.is_dir():
        raise OutputError(target, None, "output path exists and is not a folder")
    try:
        not_empty = target.is_dir() and any(target.iterdir())
    except OSError as exc:
        raise OutputError(target, None, f"cannot read the output folder ({exc.strerror})") from None
    if not_empty and not force:
        raise OutputError(target, None, "output folder exists and is not empty (use --force to replace it)")


@contextmanager
def atomic_output(target: str | Path, force: bool = False, inputs: Inputs = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``target``."""
    target = Path(target).absolute()
    check_output(target, force, inputs)
    make_parent(target)
    with output_lock(target):
        sweep_stale(target)
        tmp = side_path(target, "tmp")
        try:
            tmp.mkdir()
        except OSError as exc:
            raise OutputError(target.parent, None, f"cannot create the output folder here ({exc.strerror})") from None
        try:
            yield tmp
            swap_in(tmp, target, force)
        except BaseException as exc:
            remove(tmp)
            reason = write_error(exc, tmp)
            if reason is None:
                raise
            raise OutputError(target, None, f"cannot write the output ({reason}); nothing was written there") from None


def make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(target.parent, None, f"cannot create the parent folder ({exc.strerror})") from None


def write_error(exc: BaseException, tmp: Path) -> str | None:
    """Why the output could not be written (disk full, read-only, quota), or None for any other error: an
    OSError on a file inside ``tmp`` or with a write errno, or safetensors' own I/O error (its Rust writer)."""
    if isinstance(exc, OSError):
        name = exc.filename if isinstance(exc.filename, str) else None
        inside = Path(name).absolute().is_relative_to(tmp) if name is not None else exc.errno in WRITE_ERRNOS
        return (exc.strerror or str(exc)) if inside else None
    if type(exc).__name__ == "SafetensorError" and "IoError" in str(exc):
        found = re.search(r'message: "([^"]+)"', str(exc))
        return found.group(1) if found else " ".join(str(exc).split())
    return None


# ---------------------------------------------------------------- the final swap

def swap_in(tmp: Path, target: Path, force: bool) -> None:
    """Make ``tmp`` the target.  Without ``force`` a non-empty folder that appeared meanwhile is an error; with
    it the old folder (or symlink) is swapped out whole and then removed."""
    if not force or not os.path.lexists(target):
        try:
            os.rename(tmp, target)  # replaces nothing but an empty folder
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise OutputError(target, None, "output path appeared during the build and is not an empty folder; "
                                            "it was left as it is and the new output discarded (use --force to "
                                            "replace it)") from None
        return
    if exchange(tmp, target):  # tmp now holds the old folder
        remove(tmp)
        return
    old = side_path(target, "old")
    with _signals_deferred():
        os.rename(target, old)
        os.rename(tmp, target)
    remove(old)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for a few syscalls (main thread only; elsewhere a no-op)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def remove(path: Path) -> None:
    """Remove a folder, file or symlink (never what a symlink points to); errors ignored."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


# ---------------------------------------------------------------- lock and stale folders

def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.moerge-lock"


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold ``.OUT.moerge-lock`` for the block; another holder is an :class:`OutputError` naming its pid."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = lock_path(target)
    fd = _acquire(path, target)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)


def _acquire(path: Path, target: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(target.parent, None, f"cannot create the output folder here ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(target, None, f"another moerge process (pid {holder}) is writing this output; wait "
                                            "for it to finish or choose another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and lock: take the new one


def sweep_stale(target: Path) -> list[Path]:
    """Remove temporary / old folders of ``target`` left by dead processes (call with the lock held); a dead
    process's old folder is restored when the target itself is missing.  Returns what was removed."""
    removed, alive = [], []
    prefix = f".{target.name}.moerge-"
    try:
        entries = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and _SIDE.search(p.name)]
    except OSError:
        return []
    for p in sorted(entries):
        kind, pid = _SIDE.search(p.name).groups()  # type: ignore[union-attr]
        if pid is not None and int(pid) != os.getpid() and pid_alive(int(pid)):
            alive.append(p)
        elif kind == "old" and not os.path.lexists(target):
            os.rename(p, target)
            warnings.warn(f"restored {target} from {p.name}, left by an interrupted --force build", stacklevel=3)
        else:
            remove(p)
            removed.append(p)
    if alive:
        warnings.warn(f"temporary folders of other running processes beside {target}: "
                      f"{', '.join(p.name for p in alive)}", stacklevel=3)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
