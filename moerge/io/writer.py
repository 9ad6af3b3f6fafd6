"""Streaming sharded safetensors writer.

The executor knows every output tensor's name, shape and dtype before computing any of them (the plan), so
the writer lays the shards out up front: it cuts shards at ``shard_size`` bytes, writes each shard's
header first and then streams each tensor's bytes as it is produced.  Peak memory is therefore one tensor,
not one shard.  Tensors must arrive in plan order.  ``finish()`` renames shards to the Hugging Face names
(``model-00001-of-00003.safetensors``, or ``model.safetensors`` for one shard) and writes the index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..dtypes import by_torch
from ..errors import MoergeError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def st_dtype(self) -> str:
        return by_torch(self.dtype).st

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * by_torch(self.dtype).nbytes


def layout_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Greedy cut in order: a shard closes when the next tensor would overflow it (a tensor larger than
    ``shard_size`` gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return [s for s in shards if s] or [[]]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.st_dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Write ``specs`` (in order) into ``folder`` as safetensors shards of at most ``shard_size`` bytes."""

    def __init__(self, folder: Path, specs: list[TensorSpec], shard_size: int, prefix: str = "model") -> None:
        self.folder, self.prefix = folder, prefix
        self.shards = layout_shards(specs, shard_size)
        self._order = [s for shard in self.shards for s in shard]
        self._pos = 0
        self._shard_i = -1
        self._file: BinaryIO | None = None
        self._shard_end = 0

    def _tmp_name(self, i: int) -> Path:
        return self.folder / f".{self.prefix}-shard-{i}.tmp"

    def _open_next(self) -> None:
        if self._file:
            self._file.close()
        self._shard_i += 1
        self._file = open(self._tmp_name(self._shard_i), "wb")  # noqa: SIM115 - stays open across write() calls
        self._file.write(_header(self.shards[self._shard_i], {"format": "pt"}))
        self._shard_end += len(self.shards[self._shard_i])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._order):
            raise MoergeError(self.folder, name, "internal: more tensors than planned")
        spec = self._order[self._pos]
        if spec.name != name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise MoergeError(self.folder, name, f"internal: expected {spec.name} {spec.shape} {spec.dtype}, got "
                                                 f"{name} {tuple(tensor.shape)} {tensor.dtype}")
        while self._pos >= self._shard_end or self._file is None:
            self._open_next()
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._pos += 1

    def finish(self) -> list[Path]:
        """Close, rename shards to their final names, write the index; returns the shard paths."""
        if self._pos != len(self._order):
            missing = self._order[self._pos].name
            raise MoergeError(self.folder, missing, "internal: tensor planned but never written")
        while self._shard_i < len(self.shards) - 1:  # empty trailing shards (only when nothing was planned)
            self._open_next()
        if self._file:
            self._file.close()
        n = len(self.shards)
        names = [f"{self.prefix}.safetensors"] if n == 1 else [
            f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, fname in enumerate(names):
            self._tmp_name(i).rename(self.folder / fname)
        if n > 1:
            weight_map = {s.name: names[i] for i, shard in enumerate(self.shards) for s in shard}
            total = sum(s.nbytes for s in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / f for f in names]
