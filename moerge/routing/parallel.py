"""Process sharding for feature extraction, through ``accelerate`` (one process = the plain case).

Under a multi-process launch each process takes a contiguous slice of the items
(``PartialState.split_between_processes``), computes its results, and :func:`sharded_map` gathers every
process's results back in item order (``gather_object``) on every process.  Training and saving then run on
the main process only.  The same code runs on CPU processes (gloo) and on several GPUs (nccl).

Launching N CPU processes: ``accelerate launch --multi_gpu --num_processes N -m moerge calibrate ...`` (or
``torchrun --nproc_per_node N -m moerge ...``) on a machine without a GPU; moerge then asks accelerate for
its multi-CPU mode.  (``accelerate launch --cpu`` starts a single process unless given an MPI hostfile.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def state() -> Any:
    """The shared ``accelerate.PartialState`` (initialises torch.distributed when launched with N > 1); CPU
    mode when asked (``ACCELERATE_USE_CPU``) or when there is no GPU."""
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def sharded_map(fn: Callable[[list[int]], list[T]], n_items: int) -> list[T]:
    """``fn(indices) -> one result per index`` over ``range(n_items)``, split across processes; every
    process returns all results in index order (results must be picklable: move tensors to the CPU)."""
    st = state()
    if st.num_processes == 1:
        return fn(list(range(n_items)))
    from accelerate.utils import gather_object

    with st.split_between_processes(list(range(n_items))) as mine:
        pairs = list(zip(mine, fn(list(mine))))
    gathered: Sequence[tuple[int, Any]] = gather_object(pairs)
    return [result for _, result in sorted(gathered, key=lambda p: p[0])]


def is_main() -> bool:
    return bool(state().is_main_process)
