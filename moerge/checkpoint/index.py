"""The one writer of ``model.safetensors.index.json``: every tensor of the listed shard files, in order.

Builds (weights + router shard), add-expert (+ its expert shard) and remove-expert all end with it.  A folder
whose only shard is ``model.safetensors`` needs no index (transformers would ignore one).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.index import read_safetensors_header
from . import names


def index_dict(folder: Path, files: list[str], order: dict[str, list[str]] | None = None) -> dict:
    """``{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}`` of the safetensors ``files``; a
    file's tensors are listed in ``order[file]`` when given (e.g. the router shard, which safetensors writes
    sorted, in router order), else in its header order."""
    weight_map: dict[str, str] = {}
    total = 0
    for fname in files:
        header = read_safetensors_header(folder / fname)
        listed = [t for t in (order or {}).get(fname, []) if t in header]
        for tname in [*listed, *(t for t in header if t not in set(listed))]:
            weight_map[tname] = fname
            total += header[tname].nbytes
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def write_index(folder: Path, files: list[str | Path], order: dict[str, list[str]] | None = None) -> Path | None:
    """Write the index of ``files`` (names inside ``folder``); None (nothing written) for a lone
    ``model.safetensors``."""
    fnames = [Path(f).name for f in files]
    if fnames == [names.SINGLE_SHARD]:
        return None
    path = folder / names.INDEX
    path.write_text(json.dumps(index_dict(folder, fnames, order), indent=2) + "\n")
    return path


def indexed_files(folder: Path) -> list[str]:
    """The shard files a folder's index lists, in order of first appearance (or the lone shard)."""
    path = folder / names.INDEX
    if not path.is_file():
        return [names.SINGLE_SHARD] if (folder / names.SINGLE_SHARD).is_file() else []
    return list(dict.fromkeys(json.loads(path.read_text())["weight_map"].values()))
