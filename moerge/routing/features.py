"""Pooled features at router inputs: the attention-mask-aware mean of a unit's input hidden states.

``pooled_inputs`` runs prompts through a model with forward pre-hooks on the named unit modules and returns,
per unit, an (N, C) tensor of mean input features.  When only early units are needed the forward stops
right after the last of them ("one forward up to the router input").  ``token_inputs`` returns, per unit and
per prompt, the input features of up to ``per_text`` of its real tokens (seeded sample), for token routers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..modeling.modeling_moerge import masked_mean


class _Stop(Exception):
    pass


Reduce = Callable[[str, torch.Tensor, torch.Tensor], Any]  # path, (B, T, C) float32, (B, T) mask -> kept


@contextmanager
def _capture(model: Any, paths: list[str], mask_ref: dict, out: dict[str, list[Any]],
             stop_at: str | None, reduce: Reduce) -> Iterator[None]:
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def hook(mod: Any, args: tuple, kwargs: dict, path: str = path) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, C)
            out[path].append(reduce(path, x.float(), mask_ref["mask"]))
            if path == stop_at:
                raise _Stop

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model: Any, tokenizer: Any, texts: list[str], paths: list[str], reduce: Reduce, batch_size: int,
         stop_early: bool, max_length: int) -> dict[str, list[Any]]:
    """Forward ``texts`` in batches with capture hooks on ``paths``; per path, one ``reduce`` result per batch."""
    out: dict[str, list[Any]] = {p: [] for p in paths}
    mask_ref: dict[str, torch.Tensor] = {}
    stop_at = paths[-1] if stop_early else None
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # real tokens at positions 0..L-1, as at inference
    try:
        with _capture(model, paths, mask_ref, out, stop_at, reduce):
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                                max_length=max_length, add_special_tokens=False).to(device)
                mask_ref["mask"] = enc["attention_mask"]
                try:
                    model(**enc, use_cache=False)
                except _Stop:
                    pass
    finally:
        tokenizer.padding_side = side
    return out


@torch.no_grad()
def pooled_inputs(model: Any, tokenizer: Any, texts: list[str], paths: list[str], *, batch_size: int = 8,
                  stop_early: bool = True, max_length: int = 512) -> dict[str, torch.Tensor]:
    """Per unit path: (N, C) masked-mean input features for ``texts`` (already templated)."""
    def reduce(path: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(x, mask).cpu()  # (B, C)

    out = _run(model, tokenizer, texts, paths, reduce, batch_size, stop_early, max_length)
    return {p: torch.cat(v) for p, v in out.items()}


def sample_tokens(x: torch.Tensor, mask: torch.Tensor, per_text: int, gen: torch.Generator) -> list[torch.Tensor]:
    """(B, T, C), (B, T) -> B tensors (k_b, C): up to ``per_text`` real tokens of each row, in order."""
    rows = []
    for b in range(x.shape[0]):
        real = torch.nonzero(mask[b].cpu()).flatten()  # (L,)
        pick = real[torch.randperm(real.numel(), generator=gen)[:per_text].sort().values]  # (k,)
        rows.append(x[b, pick.to(x.device)].cpu())  # (k, C)
    return rows


@torch.no_grad()
def token_inputs(model: Any, tokenizer: Any, texts: list[str], paths: list[str], *, per_text: int = 16,
                 seed: int = 0, batch_size: int = 8, max_length: int = 512) -> dict[str, list[torch.Tensor]]:
    """Per unit path: one (k_i, C) tensor per text, the inputs of up to ``per_text`` sampled real tokens.

    ``paths`` must be in forward order: the forward stops after the last one."""
    gens = {p: torch.Generator().manual_seed(seed) for p in paths}  # same token picks at every unit

    def reduce(path: str, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return sample_tokens(x, mask, per_text, gens[path])

    out = _run(model, tokenizer, texts, paths, reduce, batch_size, True, max_length)
    return {p: [row for batch in v for row in batch] for p, v in out.items()}
