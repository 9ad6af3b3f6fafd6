"""Export jobs: the base's tensors in order, each layer's MLP replaced by the format's MoE block.

Every job declares its tensors up front, so the streaming writer lays the shards out before any work and peak
memory stays at one MLP linear of all experts.  The router (gate) rows are not jobs of this list: they are
measured on the written weights and written last, in their own shard (:func:`gate_specs`, ``moerge.export``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..io.writer import TensorSpec
from ..pipeline.execute import Job
from .formats import MLP_LINEARS, NativeFormat, mlp_linear


def export_jobs(src: Any, fmt: NativeFormat, n_experts: int) -> list[Job]:
    """All jobs of the export of ``src`` (a PlanInput or CheckpointInput) in ``fmt``."""
    cfg = src.base_cfg
    moe = set(fmt.moe_layers(int(cfg["num_hidden_layers"]), src.routed))
    jobs: list[Job] = []
    done: set[int] = set()
    for job in src.jobs():
        hit = mlp_linear(job.label)
        if hit is None:
            jobs.append(job)
            jobs += _zero_bias_jobs(src, fmt, job)
            continue
        layer = hit[0]
        if layer not in moe:
            jobs.append(job)  # a dense (mlp_only) layer keeps the static merge under the base's names
        elif layer not in done:
            done.add(layer)
            jobs += [moe_linear_job(src, fmt, layer, lin, n_experts) for lin in MLP_LINEARS]
    return jobs


def _zero_bias_jobs(src: Any, fmt: NativeFormat, job: Job) -> list[Job]:
    """Qwen2-MoE over a base without q/k/v biases: zero biases right after each q/k/v weight."""
    name = job.label
    if not (fmt.zero_qkv_bias and name.endswith((".q_proj.weight", ".k_proj.weight", ".v_proj.weight"))):
        return []
    bias = name[: -len("weight")] + "bias"
    if bias in src.base_names:
        return []
    spec = TensorSpec(bias, (job.specs[0].shape[0],), src.out_dtype)
    return [Job(bias, [spec], lambda: iter([(spec.name, torch.zeros(spec.shape, dtype=spec.dtype))]))]


def gate_specs(fmt: NativeFormat, layers: list[int], n_experts: int, hidden: int, dtype: torch.dtype) -> list[TensorSpec]:
    """Every MoE layer's router rows (E, C), and Qwen2-MoE's shared-expert gate (1, C), kept zero."""
    specs = []
    for layer in layers:
        specs.append(TensorSpec(fmt.router_name(layer), (n_experts, hidden), dtype))
        if fmt.shared_expert:  # zero weight: sigmoid(0) = 0.5 for every token (see moerge.export)
            specs.append(TensorSpec(fmt.shared_gate_name(layer), (1, hidden), dtype))
    return specs


def moe_linear_job(src: Any, fmt: NativeFormat, layer: int, lin: str, n_experts: int) -> Job:
    """One base MLP linear of one layer -> every expert's tensor (+ the shared expert's)."""
    out, in_ = _base_shape(src, layer, lin)
    dt = src.out_dtype
    shape = (out, in_)
    if fmt.residual_experts:  # (2O, I) for gate/up, (O, 2I) for down
        shape = (out, 2 * in_) if lin == "down_proj" else (2 * out, in_)
    specs = [TensorSpec(fmt.expert_name(layer, e, lin), shape, dt) for e in range(n_experts)]
    if fmt.shared_expert:
        specs.append(TensorSpec(fmt.shared_name(layer, lin), (out, in_), dt))
    routed = layer in src.routed

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        shared, experts = src.mlp(layer, lin, routed=routed, shared=fmt.shared_expert or not routed)
        shared = None if shared is None else shared.to(dt)
        for e in range(n_experts):
            w = experts[e] if experts is not None else shared  # unrouted Mixtral layer: the merge in every expert
            yield specs[e].name, expert_tensor(fmt, lin, w.to(dt), shared)
        if shared is not None and fmt.shared_expert:
            yield specs[-1].name, shared

    return Job(f"{fmt.prefix(layer)}.{lin}", specs, run)


def expert_tensor(fmt: NativeFormat, lin: str, w: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """The stored tensor of one expert: ``w`` itself, or for residual experts the pair (w, shared) that computes
    ``MLP_e(x) - 0.5 * MLP_shared(x)`` with twice the intermediate size (-0.5x is exact in every float dtype)."""
    if not fmt.residual_experts:
        return w
    assert shared is not None
    if lin == "down_proj":
        return torch.cat([w, -0.5 * shared], dim=1)  # (O, I) | (O, I) -> (O, 2I)
    return torch.cat([w, shared], dim=0)  # (I, C) ; (I, C) -> (2I, C)


def _base_shape(src: Any, layer: int, lin: str) -> tuple[int, int]:
    cfg = src.base_cfg
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    return (hidden, inter) if lin == "down_proj" else (inter, hidden)
