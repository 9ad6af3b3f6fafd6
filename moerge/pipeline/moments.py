"""Input second moments of every candidate linear, per expert, on that expert's calibration prompts.

Expert e's own model (the base plus its task vector, built tensor by tensor from the sources) runs its
calibration prompts once; forward pre-hooks on the candidate linears accumulate ``C = Σ_t x_t x_tᵀ`` (I, I) over
the real (unpadded) tokens.  Linears fed the very same tensor (q/k/v, gate/up) share one *site*, so one moment
serves them.  The result is cached on disk per expert (``$MOERGE_CACHE/moments/<key>.safetensors``, float32),
keyed on the base's and that expert's files, the calibration source (and its file), the linears and
:data:`VERSION`, so re-planning at another budget, kind grid or shared merge reruns nothing.

Memory: the expert's model (float32) plus one (I, I) float64 accumulator per site.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..analysis import cache as analysis_cache
from ..analysis.activations import second_moment
from ..errors import RecipeError
from .context import BuildContext

VERSION = 1
BATCH = 8
MAX_LENGTH = 512


class Moments:
    """One expert's input second moments: ``site[linear path]`` names its site; :meth:`of` gives the (I, I)
    float64 moment, read lazily from the cache file (``path``) or kept in memory (float32) when not cached."""

    def __init__(self, site: dict[str, str], tokens: int, path: Path | None = None,
                 c: dict[str, torch.Tensor] | None = None) -> None:
        self.site, self.tokens, self.path, self._c = site, tokens, path, c

    def of(self, linear: str) -> torch.Tensor:
        key = self.site[linear]
        if self._c is not None:
            return self._c[key].double()
        assert self.path is not None
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key).double()


def moments_dir() -> Path | None:
    """``$MOERGE_CACHE/moments`` beside the analysis cache (inside ``$MOERGE_ANALYSIS_CACHE`` when that is set)."""
    root = analysis_cache.cache_dir()
    if root is None:
        return None
    return root / "moments" if os.environ.get("MOERGE_ANALYSIS_CACHE") else root.parent / "moments"


def moments_key(ctx: BuildContext, e: int, linears: list[str]) -> str:
    spec = ctx.recipe.experts[e].calibration
    assert spec is not None
    data = Path(spec.data)
    blob = json.dumps({"v": VERSION, "base": analysis_cache.folder_stamp(ctx.base.folder),
                       "expert": analysis_cache.folder_stamp(Path(ctx.sources[e].path)),
                       "calibration": spec.model_dump(mode="json"),
                       "data": data_stamp(data), "linears": linears}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def data_stamp(data: Path) -> str | None:
    """A calibration file by its content (calibration files are small; a copy or a remount keeps the moments),
    None for a datasets name."""
    if not data.is_file():
        return None
    return hashlib.sha256(data.read_bytes()).hexdigest()


def expert_model(ctx: BuildContext, e: int) -> torch.nn.Module:
    """Expert e as a float32 model of the base's architecture (the base + its task vector, tensor by tensor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in ctx.base.config.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(ctx.base.config["model_type"], **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name in ctx.base.names:
        base = ctx.base.get(name)
        state[name] = ctx.sources[e].weight(name, base).float() if base.is_floating_point() else base
    missing, _ = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("lm_head.")]:
        raise RecipeError(ctx.file, f"experts[{e}]", f"cannot run expert '{ctx.names[e]}': missing {missing[:3]}")
    model.tie_weights()
    return model.eval()


def _hooks(model: torch.nn.Module, linears: list[str], acc: dict[str, torch.Tensor], site: dict[str, str],
           mask_ref: dict[str, torch.Tensor]) -> list[Any]:
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (the input, kept alive; its site), per forward

    def hook(module: Any, args: tuple, path: str) -> None:
        x = args[0]  # (B, T, I)
        hit = seen.get(id(x))
        key = hit[1] if hit is not None and hit[0] is x else path
        seen[id(x)] = (x, key)
        site[path] = key
        if key != path:
            return
        c = second_moment(x[mask_ref["mask"].bool()])  # real tokens only: (n, I) -> (I, I)
        acc[key] = c if key not in acc else acc[key] + c

    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: hook(m, a, p)) for p in linears]
    handles.append(model.register_forward_pre_hook(lambda *_: seen.clear()))
    return handles


@torch.no_grad()
def collect(ctx: BuildContext, e: int, texts: list[str], tok: Any, linears: list[str]) -> Moments:
    """Run expert e on ``texts`` and accumulate the input second moment of every linear in ``linears``."""
    model = expert_model(ctx, e).to(ctx.device)
    acc: dict[str, torch.Tensor] = {}
    site: dict[str, str] = {}
    mask_ref: dict[str, torch.Tensor] = {}
    tokens = 0
    handles = _hooks(model, linears, acc, site, mask_ref)
    try:
        for i in range(0, len(texts), BATCH):
            enc = tok(texts[i:i + BATCH], return_tensors="pt", padding=True, truncation=True, max_length=MAX_LENGTH,
                      add_special_tokens=False).to(ctx.device)
            mask_ref["mask"] = enc["attention_mask"]
            tokens += int(enc["attention_mask"].sum())
            model.base_model(**enc, use_cache=False)  # the decoder only: no logits needed
    finally:
        for h in handles:
            h.remove()
    return Moments(site, tokens, c={k: v.float().cpu() for k, v in acc.items()})


def load(key: str) -> Moments | None:
    root = moments_dir()
    path = None if root is None else root / f"{key}.safetensors"
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return Moments(json.loads(meta["site"]), int(meta["tokens"]), path)
    except (OSError, ValueError, KeyError):
        return None


def save(key: str, m: Moments) -> None:
    """Best effort, atomic (a temporary file renamed into place)."""
    assert m._c is not None
    tensors = {k: v.contiguous() for k, v in m._c.items()}
    meta = {"site": json.dumps(m.site), "tokens": str(m.tokens)}
    analysis_cache.atomic_write(moments_dir(), f"{key}.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))


def expert_moments(ctx: BuildContext, e: int, tok: Any, linears: list[str], progress: bool = False) -> Moments:
    """Expert e's moments: from the cache, else collected (and cached)."""
    from ..routing.data import load_texts

    spec = ctx.recipe.experts[e].calibration
    if spec is None:
        raise RecipeError(ctx.file, f"experts[{e}].calibration", "activation-based allocation needs calibration "
                                                                 "prompts for every expert")
    key = moments_key(ctx, e, linears)
    cached = load(key)
    if cached is not None:
        return cached
    m = collect(ctx, e, load_texts(spec, tok, file=f"experts[{e}].calibration"), tok, linears)
    save(key, m)
    return load(key) or m  # lazily read back when cached: the moments of every expert need not fit in memory
