"""Pooled features at router inputs: the attention-mask-aware mean of a unit's input hidden states.

``pooled_inputs`` runs prompts through a model with forward pre-hooks on the named unit modules and returns,
per unit, an (N, C) tensor of mean input features.  When only early units are needed the forward stops
right after the last of them ("one forward up to the router input").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class _Stop(Exception):
    pass


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T) -> (B, C)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


@contextmanager
def _capture(model: Any, paths: list[str], mask_ref: dict, out: dict[str, list[torch.Tensor]],
             stop_at: str | None) -> Iterator[None]:
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def hook(mod: Any, args: tuple, kwargs: dict, path: str = path) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, C)
            out[path].append(masked_mean(x.float(), mask_ref["mask"]).cpu())
            if path == stop_at:
                raise _Stop

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def pooled_inputs(model: Any, tokenizer: Any, texts: list[str], paths: list[str], *, batch_size: int = 8,
                  stop_early: bool = True, max_length: int = 512) -> dict[str, torch.Tensor]:
    """Per unit path: (N, C) masked-mean input features for ``texts`` (already templated)."""
    out: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    mask_ref: dict[str, torch.Tensor] = {}
    stop_at = paths[-1] if stop_early else None
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # real tokens at positions 0..L-1, as at inference
    with _capture(model, paths, mask_ref, out, stop_at):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=False).to(device)
            mask_ref["mask"] = enc["attention_mask"]
            try:
                model(**enc, use_cache=False)
            except _Stop:
                pass
    tokenizer.padding_side = side
    return {p: torch.cat(v) for p, v in out.items()}
