"""Export jobs: the base's tensors in order, each layer's MLP replaced by the format's MoE block.

Every job declares its tensors up front, so the streaming writer lays the shards out before any work and peak
memory stays at one MLP linear of all experts.  Router rows are written as zeros here and patched in place
once the calibration pass has computed them (:func:`patch_tensors`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..execute import Job
from ..io.index import CheckpointIndex
from ..io.writer import TensorSpec
from .formats import MLP_LINEARS, NativeFormat
from .sources import mlp_linear


def export_jobs(src: Any, fmt: NativeFormat, n_experts: int) -> list[Job]:
    """All jobs of the export of ``src`` (a PlanSource or CheckpointSource) in ``fmt``."""
    cfg = src.base_cfg
    n_layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    moe = set(fmt.moe_layers(n_layers, src.routed))
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
            jobs.append(_router_job(fmt, layer, n_experts, hidden, src.out_dtype))
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


def _router_job(fmt: NativeFormat, layer: int, n_experts: int, hidden: int, dtype: torch.dtype) -> Job:
    specs = [TensorSpec(fmt.router_name(layer), (n_experts, hidden), dtype)]
    if fmt.shared_expert:  # zero weight: sigmoid(0) = 0.5 for every token (see moerge.export)
        specs.append(TensorSpec(fmt.shared_gate_name(layer), (1, hidden), dtype))
    return Job(fmt.router_name(layer), specs, lambda: ((s.name, torch.zeros(s.shape, dtype=s.dtype)) for s in specs))


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

    return Job(f"model.layers.{layer}.mlp.{lin}", specs, run)


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


def patch_tensors(folder: Path, updates: dict[str, torch.Tensor]) -> None:
    """Overwrite the bytes of existing tensors in place (same dtype and shape); the files keep their layout."""
    index = CheckpointIndex.from_folder(folder)
    for name, value in updates.items():
        if name not in index:
            raise CheckpointError(folder, name, "internal: tensor to patch is not in the checkpoint")
        info = index[name]
        data = value.detach().contiguous().cpu()
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[info.dtype]
        if tuple(data.shape) != info.shape:
            raise CheckpointError(info.file, name, f"internal: patch shape {tuple(data.shape)} != {info.shape}")
        raw = data.to(dtype).reshape(-1).view(torch.uint8).numpy().tobytes()
        with open(info.file, "r+b") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            start = json.loads(f.read(n))[name]["data_offsets"][0]
            f.seek(8 + n + start)
            f.write(raw)


def prefetched(jobs: list[Job], depth: int = 2) -> list[Job]:
    """The same jobs, computed by one background thread up to ``depth`` jobs ahead of the writer: torch ops and
    file writes release the GIL, so merging the next tensors overlaps writing the last ones.  Memory: at most
    ``depth + 1`` jobs' outputs."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moerge-export")
    futures: dict[int, Future] = {}

    def submit(i: int) -> None:
        if i < len(jobs) and i not in futures:
            futures[i] = pool.submit(lambda: list(jobs[i].run()))

    def run(i: int) -> Iterator[tuple[str, torch.Tensor]]:
        for k in range(i, i + depth + 1):
            submit(k)
        try:
            yield from futures.pop(i).result()
        except BaseException:
            for f in futures.values():
                f.cancel()
            pool.shutdown(wait=False)
            raise
        if i == len(jobs) - 1:
            pool.shutdown(wait=False)

    return [Job(job.label, job.specs, lambda i=i: run(i)) for i, job in enumerate(jobs)]
