"""Rename and drop tensors of a safetensors shard by copying bytes (no tensor is decoded, nothing is rounded).

``moerge remove-expert`` renumbers the expert tensors after the removed one (``P.experts.3.A`` ->
``P.experts.2.A``) and drops the removed expert's: :func:`expert_renames` says which, :func:`rewrite_shard`
writes the new shard (a new file: shards shared with other folders through hard links are never written in
place), streaming each kept tensor's bytes in blocks of at most 64 MiB.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from ..errors import CheckpointError

_EXPERT = re.compile(r"^(?P<linear>.+)\.experts\.(?P<e>\d+)\.(?P<key>[^.]+)$")
BLOCK = 64 << 20


def expert_renames(tensors: list[str], e: int) -> dict[str, str | None]:
    """For each expert tensor whose index changes when expert ``e`` is removed: its new name (None = dropped)."""
    out: dict[str, str | None] = {}
    for name in tensors:
        m = _EXPERT.match(name)
        if m is None or int(m["e"]) < e:
            continue
        i = int(m["e"])
        out[name] = None if i == e else f"{m['linear']}.experts.{i - 1}.{m['key']}"
    return out


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def rewrite_shard(src: Path, dst: Path, renames: dict[str, str | None]) -> list[str]:
    """Write ``src`` to the new file ``dst`` with ``renames`` applied (None drops a tensor); returns the tensor
    names written, in data order.  Other tensors and the metadata are kept as they are."""
    header, data_start = _read_header(src)
    meta = header.pop("__metadata__", None)
    kept = sorted(((renames.get(n, n), info) for n, info in header.items() if renames.get(n, n) is not None),
                  key=lambda kv: kv[1]["data_offsets"][0])
    new_header: dict = {} if meta is None else {"__metadata__": meta}
    offset = 0
    for name, info in kept:
        if name in new_header:
            raise CheckpointError(src, name, "two tensors would share this name after the rename")
        start, end = info["data_offsets"]
        new_header[name] = {**info, "data_offsets": [offset, offset + end - start]}
        offset += end - start
    raw = json.dumps(new_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        fout.write(len(raw).to_bytes(8, "little") + raw)
        for _, info in kept:
            start, end = info["data_offsets"]
            fin.seek(data_start + start)
            left = end - start
            while left:
                chunk = fin.read(min(left, BLOCK))
                if not chunk:
                    raise CheckpointError(src, None, "truncated safetensors file")
                fout.write(chunk)
                left -= len(chunk)
    return [name for name, _ in kept]
