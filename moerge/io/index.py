"""Shard index of a model folder, read from safetensors headers only (no tensor data is touched).

Handles ``model.safetensors``, ``model.safetensors.index.json`` + shards, adapter files, and, only when the
user allows pickle, ``pytorch_model.bin`` (loaded with ``weights_only=True``).  Headers are parsed by hand
so that a truncated or corrupt file is reported with its name before any work starts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


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
        return self.numel * ST_DTYPES.get(self.dtype, 4)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check that every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(path, None, f"truncated or corrupt safetensors file ({exc})") from None
    out: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, name, "corrupt safetensors header entry") from None
        info = TensorInfo(name, path, dtype, shape)
        if end > data_len or end - start != info.nbytes:
            raise CheckpointError(path, name, f"truncated or corrupt safetensors file (tensor bytes {start}..{end} "
                                              f"but {data_len} data bytes in the file)")
        out[name] = info
    return out


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
        bins = sorted(folder.glob("pytorch_model*.bin")) + sorted(folder.glob("adapter_model.bin"))
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
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(path, "weight_map", f"corrupt index file ({exc})") from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    out: dict[str, TensorInfo] = {}
    for name, fname in weight_map.items():
        shard = path.parent / fname
        if fname not in headers:
            if not shard.is_file():
                raise CheckpointError(shard, None, f"shard listed in {path.name} is missing")
            headers[fname] = read_safetensors_header(shard)
        if name not in headers[fname]:
            raise CheckpointError(shard, name, f"tensor listed in {path.name} is missing from the shard")
        out[name] = headers[fname][name]
    return out


def _from_pickle(files: list[Path]) -> dict[str, TensorInfo]:
    import torch

    out: dict[str, TensorInfo] = {}
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file for the user
            raise CheckpointError(f, None, f"cannot load pickle checkpoint ({exc})") from None
        for name, t in sd.items():
            out[name] = TensorInfo(name, f, TORCH_TO_ST.get(str(t.dtype).replace("torch.", ""), "F32"), tuple(t.shape))
    return out
