"""On-disk cache of per-unit conflict metrics, so that re-planning a recipe over the same inputs (another kind, budget,
threshold or `moerge plan` after `moerge analyze`) does not stream every task vector again.

Key: a sha256 of what the metrics depend on -- every file of the base and expert folders (resolved path, size,
mtime), the recipe's merge block and seed (the static merge enters ``merge_error``; DARE masks depend on the seed),
the trimming density and :data:`VERSION`.  Value: ``{unit path: {metric: value}}`` in
``$MOERGE_CACHE/analysis/<key>.json`` (default ``~/.cache/moerge``; ``$MOERGE_ANALYSIS_CACHE`` overrides the folder); units missing from it are computed and added.
``MOERGE_NO_CACHE=1`` turns the cache off.  The cache is best effort: an unreadable or unwritable cache is skipped
silently, it never fails a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION = 1  # bump when a metric's definition changes


def cache_dir() -> Path | None:
    """``$MOERGE_ANALYSIS_CACHE``, else ``$MOERGE_CACHE/analysis`` (default ``~/.cache/moerge/analysis``); None
    when ``MOERGE_NO_CACHE`` is set."""
    if os.environ.get("MOERGE_NO_CACHE", "").strip() not in ("", "0"):
        return None
    if os.environ.get("MOERGE_ANALYSIS_CACHE"):
        return Path(os.environ["MOERGE_ANALYSIS_CACHE"]).expanduser()
    root = os.environ.get("MOERGE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "moerge") / "analysis"


def folder_stamp(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every file directly in ``folder`` (weights, configs, adapter configs)."""
    folder = Path(folder).resolve()
    out = []
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            out.append((f.name, st.st_size, st.st_mtime_ns))
    return [(str(folder), 0, 0), *out]


def inputs_key(folders: list[Path], merge: dict[str, Any], seed: int, density: float) -> str:
    """The cache key of an analysis of the experts ``folders[1:]`` against the base ``folders[0]``."""
    blob = json.dumps({"v": VERSION, "inputs": [folder_stamp(f) for f in folders], "merge": merge, "seed": seed,
                       "density": density}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(key: str) -> dict[str, dict[str, float]]:
    """The cached metrics of ``key`` ({} when absent, unreadable or the cache is off)."""
    root = cache_dir()
    if root is None:
        return {}
    try:
        data = json.loads((root / f"{key}.json").read_text())
        return {str(k): {str(m): float(v) for m, v in d.items()} for k, d in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def save(key: str, metrics: dict[str, dict[str, float]]) -> None:
    """Write ``metrics`` for ``key`` atomically (a temporary file renamed into place); errors are ignored."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(metrics, f)

    atomic_write(cache_dir(), f"{key}.json", write)


def atomic_write(root: Path | None, name: str, write: Callable[[str], None]) -> None:
    """Best effort: ``write(tmp)`` fills a temporary file in ``root`` that is then renamed to ``root / name``;
    nothing happens when ``root`` is None, and an OSError leaves nothing behind."""
    if root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
    except OSError:
        return
    try:
        write(tmp)
        os.replace(tmp, root / name)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
