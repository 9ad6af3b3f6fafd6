"""How much memory a build will need, from its plan alone (what ``moerge plan`` prints before any work).

The executor runs ``workers`` jobs at once (:func:`moerge.pipeline.execute.choose_workers`); a job reads its
tensor in row blocks of at most ``BLOCK_BYTES`` (1 MiB) of float32 (:meth:`BuildContext.blocks`), so its working
set is bounded by the block, not by the model:

* a static merge holds about ``2N + 4`` blocks (base, N task vectors, N weighted ones, masks, the result);
* a routed linear about ``2N + 6`` (plus W_s and W_e of the pass), its W_s kept in a file-backed scratch matrix
  (page cache, not the heap); one whose ``N + 2`` float32 copies fit in ``ROUTED_WHOLE_BYTES`` (64 MiB), or whose
  experts are of mixed kinds, is built from whole tensors: ``2N + 6`` whole float32 copies; a twin factorised
  exactly holds its whole delta and the SVD's workspace (about 6 full float32 matrices) — ``svd: randomized`` (the
  default above a small size) holds sketches only;
* each job in flight hands at most ``QUEUE_ITEMS`` outputs to the writer (at most ``2 * workers`` jobs);
* the process itself (Python, torch, transformers, tokenizer) takes :data:`PROCESS_BYTES`;
* the allocator keeps freed blocks for reuse: a worker's share is :data:`ALLOCATOR` x its live blocks.

Only anonymous memory is counted: the inputs are memory-mapped (page cache, evicted under pressure).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..linalg import OVERSAMPLE, choose_method
from .execute import QUEUE_ITEMS, choose_workers
from .jobs import plan_jobs, routed_whole
from .plan import Plan

PROCESS_BYTES = 360 << 20  # anonymous RSS of a moerge process after its imports (measured: 286 MB) plus margin
# a worker's anonymous memory over its live blocks: the allocator keeps freed blocks for reuse (glibc arenas).
# Fitted with 5 MiB blocks (347M / 1.1B TIES 780 / 824 MiB, ~2.4x the live blocks per worker over the process) and
# kept with 1 MiB blocks, where it bounds every measured build: 4 experts, 114M-3.4B, peak anonymous 361-407 MiB
# TIES and 363-435 MiB twin against estimates of 461 / 481-492 MiB (bench/RESULTS.md, "scale", 2026-12-06 07:18)
ALLOCATOR = 2.5


@dataclass(frozen=True)
class Estimate:
    peak: int  # bytes of anonymous memory at the worst moment
    workers: int
    job: int  # the largest job's working set

    def describe(self) -> str:
        gib = 1 << 30
        return (f"peak RAM estimate: {self.peak / gib:.2f} GiB anonymous (process {PROCESS_BYTES / gib:.2f} + "
                f"{self.workers} worker(s) x {self.job / gib:.2f} GiB working set; inputs are memory-mapped)")


def tensor_work(plan: Plan, name: str, extra: int, whole: bool = False) -> int:
    """The working set of one job over tensor ``name``: ``2N + extra`` float32 blocks (``whole``: whole tensors),
    plus its queued outputs."""
    blocks = 2 * len(plan.ctx.sources) + extra
    work = plan.ctx.block_work(name, extra, whole=whole)
    return work + QUEUE_ITEMS * 2 * work // blocks


def routed_work(plan: Plan) -> int:
    """The largest routed linear's working set (an exact SVD holds its whole matrix)."""
    worst = 0
    for ru in plan.routed:
        for lin in ru.unit.linears:
            work = tensor_work(plan, lin.weight, 6, whole=routed_whole(plan, ru, lin))
            rank = ru.cfg.rank or 16
            if ru.kind.name == "twin" and (ru.cfg.svd or choose_method(lin.shape, rank)) == "exact":
                work = max(work, 6 * 4 * lin.shape[0] * lin.shape[1])
            elif ru.kind.name == "twin":
                work += 3 * 4 * (lin.shape[0] + lin.shape[1]) * (rank + OVERSAMPLE)
            worst = max(worst, work)
    return worst


def estimate(plan: Plan) -> Estimate:
    routed = {lin.weight for ru in plan.routed for lin in ru.unit.linears}
    static = max((tensor_work(plan, n, 4) for n in plan.ctx.base.names if n not in routed), default=0)
    job = max(static, routed_work(plan))
    workers = choose_workers(plan_jobs(plan))
    job = int(ALLOCATOR * job)
    return Estimate(PROCESS_BYTES + workers * job, workers, job)
