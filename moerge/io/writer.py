"""Streaming sharded safetensors writer.

The executor knows every output tensor's name, shape and dtype before computing any of them (the plan), so
the writer lays the shards out up front: it cuts shards at ``shard_size`` bytes (and before every name in
``breaks``), writes each shard's header first and then streams each tensor's bytes as it is produced, whole
or in consecutive row blocks.  Peak memory is therefore one row block, not one tensor or one shard.  Tensors
must arrive in plan order.  ``finish()`` renames the shards to the Hugging Face names
(``model-00001-of-00003.safetensors``, or ``model.safetensors`` for one shard unless ``indexed``); the index
is written by the caller (:func:`moerge.checkpoint.index.write_index`) once every shard of the folder exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .. import dtypes
from ..errors import MoergeError, OutputError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def st_dtype(self) -> str:
        return dtypes.to_st(self.dtype)

    @property
    def nbytes(self) -> int:
        return dtypes.nbytes(self.shape, self.dtype)


def layout_shards(specs: list[TensorSpec], shard_size: int, breaks: frozenset[str] = frozenset()) -> list[list[TensorSpec]]:
    """Greedy cut in order: a shard closes when the next tensor would overflow it (a tensor larger than
    ``shard_size`` gets a shard of its own) or when the next tensor's name is in ``breaks``."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and (used + spec.nbytes > shard_size or spec.name in breaks):
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


def shard_names(prefix: str, n: int, indexed: bool) -> list[str]:
    if n == 1 and not indexed:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Write ``specs`` (in order) into ``folder`` as safetensors shards of at most ``shard_size`` bytes."""

    def __init__(self, folder: Path, specs: list[TensorSpec], shard_size: int, prefix: str = "model", *,
                 breaks: frozenset[str] = frozenset(), indexed: bool = False) -> None:
        self.folder, self.prefix, self.indexed = folder, prefix, indexed
        self.shards = layout_shards(specs, shard_size, breaks)
        self._order = [s for shard in self.shards for s in shard]
        self._pos = 0  # index in _order of the tensor being written
        self._rows = 0  # rows of it written so far
        self._shard_i = -1
        self._file: BinaryIO | None = None
        self._shard_end = 0

    def _tmp_name(self, i: int) -> Path:
        return self.folder / f".{self.prefix}-shard-{i}.tmp"

    def _open_next(self) -> None:
        self._close()
        self._shard_i += 1
        self._file = open(self._tmp_name(self._shard_i), "wb")  # noqa: SIM115 - stays open across write() calls
        self._put(_header(self.shards[self._shard_i], {"format": "pt"}))
        self._shard_end += len(self.shards[self._shard_i])

    def _close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def _put(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            raise OutputError(self._tmp_name(self._shard_i), None, f"cannot write ({exc.strerror or exc})") from None

    @property
    def expected(self) -> TensorSpec | None:
        """The tensor the next ``write`` must continue (None when everything was written)."""
        return self._order[self._pos] if self._pos < len(self._order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The whole tensor ``name``, or its next rows (a block of consecutive rows of dimension 0)."""
        spec = self.expected
        if spec is None:
            raise MoergeError(self.folder, name, "internal: more tensors than planned")
        self._check(spec, name, tensor)
        while self._pos >= self._shard_end or self._file is None:
            self._open_next()
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._put(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._rows += data.shape[0] if spec.shape else 1
        if self._rows == (spec.shape[0] if spec.shape else 1):
            self._pos, self._rows = self._pos + 1, 0

    def _check(self, spec: TensorSpec, name: str, tensor: torch.Tensor) -> None:
        shape = tuple(tensor.shape)
        whole = shape == spec.shape and self._rows == 0
        block = bool(spec.shape) and shape[1:] == spec.shape[1:] and len(shape) == len(spec.shape) and \
            self._rows + shape[0] <= spec.shape[0]
        if spec.name != name or tensor.dtype != spec.dtype or not (whole or block):
            raise MoergeError(self.folder, name, f"internal: expected {spec.name} {spec.shape} {spec.dtype} (rows "
                                                 f"{self._rows}+), got {name} {shape} {tensor.dtype}")

    def closed_files(self) -> list[Path]:
        """The temporary files of the shards written completely so far (readable with a safetensors reader)."""
        done = self._shard_i if self._file is not None else self._shard_i + 1
        if self._file is not None and self._pos >= self._shard_end:
            self._close()
            done = self._shard_i + 1
        return [self._tmp_name(i) for i in range(done)]

    def finish(self) -> list[Path]:
        """Close and rename the shards to their final names; returns their paths (no index is written)."""
        if self._pos != len(self._order):
            missing = self._order[self._pos].name
            raise MoergeError(self.folder, missing, "internal: tensor planned but never written")
        while self._shard_i < len(self.shards) - 1:  # empty trailing shards (only when nothing was planned)
            self._open_next()
        self._close()
        names = shard_names(self.prefix, len(self.shards), self.indexed)
        for i, fname in enumerate(names):
            self._tmp_name(i).rename(self.folder / fname)
        return [self.folder / f for f in names]
