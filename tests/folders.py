"""Read every tensor of a model folder, whatever its sharding (single file, or shards + index)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
