"""Load a checkpoint (merged or moerge MoE) and generate text: what ``moerge generate`` runs.

Never runs code from the checkpoint folder: the model and tokenizer load with ``trust_remote_code=False``, a
moerge checkpoint through the installed moerge classes (``import moerge`` registers them), anything else through
the classes transformers ships.  A folder that needs its own code (``auto_map`` for an unknown model type) is
refused with one line, without the stdin prompt transformers would otherwise show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError


def load_model(path: Path, dtype: torch.dtype | None = None, *, chat: bool = False) -> tuple[Any, Any]:
    """Model (moerge's installed classes, never the folder's code) and a left-padding tokenizer of ``path``
    (``chat``: the tokenizer must have a chat template)."""
    ckpt = Checkpoint.open(path)
    tok = ckpt.tokenizer(padding_side="left")
    if chat and not getattr(tok, "chat_template", None):
        raise CheckpointError(path, "--chat", "the tokenizer has no chat template")
    return ckpt.load_model(dtype), tok


def encode_prompts(tok: Any, prompts: list[str], chat: bool) -> dict[str, torch.Tensor]:
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                   for p in prompts]
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)


def generate_text(path: Path, prompt: str, *, max_new_tokens: int = 32, chat: bool = False,
                  route: str | None = None, do_sample: bool = False) -> list[str]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise CheckpointError(None, "max_new_tokens", f"must be an integer >= 1, got {max_new_tokens!r}")
    model, tok = load_model(path, chat=chat)
    prompts = [prompt]
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
