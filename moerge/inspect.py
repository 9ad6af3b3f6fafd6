"""``moerge inspect``: what a checkpoint holds and how its bytes split (shared, per expert kind, routers)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .errors import CheckpointError
from .io.index import CheckpointIndex
from .io.sources import read_json


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def storage_breakdown(index: CheckpointIndex, config: dict) -> dict[str, int]:
    """Bytes per category: shared (base-shaped tensors), ``experts:<kind>``, routers."""
    units = (config.get("moerge") or {}).get("units", {})
    out: dict[str, int] = defaultdict(int)
    for name, info in index.tensors.items():
        if ".moerge_router." in name or name.startswith("moerge_router."):
            out["routers"] += info.nbytes
        elif ".experts." in name:
            unit = name.rsplit(".experts.", 1)[0].rsplit(".", 1)[0]
            out[f"experts:{units.get(unit, {}).get('kind', '?')}"] += info.nbytes
        else:
            out["shared"] += info.nbytes
    return dict(out)


def base_bytes(config: dict, index: CheckpointIndex) -> int:
    """Bytes of the dense base at the checkpoint's dtype: the shared tensors are exactly base-shaped."""
    return storage_breakdown(index, config).get("shared", index.total_bytes)


def inspect_checkpoint(path: Path) -> str:
    if path.exists() and not path.is_dir():
        raise CheckpointError(path, None, "not a model folder")
    config = read_json(path / "config.json")
    index = CheckpointIndex.from_folder(path)
    lines = [f"{path}: model_type {config.get('model_type')}, {len(index.tensors)} tensors, {human(index.total_bytes)}"]
    if config.get("model_type") == "moerge":
        m = config.get("moerge")
        if not isinstance(m, dict) or not all(k in m for k in ("experts", "level", "units")):
            raise CheckpointError(path / "config.json", "moerge", "malformed moerge block (needs experts, level, "
                                                                  "units)")
        lines.append(f"experts: {', '.join(m['experts'])}; level {m['level']}; {len(m['units'])} routed units")
        parts = storage_breakdown(index, config)
        base = parts.get("shared", 0)
        for key, n in sorted(parts.items()):
            lines.append(f"  {key:<16} {human(n):>10}  {n / max(base, 1):.3f}x base")
        lines.append(f"  {'total':<16} {human(index.total_bytes):>10}  {index.total_bytes / max(base, 1):.3f}x base")
    else:
        dtypes: dict[str, int] = defaultdict(int)
        for info in index.tensors.values():
            dtypes[info.dtype] += info.nbytes
        lines += [f"  {k}: {human(v)}" for k, v in dtypes.items()]
    if (path / "calibration.json").is_file():
        cal = json.loads((path / "calibration.json").read_text())
        lines.append(f"calibration: held-out accuracy {cal.get('accuracy')}")
    return "\n".join(lines)
