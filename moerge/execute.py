"""The one streaming executor: jobs -> sharded writer, with a progress bar.

A :class:`Job` declares the tensors it will produce (names, shapes, dtypes) and a ``run`` callable that
yields them.  Because every output's spec is known before any work starts, the writer lays out the shards
up front and streams bytes straight to disk; each job's inputs are freed as soon as it has run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import CheckpointError
from .io.loader import all_finite
from .io.writer import ShardedWriter, TensorSpec


@dataclass
class Job:
    label: str
    specs: list[TensorSpec]
    run: Callable[[], Iterator[tuple[str, torch.Tensor]]]


def execute(jobs: list[Job], folder: Path, shard_size: int, *, progress: bool = True, desc: str = "build",
            prefix: str = "model") -> list[Path]:
    specs = [s for job in jobs for s in job.specs]
    writer = ShardedWriter(folder, specs, shard_size, prefix=prefix)
    for job in tqdm(jobs, desc=desc, unit="tensor", disable=not progress, dynamic_ncols=True):
        for name, tensor in job.run():
            if not all_finite(tensor):
                raise CheckpointError(folder, name, "the merge produced NaN/Inf values")
            writer.write(name, tensor)
    return writer.finish()
