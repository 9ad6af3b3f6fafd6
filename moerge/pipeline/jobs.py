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

from ..io.writer import TensorSpec
from .context import BuildContext
from .execute import Job
from .plan import Plan, RoutedUnit, routed_specs, static_dtype
from .units import Linear


def static_job(ctx: BuildContext, name: str) -> Job:
    spec = TensorSpec(name, tuple(ctx.base.index[name].shape), static_dtype(ctx, name))

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        if not spec.dtype.is_floating_point or spec.dtype.itemsize == 1:  # int, bool, fp8: the base's bytes
            yield name, ctx.base.get(name)
            return
        base = ctx.load(name)
        yield name, ctx.merged(name, base, ctx.deltas(name, base)).to(spec.dtype)

    return Job(name, [spec], run)


def shared_and_experts(plan: Plan, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 shared tensor and every expert's own fp32 tensor for one routed weight or bias (on the device)."""
    ctx = plan.ctx
    base = ctx.load(name)
    taus = ctx.deltas(name, base)
    experts = ctx.expert_weights(name, base, taus)
    shared = base.float() if plan.shared_is_base else ctx.merged(name, base, taus)
    return shared, experts


def routed_linear_job(plan: Plan, ru: RoutedUnit, lin: Linear) -> Job:
    ctx, dt = plan.ctx, plan.float_dtype

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        w_s, w_experts = shared_and_experts(plan, lin.weight)
        yield lin.weight, w_s.to(dt)
        b_s, b_experts = shared_and_experts(plan, lin.bias_name) if lin.bias else (None, [])
        if b_s is not None:
            yield lin.bias_name, b_s.to(dt)
        for e, src in enumerate(ctx.sources):
            factors = src.lora_factors(lin.weight, w_s.device)
            for k, t in ru.build(lin, e, w_s, w_experts[e], factors).items():
                yield f"{lin.path}.experts.{e}.{k}", t.to(dt) if t.is_floating_point() else t
            if b_s is not None:
                yield f"{lin.path}.experts.{e}.bias_delta", (b_experts[e] - b_s).to(dt)

    return Job(lin.path, routed_specs(plan, ru, lin), run)


def plan_jobs(plan: Plan) -> list[Job]:
    """One job per output tensor of a static merge, or per routed linear; in the base's tensor order."""
    routed = plan.routed_linears()
    skip = {lin.bias_name for ru in plan.routed for lin in ru.unit.linears}
    jobs = []
    for name in plan.ctx.base.names:
        if name in routed:
            jobs.append(routed_linear_job(plan, *routed[name]))
        elif name not in skip:
            jobs.append(static_job(plan.ctx, name))
    return jobs
