"""Read one tensor at a time from a model folder, memory-mapped.

``TensorLoader.get(name)`` opens the tensor's shard (kept open, mmap) and returns just that tensor; nothing
else is read.  ``check_finite`` turns NaN/Inf into a :class:`CheckpointError` naming file and tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .index import CheckpointIndex


class TensorLoader:
    def __init__(self, index: CheckpointIndex) -> None:
        self.index = index
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(path, None, f"truncated or corrupt safetensors file ({exc})") from None
        return self._handles[path]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name``, or only its rows ``[a, b)`` of dimension 0 (nothing else is read)."""
        if name not in self.index:
            raise CheckpointError(self.index.folder, name, "tensor missing")
        info = self.index[name]
        if self.index.format == "pickle":
            if info.file not in self._pickled:
                self._pickled[info.file] = torch.load(info.file, map_location="cpu", weights_only=True, mmap=True)
            t = self._pickled[info.file][name]
            return t if rows is None else t[rows[0]:rows[1]]
        try:
            if rows is not None:
                return self._handle(info.file).get_slice(name)[rows[0]:rows[1]]
            return self._handle(info.file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(info.file, name, f"cannot read tensor ({exc})") from None

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN/Inf.  Fast path: one sum (a NaN or Inf anywhere makes it non-finite); only a
    non-finite sum (possibly mere overflow) pays for the element-wise check."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, file: str | Path, name: str) -> torch.Tensor:
    """Raise if ``t`` has NaN or Inf values."""
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(file, name, f"{bad} NaN/Inf values")
    return t
