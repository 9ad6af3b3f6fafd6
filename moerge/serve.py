"""Load a checkpoint (merged or moerge MoE) and generate text: what ``moerge generate`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError


def load_model(path: Path, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """The model (moerge's installed classes, never the folder's code) and a left-padding tokenizer."""
    ckpt = Checkpoint.open(path)
    return ckpt.load_model(dtype), ckpt.tokenizer(padding_side="left")


def encode_prompts(tok: Any, prompts: list[str], chat: bool) -> dict[str, torch.Tensor]:
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                   for p in prompts]
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)


def generate_text(path: Path, prompt: list[str] | str, *, max_new_tokens: int = 32, chat: bool = False,
                  route: str | None = None, do_sample: bool = False) -> list[str]:
    model, tok = load_model(path)
    prompts = [" ".join(prompt)] if isinstance(prompt, list) else [prompt]
    if route is not None:
        if not hasattr(model, "force_route"):
            raise CheckpointError(path, "--route", "only moerge MoE checkpoints can force a route")
        try:
            model.force_route(route)
        except ValueError as exc:
            raise CheckpointError(path, "--route", str(exc)) from None
    enc = encode_prompts(tok, prompts, chat)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
