"""Shard index of a model folder, read from safetensors headers only (no tensor data is touched).

Handles ``model.safetensors``, ``model.safetensors.index.json`` + shards, adapter files, and, only when the
user allows pickle, ``pytorch_model.bin`` (loaded with ``weights_only=True``).  Headers are parsed by hand
so that a truncated or corrupt file is reported with its name before any work starts.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import BY_NAME, BY_ST
from ..errors import CheckpointError
from .files import read_json, unreadable

# views of the one dtype table (moerge.dtypes), kept under their old names for their importers
ST_DTYPES = {d.st: d.nbytes for d in BY_ST.values()}
TORCH_TO_ST = {d.name: d.st for d in BY_NAME.values()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ST_DTYPES[self.dtype]

    @property
    def mergeable(self) -> bool:
        """A float tensor a merge may do math on (not an integer, boolean or 8-bit float one)."""
        return BY_ST[self.dtype].mergeable


def _raw_header(path: Path) -> tuple[object, int, int]:
    """(parsed header JSON, header length, file size); OSError means unreadable, ValueError corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ValueError("file shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", raw_len)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"header length {n} exceeds the file size {size}")
        return json.loads(f.read(n)), n, size


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check that every tensor's bytes lie inside the file."""
    try:
        header, n, size = _raw_header(path)
    except OSError as exc:
        raise CheckpointError(path, None, unreadable(exc)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, None, f"truncated or corrupt safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, None, f"corrupt safetensors file (the header is a JSON {type(header).__name__}, "
                                          "not an object)")
    data_len = size - 8 - n
    return {name: _entry(path, name, meta, data_len) for name, meta in header.items() if name != "__metadata__"}


def _entry(path: Path, name: str, meta: object, data_len: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative ints, bytes inside the file."""
    try:
        start, end = meta["data_offsets"]  # type: ignore[index]
        dtype, shape = meta["dtype"], meta["shape"]  # type: ignore[index]
        ok = all(type(v) is int and v >= 0 for v in (start, end, *shape))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(path, name, "corrupt safetensors header entry")
    if dtype not in BY_ST:
        raise CheckpointError(path, name, f"unknown or unsupported dtype {dtype!r} in the safetensors header")
    info = TensorInfo(name, path, dtype, tuple(shape))
    if end > data_len or end - start != info.nbytes:
        raise CheckpointError(path, name, f"truncated or corrupt safetensors file (tensor bytes {start}..{end} "
                                          f"but {data_len} data bytes in the file)")
    return info


@dataclass
class CheckpointIndex:
    """Tensor name -> where it lives, for one model folder (or one adapter file)."""

    folder: Path
    tensors: dict[str, TensorInfo]
    format: str  # "safetensors" | "pickle"

    @classmethod
    def from_folder(cls, folder: str | Path, *, allow_pickle: bool = False, prefix: str = "model") -> CheckpointIndex:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(folder, None, "model folder not found")
        single, index = folder / f"{prefix}.safetensors", folder / f"{prefix}.safetensors.index.json"
        if index.is_file():
            return cls(folder, _from_index_json(index), "safetensors")
        if single.is_file():
            return cls(folder, read_safetensors_header(single), "safetensors")
        bins = sorted(folder.glob("adapter_model.bin" if prefix == "adapter_model" else "pytorch_model*.bin"))
        if bins:
            if not allow_pickle:
                raise CheckpointError(bins[0], None, "refusing to unpickle a .bin checkpoint; convert it to "
                                                     "safetensors or pass --allow-pickle (loads with weights_only=True)")
            return cls(folder, _from_pickle(bins), "pickle")
        raise CheckpointError(folder, None, f"no {prefix}.safetensors or {prefix}.safetensors.index.json found")

    @classmethod
    def from_files(cls, folder: str | Path, files: list[Path]) -> CheckpointIndex:
        """The tensors of the given safetensors ``files`` (e.g. the shards a build has written so far)."""
        tensors: dict[str, TensorInfo] = {}
        for path in files:
            tensors.update(read_safetensors_header(Path(path)))
        return cls(Path(folder), tensors, "safetensors")

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _from_index_json(path: Path) -> dict[str, TensorInfo]:
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        got = "missing" if weight_map is None else f"a {type(weight_map).__name__}"
        raise CheckpointError(path, "weight_map", f"corrupt index file (weight_map is {got}, not an object)")
    headers: dict[str, dict[str, TensorInfo]] = {}
    out: dict[str, TensorInfo] = {}
    for name, fname in weight_map.items():
        shard = path.parent / _shard_name(path, name, fname)
        if fname not in headers:
            if not shard.is_file():
                raise CheckpointError(shard, None, f"shard listed in {path.name} is missing")
            headers[fname] = read_safetensors_header(shard)
        if name not in headers[fname]:
            raise CheckpointError(shard, name, f"tensor listed in {path.name} is missing from the shard")
        out[name] = headers[fname][name]
    return out


def _shard_name(index: Path, name: str, fname: object) -> str:
    """A shard file name from an index: a relative path that stays inside the index's folder."""
    if not isinstance(fname, str) or not fname.strip():
        raise CheckpointError(index, name, f"corrupt index file (shard name {fname!r} is not a file name)")
    norm = os.path.normpath(fname)
    if os.path.isabs(fname) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise CheckpointError(index, name, f"shard name {fname!r} points outside the model folder")
    return norm


def _from_pickle(files: list[Path]) -> dict[str, TensorInfo]:
    import torch

    out: dict[str, TensorInfo] = {}
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file for the user
            raise CheckpointError(f, None, f"cannot load pickle checkpoint ({exc})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f, None, f"not a state dict (the pickle holds a {type(sd).__name__})")
        for name, t in sd.items():
            if not hasattr(t, "dtype") or str(t.dtype).removeprefix("torch.") not in TORCH_TO_ST:
                raise CheckpointError(f, str(name), "not a tensor of a dtype moerge knows")
            out[name] = TensorInfo(name, f, TORCH_TO_ST[str(t.dtype).removeprefix("torch.")], tuple(t.shape))
    return out
