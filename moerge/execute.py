"""The one streaming executor: jobs -> sharded writer, with a progress bar.

A :class:`Job` declares the tensors it will produce (names, shapes, dtypes) and a ``run`` callable that
yields them.  Because every output's spec is known before any work starts, the writer lays out the shards
up front and streams bytes straight to disk; each job's inputs are freed as soon as it has run.

With ``workers > 1`` independent jobs run in a thread pool (torch ops release the GIL), each with
``cpus // workers`` intra-op threads, while the calling thread writes the finished ones in plan order.  On a
few cores, whole tensors in parallel on one thread each beat one tensor at a time on all threads (no
per-op fork/join, and no spinning barrier stalls when another process takes a core).  :func:`plan_workers`
picks the count from the largest job, so big tensors still run one at a time; ``MOERGE_WORKERS`` overrides it.

``MOERGE_TEST_DELAY_PER_TENSOR`` (seconds, test-only) sleeps before each tensor is written, so that fault tests
can kill a build of a tiny model halfway through its output.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import CheckpointError
from .io.loader import all_finite
from .io.writer import ShardedWriter, TensorSpec

TEST_DELAY = "MOERGE_TEST_DELAY_PER_TENSOR"


@dataclass
class Job:
    label: str
    specs: list[TensorSpec]
    run: Callable[[], Iterator[tuple[str, torch.Tensor]]]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_workers(jobs: list[Job], *, cpus: int | None = None, budget: int = 1 << 30) -> int:
    """How many jobs to run at once: one per core (at most 8), as long as ``workers`` times the largest
    job's working memory (taken as 8x its output bytes) stays within ``budget``."""
    env = os.environ.get("MOERGE_WORKERS", "").strip()
    if env:
        return max(1, int(env))
    cpus = cpus or available_cpus()
    largest = max((sum(s.nbytes for s in job.specs) for job in jobs), default=0)
    return max(1, min(cpus, 8, budget // max(1, 8 * largest)))


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def _run(job: Job) -> list[tuple[str, torch.Tensor]]:
    return list(job.run())


def execute(jobs: list[Job], folder: Path, shard_size: int, *, progress: bool = True, desc: str = "build",
            prefix: str = "model", workers: int = 1) -> list[Path]:
    specs = [s for job in jobs for s in job.specs]
    writer = ShardedWriter(folder, specs, shard_size, prefix=prefix)
    delay = float(os.environ.get(TEST_DELAY, "") or 0)

    def write(outputs: Iterator[tuple[str, torch.Tensor]] | list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in outputs:
            if delay:
                time.sleep(delay)
            if not all_finite(tensor):
                raise CheckpointError(folder, name, "the merge produced NaN/Inf values")
            writer.write(name, tensor)

    bar = tqdm(total=len(jobs), desc=desc, unit="tensor", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                write(job.run())
                bar.update()
        else:
            window = 2 * workers  # jobs submitted but not yet written (finished ones hold only their outputs)
            with _intra_op_threads(max(1, available_cpus() // workers)), ThreadPoolExecutor(workers) as pool:
                pending: deque[Future[list[tuple[str, torch.Tensor]]]] = deque()
                todo = iter(jobs)
                try:
                    for job in todo:
                        pending.append(pool.submit(_run, job))
                        if len(pending) >= window:
                            break
                    while pending:
                        outputs = pending.popleft().result()
                        job = next(todo, None)
                        if job is not None:
                            pending.append(pool.submit(_run, job))
                        write(outputs)
                        del outputs
                        bar.update()
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    return writer.finish()
