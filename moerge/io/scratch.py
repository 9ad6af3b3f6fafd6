"""Scratch matrices backed by a file: memory-mapped, so their pages belong to the page cache, not the heap.

A routed linear read in row blocks needs its shared weight ``W_s`` once per expert pass; recomputing it (a TIES
merge) each time would be slow and holding it in RAM would make peak memory grow with the largest linear.  It
is written once into a scratch file beside the output (same disk), then read back block by block.  The file is
unlinked as soon as it is mapped: nothing is left behind, even after ``kill -9``.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from pathlib import Path

import torch


def scratch_matrix(folder: Path | None, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` whose storage is a mapped, already unlinked file in ``folder``
    (the system's temporary folder when None)."""
    where = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    path = where / f".moerge-scratch-{uuid.uuid4().hex[:12]}"
    numel = math.prod(shape)
    with open(path, "wb") as f:
        f.truncate(numel * torch.empty((), dtype=dtype).element_size())
    try:
        t = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    finally:
        path.unlink(missing_ok=True)
    return t.view(shape)
