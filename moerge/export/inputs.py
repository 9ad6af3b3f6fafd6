"""What an export reads: a routed build plan (``moerge build`` with a native format) or a built moerge checkpoint
(``moerge export``).

Both give the same three things: one job per base tensor in the base's order (non-MLP tensors are written as
they come: the static merge for a plan, the stored tensor for a checkpoint), each MLP linear's shared weight
and per-expert weights (float), and what the router needs (calibration prompts, stored prototypes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import device as devices
from .. import dtypes
from ..arch import family_for
from ..checkpoint import Checkpoint, names
from ..errors import CheckpointError, NotSupportedError
from ..io.sources import FullSource
from ..io.writer import TensorSpec
from ..pipeline.execute import Job
from ..pipeline.jobs import static_job
from ..pipeline.plan import Plan
from ..recipe import CalibrationData, Recipe
from .formats import MLP_UNIT, routed_layers


@dataclass
class RouterInit:
    """What the router rows can be initialised from."""

    calibration: list[CalibrationData] | None  # one per expert, or None when any expert has none
    uniform: bool = False  # the recipe asked for uniform routing: leave the rows zero
    prototypes: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> stored token router


class PlanInput:
    """Tensors of a routed build plan, computed on demand from the experts."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.ctx = plan, plan.ctx
        self.file = self.ctx.file
        self.base_cfg: dict[str, Any] = dict(self.ctx.base.config)
        self.names: list[str] = list(self.ctx.names)
        self.out_dtype: torch.dtype = self.ctx.out_dtype
        self.side_folder: Path = self.ctx.base.folder
        self.base_names: set[str] = set(self.ctx.base.names)
        self.routed: set[int] = routed_layers([ru.unit.path for ru in plan.routed], self.file, "routing.modules")

    def jobs(self) -> list[Job]:
        """The static merge of every base tensor, in the base's order."""
        return [static_job(self.ctx, name) for name in self.ctx.base.names]

    def mlp(self, layer: int, lin: str, *, routed: bool, shared: bool) -> tuple[torch.Tensor | None, list | None]:
        """(shared (O, I) | None, [expert e (O, I)] | None), float (full experts in their stored dtype, the rest
        float32).  The shared weight of an unrouted layer is the static merge; of a routed layer, the plan's shared
        weight (the merge, or the base)."""
        ctx = self.ctx
        name = ctx.family.mlp_weight(layer, lin)
        merge = shared and not (routed and self.plan.shared_is_base)
        values = shared or any(not isinstance(s, FullSource) for s in ctx.sources)  # else only its shape is read
        base = ctx.load(name) if values else torch.empty(ctx.base.index[name].shape, device=ctx.device)
        taus = ctx.deltas(name, base) if merge else None
        experts = [self._expert(s, None if taus is None else taus[e], name, base)
                   for e, s in enumerate(ctx.sources)] if routed else None
        if not shared:
            return None, experts
        return (ctx.merged(name, base, taus) if merge else base).float(), experts

    @staticmethod
    def _expert(src: Any, tau: torch.Tensor | None, name: str, base: torch.Tensor) -> torch.Tensor:
        if isinstance(src, FullSource):
            return src.weight(name, base)  # exact, not base + (W - base); on base's device
        if tau is None:
            tau = src.delta(name, base)
        return base.float() if tau is None else base.float() + tau

    def router_init(self) -> RouterInit:
        recipe: Recipe = self.ctx.recipe
        router = recipe.routing.router  # type: ignore[union-attr]
        cal = [e.calibration for e in recipe.experts]
        return RouterInit(None if any(c is None for c in cal) else cal,  # type: ignore[arg-type]
                          uniform=router.init == "uniform")


class CheckpointInput:
    """Tensors of a built moerge checkpoint whose routed units are all dense MLP experts."""

    kinds: tuple[str, ...] = ("dense",)  # expert kinds read as stored (``.materialize``: every kind)

    def __init__(self, folder: str | Path, device: str | torch.device | None = "cpu") -> None:
        self.device = devices.resolve(device)  # where materialized experts are computed
        self.ckpt = Checkpoint.open(folder)
        self.folder = self.ckpt.folder
        self.file = str(self.folder / names.CONFIG)
        if self.ckpt.manifest is None:
            raise CheckpointError(self.file, "model_type", f"not a moerge checkpoint (model_type "
                                                           f"'{self.ckpt.config.get('model_type')}')")
        self.manifest = self.ckpt.manifest
        self.base_cfg = self.ckpt.base_config
        self.family = family_for(self.base_cfg, self.file)
        self.names = list(self.manifest.experts)
        self._check_units()
        self.routed = routed_layers(list(self.manifest.units), self.file, "moerge.units")
        self.index = self.ckpt.index()
        self.loader = self.ckpt.loader()
        self.base_names = {n for n in self.index.names() if not names.is_moerge_only(n)}
        self.out_dtype = dtypes.float_dtype_of({}, self.index)
        self.side_folder = self.folder

    def _check_units(self) -> None:
        for unit, spec in self.manifest.units.items():
            if not MLP_UNIT.fullmatch(unit):
                raise NotSupportedError(self.file, f"moerge.units.{unit}", "routed attention (or any non-MLP unit) "
                                        "has no place in a native MoE format, which keeps one attention per layer")
            if spec.kind not in self.kinds:
                raise NotSupportedError(self.file, f"moerge.units.{unit}", f"kind '{spec.kind}' experts cannot "
                                        "be exported as stored; native formats store full (dense) experts "
                                        "(--materialize writes W_s + delta_e)")
            for lin, lspec in spec.linears.items():
                if lspec.bias:
                    raise NotSupportedError(self.file, f"moerge.units.{unit}.linears.{lin}", "MLP biases have no place "
                                                                                            "in a native MoE format")

    def jobs(self) -> list[Job]:
        """Every stored base-named tensor, copied as it is."""
        jobs = []
        for name in self.index.names():
            if names.is_moerge_only(name):
                continue
            info = self.index[name]
            jobs.append(Job(name, [TensorSpec(name, tuple(info.shape), dtypes.from_st(info.dtype))],
                            lambda name=name: iter([(name, self.loader.get(name))])))
        return jobs

    def mlp(self, layer: int, lin: str, *, routed: bool, shared: bool) -> tuple[torch.Tensor | None, list | None]:
        weight = self.family.mlp_weight(layer, lin)
        path = weight.removesuffix(".weight")
        experts = [self.loader.get(names.expert_tensor(path, e, "weight")) for e in range(len(self.names))] if routed \
            else None
        return (self.loader.get(weight).float() if shared else None), experts

    def router_init(self) -> RouterInit:
        recipe = self.ckpt.recipe()
        cal = [e.calibration for e in recipe.experts] if recipe else []
        init = RouterInit(cal if cal and all(c is not None for c in cal) else None)
        if self.manifest.level == "token" and self.manifest.initialized:
            for unit in self.manifest.units:
                layer = int(MLP_UNIT.fullmatch(unit).group(1))  # type: ignore[union-attr]
                init.prototypes[layer] = {k: self.loader.get(f"{unit}.moerge_router.{k}").float()
                                          for k in ("prototypes", "center", "scale", "bias")
                                          if f"{unit}.moerge_router.{k}" in self.index}
                init.prototypes[layer]["norm"] = self.loader.get(self.family.post_attention_norm(layer)).float()
        return init

    def stored_top_k(self) -> int | None:
        return self.manifest.top_k
