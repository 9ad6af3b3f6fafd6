"""Everything a build reads, opened once and validated before any heavy work starts.

:class:`BuildContext` opens the base and every expert source lazily (headers only), checks that they agree
(architecture, shapes, tensors present), resolves the static merge's parameters, the output dtype, the
architecture family and the compute device.  It also gives the per-tensor inputs every later stage needs:
the base tensor, the experts' task vectors, the static merge, each expert's own weight.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import device as devices
from ..arch import Family, family_for
from ..errors import RecipeError, SourceError
from ..io.sources import FullSource, LoraSource, ModelFolder, open_source
from ..merge.methods import METHODS, MergeMethod, MergeParams, merge_tensor
from ..merge.streaming import Rows, row_blocks
from ..recipe import Recipe
from .units import fold_ratio

Source = FullSource | LoraSource
# float32 bytes of one row block: a tensor larger than this is read and merged block by block.  Small blocks keep
# glibc's arenas small: with 5 MiB blocks a 4-expert TIES build's peak anonymous RSS was 727 MiB at 347M and 985 MiB
# at 3.4B (freed blocks scattered between live ones: mallinfo2 showed 1.5x more free than used arena bytes); with
# 1 MiB blocks 376 and 407 MiB, and no slower (3.4B TIES 3.0 vs 3.1 min, 1.1B twin 108 vs 109 s; bench/RESULTS.md,
# "scale").  A job holds about 2N + 4 blocks (:meth:`BuildContext.block_work`).
BLOCK_BYTES = 1 << 20
# A routed linear whose N + 2 float32 copies (base, shared, N experts) fit in this is built from whole tensors: the
# row-block path's scratch files cost more than they save there (measured: a twin build of every unit of a 135M x 4
# full-rank pool, 576 x 1536 linears, 1.58x the dense build through row blocks).
ROUTED_WHOLE_BYTES = 64 << 20


def forced_block_bytes() -> int:
    """``MOERGE_BLOCK_BYTES`` (tests force tiny row blocks with it), 0 when unset."""
    return int(os.environ.get("MOERGE_BLOCK_BYTES") or 0)


def resolve_merge(recipe: Recipe, file: str | None = None) -> tuple[MergeMethod, MergeParams]:
    """Method + parameters, rejecting keys the method does not take (errors name ``file``, default the recipe's)."""
    file = file or recipe.file
    spec = recipe.merge
    method = METHODS.get(spec.method, file=file, field="merge.method")
    for key in ("density", "epsilon", "gamma"):
        if getattr(spec, key) is not None and key not in method.params:
            raise RecipeError(file, f"merge.{key}", f"'{key}' is not a parameter of {method.name} "
                                                    f"(it takes: {', '.join(('weights', 'lambda', *method.params))})")
    params = MergeParams(
        weights=tuple(spec.weights.get(n, 1.0) for n in recipe.expert_names),
        density=spec.density if spec.density is not None else 1.0,
        lambda_=spec.lambda_,
        epsilon=spec.epsilon if spec.epsilon is not None else 0.15,
        gamma=spec.gamma if spec.gamma is not None else 0.01,
        normalize=method.normalize if spec.normalize is None else spec.normalize,
        rescale=method.rescale if spec.rescale is None else spec.rescale,
        seed=recipe.seed,
    )
    if method.sparsify == "magprune" and params.density < 1 and not (
            0 < params.density - params.epsilon and params.density + params.epsilon < 1):
        raise RecipeError(file, "merge.epsilon" if spec.epsilon is not None else "merge.density",
                          f"density +- epsilon must stay inside (0, 1) (density {params.density}, epsilon {params.epsilon})")
    return method, params


@dataclass
class BuildContext:
    recipe: Recipe
    base: ModelFolder
    sources: list[Source]
    method: MergeMethod
    params: MergeParams
    out_dtype: torch.dtype
    family: Family
    file: str = "recipe"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scratch: Path | None = None  # where big routed linears keep their shared weight (the build's temp folder)
    # routed linear weight -> the norm weight feeding it: each expert's weight there absorbs its own norm's scale
    # relative to the written (merged) norm, W_e diag(g_e / g_s), so the expert is exact behind the merged norm
    folds: dict[str, str] = field(default_factory=dict)
    ratio_cache: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, recipe: Recipe, file: str | None = None, device: str | torch.device | None = "cpu") -> BuildContext:
        file = file or recipe.file
        method, params = resolve_merge(recipe, file)
        base = ModelFolder(recipe.base, allow_pickle=recipe.allow_pickle, what="base")
        family = family_for(base.config, str(base.folder / "config.json"))
        sources = [open_source(e.name, e.source, base, allow_pickle=recipe.allow_pickle) for e in recipe.experts]
        ctx = cls(recipe, base, sources, method, params,
                  getattr(torch, recipe.dtype) if recipe.dtype else base.dtype, family, file, devices.resolve(device))
        ctx.check_tensors()
        return ctx

    def check_tensors(self) -> None:
        """Every full expert has every base tensor with the same shape (headers only)."""
        for src in self.sources:
            if not isinstance(src, FullSource):
                continue
            for name in self.base.names:
                if name not in src.model.index:
                    raise SourceError(src.path, name, f"tensor missing in expert '{src.name}'")
                got, want = src.model.index[name].shape, self.base.index[name].shape
                if tuple(got) != tuple(want):
                    raise SourceError(src.model.index[name].file, name,
                                      f"shape {list(got)} does not match the base's {list(want)}")

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.recipe.experts]

    @property
    def n_layers(self) -> int:
        return int(self.base.config.get("num_hidden_layers", 0))

    def tokenizer(self) -> Any:
        """The base's tokenizer (pad = eos when it has none)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.base.folder, trust_remote_code=False)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def stored_name(self, name: str) -> str:
        """The tensor that holds ``name`` in the base and the experts (:meth:`Family.holder`: a tied head's is the
        input embedding)."""
        return self.family.holder(name, self.base.index)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.index[self.stored_name(name)].shape)

    def load(self, name: str, rows: Rows | None = None) -> torch.Tensor:
        """The base tensor ``name`` (or its rows ``[a, b)``) on the compute device, in its stored dtype."""
        return self.base.get(self.stored_name(name), rows).to(self.device)

    def deltas(self, name: str, base: torch.Tensor, rows: Rows | None = None) -> list[torch.Tensor | None]:
        """Every expert's fp32 task vector for one tensor (or the rows ``base`` holds), on ``base``'s device
        (None = zero)."""
        name = self.stored_name(name)
        return [src.delta(name, base, rows) for src in self.sources]

    def expert_weight(self, e: int, name: str, base: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        """Expert e's own fp32 tensor (or rows) of ``name``, with its input norm's scale folded in (:meth:`folded`)."""
        return self.folded(name, e, self.sources[e].weight(self.stored_name(name), base, rows).float())

    def read(self, name: str) -> Callable[[Rows], tuple[torch.Tensor, list[torch.Tensor | None]]]:
        """``rows -> (base block, task-vector blocks)`` of tensor ``name``."""
        def read(rows: Rows) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
            base = self.load(name, rows)
            return base, self.deltas(name, base, rows)

        return read

    def blocks(self, name: str) -> list[Rows]:
        """Row ranges of tensor ``name``, :data:`BLOCK_BYTES` of float32 each (one row at least); a job holds about
        2N + 4 such blocks (base, N task vectors, N weighted ones, masks, the result).  ``MOERGE_BLOCK_BYTES`` sets
        the block size (tests use tiny blocks)."""
        return row_blocks(self.shape(name), forced_block_bytes() or BLOCK_BYTES)

    def fits_whole(self, name: str) -> bool:
        """Whether routed weight ``name`` is small enough to build from whole tensors (:data:`ROUTED_WHOLE_BYTES`);
        never while ``MOERGE_BLOCK_BYTES`` forces row blocks (tests)."""
        if forced_block_bytes():
            return False
        shape = self.shape(name)
        return (len(self.sources) + 2) * 4 * math.prod(shape) <= ROUTED_WHOLE_BYTES

    def block_work(self, name: str, extra: int, whole: bool = False) -> int:
        """Working memory of a job that streams ``name`` in row blocks: ``2N + extra`` float32 blocks (``whole``:
        ``2N + extra`` float32 copies of the whole tensor, a job that holds base, task vectors and expert weights)."""
        shape = self.shape(name)
        rows = shape[0] if whole else max(b - a for a, b in self.blocks(name))
        return (2 * len(self.sources) + extra) * rows * 4 * math.prod(shape[1:])

    def merged(self, name: str, base: torch.Tensor, taus: list[torch.Tensor | None]) -> torch.Tensor:
        return merge_tensor(self.method, base, taus, self.params, self.stored_name(name))

    def expert_weights(self, name: str, base: torch.Tensor, taus: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Every expert's own fp32 tensor (a full checkpoint's stored weight, else base + task vector); for a
        linear in ``folds``, with its input norm's scale folded in (columns times :meth:`fold_ratios`)."""
        base32 = base.float()
        stored = self.stored_name(name)
        out = [src.weight(stored, base).float() if isinstance(src, FullSource) else
               (base32 + t if t is not None else base32) for src, t in zip(self.sources, taus)]
        return [self.folded(name, e, w) for e, w in enumerate(out)]

    def folded(self, name: str, e: int, w: torch.Tensor) -> torch.Tensor:
        """Expert e's weight (or row block) of linear ``name`` (O, I) with its input norm's scale folded in."""
        norm = self.folds.get(name)
        if norm is None:
            return w
        return w * self.fold_ratios(norm)[e].to(w.device)[None, :]  # (O, I) * (1, I)

    def fold_ratios(self, norm: str) -> list[torch.Tensor]:
        """Per expert (I,): its norm scale over the written merged one, (off + g_e) / (off + g_s), 1 where the
        merged scale is ~0 (nothing to fold into)."""
        if norm not in self.ratio_cache:
            base = self.load(norm).float()
            taus = self.deltas(norm, base)
            g_s = self.merged(norm, base, taus).to(self.out_dtype)  # as the static job writes it
            experts = [src.weight(norm, base).float() if isinstance(src, FullSource) else
                       base + (t if t is not None else 0.0) for src, t in zip(self.sources, taus)]
            self.ratio_cache[norm] = [fold_ratio(g_e, g_s, self.family.norm_offset).cpu() for g_e in experts]
        return self.ratio_cache[norm]

    def norm_folds(self, linears: list[tuple[int, str, str, str]]) -> dict[str, str]:
        """``(layer, group, linear name, weight name)`` of routed linears -> {weight: the norm feeding it}."""
        out = {}
        for layer, group, lin, weight in linears:
            norm = self.family.input_norm(layer, group, lin)
            if norm is not None and norm in self.base.index:
                out[weight] = norm
        return out
