"""``moerge inspect``: what a checkpoint holds and how its bytes split (shared, per expert kind, routers)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..io.index import CheckpointIndex
from . import names
from .folder import Checkpoint
from .manifest import Manifest


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def storage_breakdown(index: CheckpointIndex, manifest: Manifest | dict | None) -> dict[str, int]:
    """Bytes per category: shared (base-shaped tensors), ``experts:<kind>``, routers."""
    if isinstance(manifest, dict):  # a config.json dict
        block = manifest.get("moerge")
        manifest = Manifest.from_dict(block, "config.json") if block else None
    units = manifest.units if manifest is not None else {}
    out: dict[str, int] = defaultdict(int)
    for name, info in index.tensors.items():
        if names.is_router(name):
            out["routers"] += info.nbytes
        elif ".experts." in name:
            unit = name.rsplit(".experts.", 1)[0].rsplit(".", 1)[0]
            out[f"experts:{units[unit].kind if unit in units else '?'}"] += info.nbytes
        else:
            out["shared"] += info.nbytes
    return dict(out)


def inspect_checkpoint(path: Path) -> str:
    ckpt = Checkpoint.open(path)
    index = ckpt.index()
    head = f"{path}: model_type {ckpt.config.get('model_type')}, {len(index.tensors)} tensors, "
    lines = [head + human(index.total_bytes)]
    m = ckpt.manifest
    if m is not None:
        lines.append(f"experts: {', '.join(m.experts)}; level {m.level}; {len(m.units)} routed units")
        if m.routes:
            lines.append(f"composed routes: {', '.join(m.routes)}")
        if m.anchors:
            lines.append("anchored experts (add-expert): " + ", ".join(f"{n} ({len(u)} units)" for n, u in m.anchors.items()))
        if m.unknown is not None:
            lines.append(f"unknown prompts: shared weights above score {m.unknown.threshold:.4g} ({m.unknown.score}, "
                         f"{m.unknown.segments} segments{', per-route thresholds' if m.unknown.per_route else ''})")
        parts = storage_breakdown(index, m)
        base = parts.get("shared", 0)
        for key, n in sorted(parts.items()):
            lines.append(f"  {key:<16} {human(n):>10}  {n / max(base, 1):.3f}x base")
        lines.append(f"  {'total':<16} {human(index.total_bytes):>10}  {index.total_bytes / max(base, 1):.3f}x base")
    else:
        dtypes: dict[str, int] = defaultdict(int)
        for info in index.tensors.values():
            dtypes[info.dtype] += info.nbytes
        lines += [f"  {k}: {human(v)}" for k, v in dtypes.items()]
    if (path / names.REPORT).is_file():
        cal = json.loads((path / names.REPORT).read_text())
        lines.append(f"calibration: held-out accuracy {cal.get('accuracy')}")
    return "\n".join(lines)
