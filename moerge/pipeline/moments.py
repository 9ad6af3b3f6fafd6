"""Input second moments of every candidate linear, per expert, on that expert's calibration prompts.

Expert e's own model (the base plus its task vector, built tensor by tensor from the sources) runs its
calibration prompts once; forward pre-hooks on the candidate linears accumulate ``C = Σ_t x_t x_tᵀ`` (I, I) over
the real (unpadded) tokens.  Linears fed the very same tensor (q/k/v, gate/up) share one *site*, so one moment
serves them.  The result is cached on disk per expert (``$MOERGE_CACHE/moments/<key>.safetensors``, float32),
keyed on the base's and that expert's files, the calibration source (and its file), the linears and
:data:`VERSION`, so re-planning at another budget, kind grid or shared merge reruns nothing.

With ``fisher=True`` (``allocate: {sensitivity: fisher}``) the same pass also runs backward from the expert's
own answer: at each prompt's last real token, ``-log p(argmax)`` (the expert's first answer token), and forward
hooks on the linears' outputs accumulate the diagonal of the output-gradient second moment
``g = Σ_t (∂ℓ/∂y_t)²`` (O,) per linear: the output side of a K-FAC (Kronecker) view of the loss's curvature,
``F ≈ C ⊗ G``, kept diagonal.  No parameter gradient is formed (the weights do not require grad).

The output head (``routing.head``) is fed the decoder's last hidden state: its moment is taken from it at every
real token (a hook on the head would see the last token only, where the loss reads it); its gradient moment is
that of the last token's logits.

Memory: the expert's model (float32) plus one (I, I) float64 accumulator per site (and, with ``fisher``, the
activations of one batch for backward and one (O,) vector per linear).
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


GRAD = "grad:"  # key prefix of a linear's output-gradient moment in the cache file


class Moments:
    """One expert's input second moments: ``site[linear path]`` names its site; :meth:`of` gives the (I, I)
    float64 moment, read lazily from the cache file (``path``) or kept in memory (float32) when not cached.
    With ``fisher``, :meth:`grad` gives a linear's output-gradient moment (O,)."""

    def __init__(self, site: dict[str, str], tokens: int, path: Path | None = None,
                 c: dict[str, torch.Tensor] | None = None) -> None:
        self.site, self.tokens, self.path, self._c = site, tokens, path, c

    def _get(self, key: str) -> torch.Tensor:
        if self._c is not None:
            return self._c[key].double()
        assert self.path is not None
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key).double()

    def of(self, linear: str) -> torch.Tensor:
        return self._get(self.site[linear])

    def grad(self, linear: str) -> torch.Tensor:
        """Σ over tokens of (∂ℓ/∂y)² for the linear's output y (O,), float64 (``fisher`` moments only)."""
        return self._get(GRAD + linear)


def moments_dir() -> Path | None:
    """``$MOERGE_CACHE/moments`` beside the analysis cache (inside ``$MOERGE_ANALYSIS_CACHE`` when that is set)."""
    root = analysis_cache.cache_dir()
    if root is None:
        return None
    return root / "moments" if os.environ.get("MOERGE_ANALYSIS_CACHE") else root.parent / "moments"


def moments_key(ctx: BuildContext, e: int, linears: list[str], fisher: bool = False) -> str:
    spec = ctx.recipe.experts[e].calibration
    assert spec is not None
    data = Path(spec.data)
    fields = {"v": VERSION, "base": analysis_cache.folder_stamp(ctx.base.folder),
              "expert": analysis_cache.folder_stamp(Path(ctx.sources[e].path)),
              "calibration": spec.model_dump(mode="json"), "data": data_stamp(data), "linears": linears}
    if fisher:  # (absent otherwise: the moments cached before the option keep their key)
        fields["fisher"] = True
    blob = json.dumps(fields, sort_keys=True, default=str)
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
        c = second_moment(x.detach()[mask_ref["mask"].bool()])  # real tokens only: (n, I) -> (I, I)
        acc[key] = c if key not in acc else acc[key] + c

    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: hook(m, a, p)) for p in linears]
    handles.append(model.register_forward_pre_hook(lambda *_: seen.clear()))
    return handles


def _grad_hooks(model: torch.nn.Module, linears: list[str], acc: dict[str, torch.Tensor],
                mask_ref: dict[str, torch.Tensor]) -> list[Any]:
    """Output hooks adding Σ_t (∂ℓ/∂y_t)² (O,) over the real tokens of each linear in backward; the input
    embeddings' output is made to require grad (the weights do not)."""
    def on_grad(g: torch.Tensor, path: str) -> None:
        rows = g.detach() if g.dim() == 2 else g.detach()[mask_ref["mask"].bool()]  # the head's (B, O): last tokens
        sq = rows.double().pow(2).sum(0)  # (n, O) -> (O,)
        acc[path] = sq if path not in acc else acc[path] + sq

    def hook(module: Any, args: tuple, out: torch.Tensor, path: str) -> None:
        if out.requires_grad:
            out.register_hook(lambda g: on_grad(g, path))

    handles = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: hook(m, a, o, p)) for p in linears]
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.detach().requires_grad_(True)))
    return handles


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask -> (B,) index of each row's last real token (left or right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * (positions + 1)).argmax(-1)


def answer_loss(model: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over prompts of -log p(the expert's own top token) at the last real token: what its first answer token
    depends on (the logits of that token only).  ``hidden`` (B, T, H): the decoder's output; ``mask`` (B, T)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = model.get_output_embeddings()(hidden[rows, last_token(mask)]).float()  # (B, V)
    return torch.nn.functional.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")


def collect(ctx: BuildContext, e: int, texts: list[str], tok: Any, linears: list[str],
            fisher: bool = False) -> Moments:
    """Run expert e on ``texts`` and accumulate the input second moment of every linear in ``linears`` (and,
    with ``fisher``, each one's output-gradient moment)."""
    model = expert_model(ctx, e).to(ctx.device).requires_grad_(False)
    acc: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    site: dict[str, str] = {}
    mask_ref: dict[str, torch.Tensor] = {}
    tokens = 0
    head = next((p for p in linears if model.get_submodule(p) is model.get_output_embeddings()), None)
    handles = _hooks(model, [p for p in linears if p != head], acc, site, mask_ref)
    if fisher:
        handles += _grad_hooks(model, linears, grads, mask_ref)
    try:
        for i in range(0, len(texts), BATCH):
            enc = tok(texts[i:i + BATCH], return_tensors="pt", padding=True, truncation=True, max_length=MAX_LENGTH,
                      add_special_tokens=False).to(ctx.device)
            mask_ref["mask"] = enc["attention_mask"]
            tokens += int(enc["attention_mask"].sum())
            with torch.enable_grad() if fisher else torch.no_grad():
                hidden = model.base_model(**enc, use_cache=False).last_hidden_state  # (B, T, H): no logits
                if head is not None:  # the head's input at every real token (the loss below sees the last only)
                    c = second_moment(hidden.detach()[enc["attention_mask"].bool()])
                    acc[head] = c if head not in acc else acc[head] + c
                    site[head] = head
                if fisher:
                    answer_loss(model, hidden, enc["attention_mask"]).backward()
    finally:
        for h in handles:
            h.remove()
    out = {k: v.float().cpu() for k, v in acc.items()}
    out.update({GRAD + k: v.float().cpu() for k, v in grads.items()})
    return Moments(site, tokens, c=out)


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


def expert_moments(ctx: BuildContext, e: int, tok: Any, linears: list[str], progress: bool = False,
                   fisher: bool = False) -> Moments:
    """Expert e's moments: from the cache, else collected (and cached)."""
    from ..routing.data import load_texts

    spec = ctx.recipe.experts[e].calibration
    if spec is None:
        raise RecipeError(ctx.file, f"experts[{e}].calibration", "activation-based allocation needs calibration "
                                                                 "prompts for every expert")
    key = moments_key(ctx, e, linears, fisher)
    cached = load(key)
    if cached is not None:
        return cached
    m = collect(ctx, e, load_texts(spec, tok, file=f"experts[{e}].calibration"), tok, linears, fisher)
    save(key, m)
    return load(key) or m  # lazily read back when cached: the moments of every expert need not fit in memory
