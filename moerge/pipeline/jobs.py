"""Jobs: what the executor runs to produce each planned output tensor.

A :class:`~moerge.pipeline.execute.Job` declares the tensors it writes (from the plan) and a ``run`` that
yields them in that order.  Two kinds of job make every build:

* a **static** job per unrouted tensor: load the base tensor and the experts' task vectors, merge, cast
  (integer and bool tensors are copied);
* a **routed-linear** job per routed linear: the shared weight W_s (the static merge, or the base), then each
  expert's tensors in the unit's storage kind (``moerge.kinds``), built from ``W_s`` and the expert's own
  weight (or its LoRA factors).

Tensors are computed on the build's device and written from the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..io.scratch import scratch_matrix
from ..io.writer import TensorSpec
from ..kinds import Scratch
from ..merge.streaming import Rows, merged_blocks, streamable
from .context import BuildContext
from .execute import Job, Output
from .plan import Plan, RoutedUnit, routed_specs, static_dtype
from .units import Linear


def static_job(ctx: BuildContext, name: str) -> Job:
    """The static merge of one base tensor: whole, or row block by row block when it is larger than a block
    and the method streams (:mod:`moerge.merge.streaming`; the same bytes either way)."""
    spec = TensorSpec(name, tuple(ctx.base.index[name].shape), static_dtype(ctx, name))
    copied = not spec.dtype.is_floating_point or spec.dtype.itemsize == 1  # int, bool, fp8: the base's bytes
    ranges = ctx.blocks(name)
    streams = not copied and len(ranges) > 1 and streamable(ctx.method, ctx.params)

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        if copied:
            yield name, ctx.base.get(name)
        elif streams:
            for block in merged_blocks(ctx.method, ctx.params, name, spec.shape, ranges, ctx.read(name)):
                yield name, block.to(spec.dtype)
        else:
            base = ctx.load(name)
            yield name, ctx.merged(name, base, ctx.deltas(name, base)).to(spec.dtype)

    return Job(name, [spec], run, work=ctx.block_work(name, 4) if streams else 0)


def shared_and_experts(plan: Plan, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 shared tensor and every expert's own fp32 tensor for one routed weight or bias (on the device); a tied
    head's from the input embedding (:meth:`BuildContext.stored_name`)."""
    ctx = plan.ctx
    base = ctx.load(name)
    taus = ctx.deltas(name, base)
    experts = ctx.expert_weights(name, base, taus)
    shared = base.float() if shared_is_base(plan, name) else ctx.merged(name, base, taus)
    return shared, experts


def shared_is_base(plan: Plan, name: str) -> bool:
    """Whether routed tensor ``name``'s W_s is the base's: the plan's choice, except for a tied head, whose W_s is
    the input embedding as written (the static merge)."""
    return plan.shared_is_base and plan.ctx.stored_name(name) == name


def routed_whole(plan: Plan, ru: RoutedUnit, lin: Linear) -> bool:
    """Whether a routed linear is built from whole tensors: one block, experts of mixed kinds, or small enough."""
    return len(plan.ctx.blocks(lin.weight)) == 1 or not ru.uniform or plan.ctx.fits_whole(lin.weight)


def routed_linear_job(plan: Plan, ru: RoutedUnit, lin: Linear) -> Job:
    """Shared weight, bias, then every expert's tensors of one routed linear (row blocks when it is large)."""
    ranges = plan.ctx.blocks(lin.weight)
    whole = routed_whole(plan, ru, lin)
    run = _routed_whole if whole else _routed_blocks
    work = plan.ctx.block_work(lin.weight, 6, whole=whole)
    return Job(lin.path, routed_specs(plan, ru, lin), lambda: run(plan, ru, lin, ranges), work=work)


def _routed_whole(plan: Plan, ru: RoutedUnit, lin: Linear, ranges: list[Rows]) -> Iterator[Output]:
    ctx, dt = plan.ctx, plan.float_dtype
    w_s, w_experts = shared_and_experts(plan, lin.weight)
    if not lin.tied:  # a tied head's W_s is the input embedding's merge, written by its static job
        yield lin.weight, w_s.to(dt)
    yield from _bias_shared(plan, lin)
    for e, src in enumerate(ctx.sources):
        factors = src.lora_factors(ctx.stored_name(lin.weight), w_s.device)
        for k, t in ru.build(lin, e, w_s, w_experts[e], factors).items():
            yield f"{lin.path}.experts.{e}.{k}", t.to(dt) if t.is_floating_point() else t
        yield from _bias_delta(plan, lin, e)


def _routed_blocks(plan: Plan, ru: RoutedUnit, lin: Linear, ranges: list[Rows]) -> Iterator[Output]:
    """The same outputs over row blocks: W_s is written block by block and kept in a file-backed scratch matrix
    (no heap copy), then each expert's kind reads (W_s rows, W_e rows) pairs (:meth:`ExpertKind.build_rows`)."""
    ctx, dt = plan.ctx, plan.float_dtype
    scratch = scratch_matrix(ctx.scratch, lin.shape)  # (O, I) float32
    for rows, block in zip(ranges, _shared_blocks(plan, lin.weight, ranges)):
        scratch[rows[0]:rows[1]] = block.cpu()
        if not lin.tied:
            yield lin.weight, block.to(dt)
    yield from _bias_shared(plan, lin)
    for e, src in enumerate(ctx.sources):
        def read(rows: Rows, e: int = e) -> tuple[torch.Tensor, torch.Tensor]:
            w_e = ctx.expert_weight(e, lin.weight, ctx.load(lin.weight, rows), rows)
            return scratch[rows[0]:rows[1]].to(ctx.device), w_e

        factors = src.lora_factors(ctx.stored_name(lin.weight), ctx.device)
        for k, t in ru.kind.build_rows(lin.shape, ranges, read, factors, ru.cfg, _scratch(ctx)):
            yield f"{lin.path}.experts.{e}.{k}", t.to(dt) if t.is_floating_point() else t
        yield from _bias_delta(plan, lin, e)


def _scratch(ctx: BuildContext) -> Scratch:
    """Where a kind assembles a whole (O, I) fp32 matrix: on an accelerator, its memory (one delta of a 70B MLP
    is 0.9 GB); on the CPU, a file-backed scratch matrix beside the output (page cache, not heap)."""
    if ctx.device.type != "cpu":
        return lambda shape: torch.empty(shape, dtype=torch.float32, device=ctx.device)
    return lambda shape: scratch_matrix(ctx.scratch, shape)


def _shared_blocks(plan: Plan, name: str, ranges: list[Rows]) -> Iterator[torch.Tensor]:
    """W_s row block by row block: the base's rows, or the static merge's (:mod:`moerge.merge.streaming`)."""
    ctx = plan.ctx
    if shared_is_base(plan, name):
        yield from (ctx.load(name, rows).float() for rows in ranges)
        return
    if not streamable(ctx.method, ctx.params):  # DARE / DELLA need the whole tensor: one merge, then its rows
        merged = ctx.merged(name, ctx.load(name), ctx.deltas(name, ctx.load(name)))
        yield from (merged[a:b] for a, b in ranges)
        return
    yield from merged_blocks(ctx.method, ctx.params, ctx.stored_name(name), ctx.shape(name), ranges, ctx.read(name))


def _bias_shared(plan: Plan, lin: Linear) -> Iterator[Output]:
    if lin.bias:
        yield lin.bias_name, shared_and_experts(plan, lin.bias_name)[0].to(plan.float_dtype)


def _bias_delta(plan: Plan, lin: Linear, e: int) -> Iterator[Output]:
    if lin.bias:
        b_s, b_experts = shared_and_experts(plan, lin.bias_name)  # (O,): cheap to recompute
        yield f"{lin.path}.experts.{e}.bias_delta", (b_experts[e] - b_s).to(plan.float_dtype)


def plan_jobs(plan: Plan) -> list[Job]:
    """One job per output tensor of a static merge, or per routed linear; in the base's tensor order, then the
    routed linears whose weight the base does not store under their name (a tied head: :meth:`Plan.outputs`)."""
    routed = plan.routed_linears()
    skip = {lin.bias_name for ru in plan.routed for lin in ru.unit.linears}
    jobs = []
    for name in plan.ctx.base.names:
        if name in routed:
            jobs.append(routed_linear_job(plan, *routed[name]))
        elif name not in skip:
            jobs.append(static_job(plan.ctx, name))
    return jobs + [routed_linear_job(plan, ru, lin) for ru, lin in plan.tied_linears()]
