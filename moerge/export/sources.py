"""Where an export reads its tensors: a routed build plan (``moerge build`` with a native format) or a built
moerge checkpoint (``moerge export``).

Both give the same three things: one job per base tensor in the base's order (non-MLP tensors are written as
they come: the static merge for a plan, the stored tensor for a checkpoint), each MLP linear's shared weight
and per-expert weights (float), and what the router needs (calibration prompts, stored prototypes).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from ..build import static_jobs
from ..errors import CheckpointError, NotSupportedError, RecipeError
from ..execute import Job
from ..io.index import CheckpointIndex
from ..io.loader import TensorLoader
from ..io.sources import FullSource, read_json
from ..io.writer import TensorSpec
from ..recipe import DataSource, Recipe

_MLP_UNIT = re.compile(r"model\.layers\.(\d+)\.mlp")


@dataclass
class RouterInit:
    """What the router rows can be initialised from."""

    calibration: list[DataSource] | None  # one per expert, or None when any expert has none
    uniform: bool = False  # the recipe asked for uniform routing: leave the rows zero
    prototypes: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> stored token router


class PlanSource:
    """Tensors of a routed build plan (``moerge.plan.RoutedPlan``), computed on demand from the sources."""

    def __init__(self, plan: Any) -> None:
        self.plan, self.ctx = plan, plan.ctx
        self.file = self.ctx.file
        self.base_cfg: dict[str, Any] = dict(self.ctx.base.config)
        self.names: list[str] = list(self.ctx.names)
        self.out_dtype: torch.dtype = self.ctx.out_dtype
        self.side_folder: Path = self.ctx.base.folder
        self.base_names: set[str] = set(self.ctx.base.names)
        self.routed: set[int] = _routed_layers([u.path for u in plan.routed], self.file, "routing.modules")

    def jobs(self) -> list[Job]:
        """The static merge of every base tensor (``moerge.build.static_jobs``), float ones with the base read as
        float32 once per tensor rather than once per expert (same values)."""
        jobs = static_jobs(self.ctx)
        for job in jobs:
            if job.specs[0].dtype.is_floating_point:
                job.run = partial(self._merged, job.specs[0])
        return jobs

    def _merged(self, spec: TensorSpec) -> Iterator[tuple[str, torch.Tensor]]:
        base = self.ctx.base.get(spec.name).float()
        yield spec.name, self.ctx.merged(spec.name, base, self.ctx.deltas(spec.name, base)).to(spec.dtype)

    def mlp(self, layer: int, lin: str, *, routed: bool, shared: bool) -> tuple[torch.Tensor | None, list | None]:
        """(shared (O, I) | None, [expert e (O, I)] | None), float (full experts in their stored dtype, the rest
        float32).  The shared weight of an unrouted layer is the static merge; of a routed layer, the plan's shared
        weight (the merge, or the base)."""
        ctx = self.ctx
        name = f"model.layers.{layer}.mlp.{lin}.weight"
        merge = shared and not (routed and self.plan.shared_is_base)
        values = shared or any(not isinstance(s, FullSource) for s in ctx.sources)  # else only its shape is read
        base = ctx.base.get(name) if values else torch.empty(ctx.base.index[name].shape, device="meta")
        taus = ctx.deltas(name, base) if merge else None
        experts = [self._expert(s, None if taus is None else taus[e], name, base)
                   for e, s in enumerate(ctx.sources)] if routed else None
        if not shared:
            return None, experts
        return (ctx.merged(name, base, taus) if merge else base).float(), experts

    @staticmethod
    def _expert(src: Any, tau: torch.Tensor | None, name: str, base: torch.Tensor) -> torch.Tensor:
        if isinstance(src, FullSource):
            return src.weight(name, base)  # exact, not base + (W - base)
        if tau is None:
            tau = src.delta(name, base)
        return base.float() if tau is None else base.float() + tau

    def router_init(self) -> RouterInit:
        recipe: Recipe = self.ctx.recipe
        router = recipe.routing.router  # type: ignore[union-attr]
        cal = [e.calibration for e in recipe.experts]
        return RouterInit(None if any(c is None for c in cal) else cal,  # type: ignore[arg-type]
                          uniform=router.init == "uniform")


class CheckpointSource:
    """Tensors of a built moerge checkpoint whose routed units are all dense MLP experts."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        self.file = str(cfg_path)
        self.config = read_json(cfg_path)
        if self.config.get("model_type") != "moerge" or "moerge" not in self.config:
            raise CheckpointError(cfg_path, "model_type", f"not a moerge checkpoint (model_type "
                                                          f"'{self.config.get('model_type')}')")
        if not isinstance(self.config["moerge"], dict) or not isinstance(self.config.get("base_config"), dict):
            raise CheckpointError(cfg_path, "moerge", "malformed moerge checkpoint (moerge / base_config not objects)")
        self.block: dict[str, Any] = self.config["moerge"]
        self.base_cfg = dict(self.config["base_config"])
        self.names = list(self.block["experts"])
        self.units: dict[str, Any] = self.block.get("units", {})
        self._check_units()
        self.routed = _routed_layers(list(self.units), self.file, "moerge.units")
        self.index = CheckpointIndex.from_folder(self.folder)
        self.loader = TensorLoader(self.index)
        self.base_names = {n for n in self.index.names() if not _is_moerge_only(n)}
        self.out_dtype = self._dtype()
        self.side_folder = self.folder

    def _check_units(self) -> None:
        for unit, spec in self.units.items():
            if not _MLP_UNIT.fullmatch(unit):
                raise NotSupportedError(self.file, f"moerge.units.{unit}", "routed attention (or any non-MLP unit) "
                                        "has no place in a native MoE format, which keeps one attention per layer")
            if spec.get("kind") != "dense":
                raise NotSupportedError(self.file, f"moerge.units.{unit}", f"kind '{spec.get('kind')}' experts cannot "
                                        "be exported; native formats store full (dense) experts")
            for lin, lspec in spec.get("linears", {}).items():
                if lspec.get("bias"):
                    raise NotSupportedError(self.file, f"moerge.units.{unit}.linears.{lin}", "MLP biases have no place "
                                                                                            "in a native MoE format")

    def _dtype(self) -> torch.dtype:
        for info in self.index.tensors.values():
            if info.dtype in ("F32", "F16", "BF16"):
                return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[info.dtype]
        return torch.float32

    def jobs(self) -> list[Job]:
        jobs = []
        for name in self.index.names():
            if _is_moerge_only(name):
                continue
            info = self.index[name]
            dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                                    "I32": "int32", "U8": "uint8", "BOOL": "bool"}.get(info.dtype, "float32"))
            jobs.append(Job(name, [TensorSpec(name, tuple(info.shape), dtype)],
                            lambda name=name: iter([(name, self.loader.get(name))])))
        return jobs

    def mlp(self, layer: int, lin: str, *, routed: bool, shared: bool) -> tuple[torch.Tensor | None, list | None]:
        path = f"model.layers.{layer}.mlp.{lin}"
        experts = [self.loader.get(f"{path}.experts.{e}.weight") for e in range(len(self.names))] if routed else None
        return (self.loader.get(f"{path}.weight").float() if shared else None), experts

    def recipe(self) -> Recipe | None:
        path = self.folder / "moerge_recipe.yaml"
        if not path.is_file():
            return None
        try:
            return Recipe.model_validate(yaml.safe_load(path.read_text()))
        except Exception as exc:  # noqa: BLE001 - a stale recipe only costs the calibration data
            raise RecipeError(path, None, f"cannot read the checkpoint's recipe ({exc})") from None

    def router_init(self) -> RouterInit:
        recipe = self.recipe()
        cal = [e.calibration for e in recipe.experts] if recipe else []
        init = RouterInit(cal if cal and all(c is not None for c in cal) else None)
        if self.block.get("level") == "token" and self.block.get("initialized"):
            for unit in self.units:
                layer = int(_MLP_UNIT.fullmatch(unit).group(1))  # type: ignore[union-attr]
                init.prototypes[layer] = {k: self.loader.get(f"{unit}.moerge_router.{k}").float()
                                          for k in ("prototypes", "center", "scale", "bias")
                                          if f"{unit}.moerge_router.{k}" in self.index}
                init.prototypes[layer]["norm"] = self.loader.get(
                    f"model.layers.{layer}.post_attention_layernorm.weight").float()
        return init

    def stored_top_k(self) -> int | None:
        return self.block.get("top_k")


def _is_moerge_only(name: str) -> bool:
    return ".experts." in name or ".moerge_router." in name or name.startswith("moerge_router.")


def _routed_layers(paths: list[str], file: str, field: str) -> set[int]:
    layers = set()
    for p in paths:
        m = _MLP_UNIT.fullmatch(p)
        if not m:
            raise RecipeError(file, field, f"routed unit {p} cannot be exported: a native MoE format keeps one "
                                           "attention per layer (the static merge); route only MLPs (modules: mlp)")
        layers.add(int(m.group(1)))
    return layers


def mlp_linear(name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> (3, "up_proj")."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", name)
    return (int(m.group(1)), m.group(2)) if m else None
