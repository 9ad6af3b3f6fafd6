"""How far a native export is from the moerge checkpoint it came from: ``export_report.json``.

For each expert e, on a few fixed prompts: the moerge model with ``force_route(e)`` against the native model with
every expert slot of every MoE layer holding expert e's weights (so the router cannot matter; top-k weights are
renormalised, and a Qwen2-MoE residual expert plus the half-gated shared expert is exactly ``MLP_e``).  Both run
in float32, one model (and a copy of its expert stacks) in memory at a time; reported per expert: the largest
absolute logit difference and the mean KL(moerge || native) of the next-token distributions over every position
(computed in float64).

What to expect: dense experts are written as stored, so the difference is float32 summation-order noise
(~1e-6); materialized experts (``W_s + Δ_e``) add the rounding of ``W_e`` to the checkpoint's dtype, nothing in
float32 checkpoints, about one bf16 ulp of each weight in bfloat16 ones.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..modeling import MoergeForCausalLM

REPORT_FILE = "export_report.json"
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 17 plus 25? Answer:",
    "The film was slow, but the ending made up for it.",
    "Markets fell sharply after the central bank raised rates.",
)
_EXPERT_STACK = re.compile(r".*\.experts\.(gate_up_proj|down_proj)$")  # transformers 5: (E, ...) fused stacks


def prompt_ids(folder: Path, vocab: int) -> list[torch.Tensor]:
    """The fixed prompts as (1, T) token ids with the export's tokenizer (fixed random ids without one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (1, 12), generator=gen) for _ in PROMPTS]
    return [tok(p, return_tensors="pt")["input_ids"] for p in PROMPTS]


@torch.no_grad()
def moerge_logits(checkpoint: Path, ids: list[torch.Tensor], n_experts: int) -> list[list[torch.Tensor]]:
    """[expert][prompt] -> (T, V) float32 logits of the moerge checkpoint pinned to that expert."""

    model = MoergeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for e in range(n_experts):
        model.force_route(e)
        out.append([model(input_ids=x).logits[0] for x in ids])
    del model
    gc.collect()
    return out


def expert_stacks(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every fused expert parameter (E, ...) of a native transformers MoE model."""
    return {n: p for n, p in model.named_parameters() if _EXPERT_STACK.fullmatch(n) and p.dim() == 3}


@torch.no_grad()
def native_logits(folder: Path, ids: list[torch.Tensor], n_experts: int) -> list[list[torch.Tensor]]:
    """[expert][prompt] -> (T, V) float32 logits of the native export with every expert slot set to that expert."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stacks = expert_stacks(model)
    kept = {n: p.detach().clone() for n, p in stacks.items()}
    out = []
    for e in range(n_experts):
        for n, p in stacks.items():
            p.copy_(kept[n][e : e + 1].expand_as(p))  # (E, ...) <- slot e everywhere
        out.append([model(input_ids=x).logits[0] for x in ids])
    del model, kept
    gc.collect()
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """Max |Δ logit| and mean KL(ref || got) of the next-token distributions over every prompt position.
    ref, got: per prompt (T, V) logits."""
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    kls = [F.kl_div(F.log_softmax(b.double(), -1), F.log_softmax(a.double(), -1), log_target=True,
                    reduction="none").sum(-1) for a, b in zip(ref, got)]  # (T,) each, in float64: float32's
    # log-softmax rounding alone gives ~1e-7; >= 0 up to rounding, clamped
    return {"max_abs_logit_diff": diff, "mean_kl": float(torch.cat(kls).clamp_min(0).mean())}


@contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    hide = not show and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def logit_report(checkpoint: Path, folder: Path, names: list[str], vocab: int, info: dict[str, Any], *,
                 progress: bool = True) -> dict:
    """The report written as ``export_report.json`` (``info``: what the export did, stored alongside)."""
    ids = prompt_ids(folder, vocab)
    with _loading_bars(progress):
        ref = moerge_logits(checkpoint, ids, len(names))
        got = native_logits(folder, ids, len(names))
    experts = {name: compare(ref[e], got[e]) for e, name in enumerate(names)}
    return {**info, "compute_dtype": "float32", "prompts": list(PROMPTS), "experts": experts,
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in experts.values()),
            "mean_kl": sum(r["mean_kl"] for r in experts.values()) / len(experts)}


def report_lines(report: dict) -> list[str]:
    """The report as the CLI prints it."""
    lines = [(f"logit difference to the moerge checkpoint (expert pinned in both, {report['compute_dtype']}, "
             f"{len(report['prompts'])} prompts):")]
    for name, r in report["experts"].items():
        lines.append(f"  {name}: max |d logit| {r['max_abs_logit_diff']:.3g}, mean KL {r['mean_kl']:.3g}")
    return lines
