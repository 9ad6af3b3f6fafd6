"""``--device auto|cpu|cuda[:N]``: where a command computes (task vectors, merges, metrics, SVDs, features).

Tensors are read from disk on the CPU (memory-mapped), moved to the device one job at a time, computed there
and brought back to the CPU for writing.  ``auto`` is the first GPU when there is one, else the CPU.
"""

from __future__ import annotations

import re

import torch

from .errors import MoergeError

CHOICES = "auto, cpu, cuda, cuda:N"


def resolve(spec: str | torch.device | None = "auto") -> torch.device:
    """The device of ``--device`` (raises a one-line error for a device this machine does not have)."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise MoergeError(None, "--device", f"unknown device '{spec}'; one of {CHOICES}")
    if not torch.cuda.is_available():
        raise MoergeError(None, "--device", f"'{spec}' asked for, but torch sees no CUDA device here")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise MoergeError(None, "--device", f"'{spec}' asked for, but there are {torch.cuda.device_count()} "
                                            "CUDA device(s)")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
