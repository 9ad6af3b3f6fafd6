"""Scoring on the real pool's dev splits: tasks, batched accuracy, routing accuracy and generation speed.

The rules are those of ``shared/REAL_DATA.md`` (the pool's reference numbers use them too):

* a prompt is the row's ``prompt`` as one user message under the tokenizer's chat template, with the
  generation prompt;
* classification (imdb, tweets, bbc): argmax of the next-token logits restricted to the first token of each
  label word;
* arithmetic: exact match of the first integer in a greedy generation of at most 8 new tokens (stops at
  ``<|im_end|>``).

Every forward runs under bf16 autocast on the CPU with fp32 weights (as the reference numbers), with left
padding and prompts sorted by length so that a batch wastes little on padding.  One loaded model serves a
whole method.  On a CPU without native bf16 (AVX2 only), where torch's bf16 GEMM is about 16x slower than fp32,
the bf16 GEMMs are computed as fp32 GEMMs of the same bf16 values rounded once to bf16
(``tools/bf16_emulation.py``: a native bf16 GEMM's arithmetic up to summation order).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bf16_emulation import emulated, native_bf16

TASKS = ("imdb", "tweets", "bbc", "arith")
LABELS = {
    "imdb": ("positive", "negative"),
    "tweets": ("negative", "neutral", "positive"),
    "bbc": ("business", "entertainment", "politics", "sports", "tech"),
    "arith": None,  # generation, exact match of the first integer
}
MAX_NEW_TOKENS = 8
END = "<|im_end|>"
_INT = re.compile(r"-?\d+")


@dataclass
class Task:
    name: str
    prompts: list[str]  # templated, ready to tokenize
    answers: list[str]
    labels: tuple[str, ...] | None  # None: arithmetic (generation)
    label_ids: list[int]  # first token of each label word

    def __len__(self) -> int:
        return len(self.prompts)


def template(tok: Any, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def read_rows(path: Path, n: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n] if n else rows


def load_tasks(pool: Path, tok: Any, n: int | None, split: str = "dev") -> list[Task]:
    """The first ``n`` rows (all when None) of each task's split."""
    tasks = []
    for name in TASKS:
        rows = read_rows(pool / "data" / name / f"{split}.jsonl", n)
        labels = LABELS[name]
        ids = [tok(w, add_special_tokens=False).input_ids[0] for w in labels] if labels else []
        if labels and len(set(ids)) != len(ids):
            raise ValueError(f"{name}: label words share a first token: {dict(zip(labels, ids))}")
        tasks.append(Task(name, [template(tok, r["prompt"]) for r in rows], [str(r["answer"]) for r in rows],
                          labels, ids))
    return tasks


# ---------------------------------------------------------------------------------------------------- batching

@contextmanager
def autocast(enabled: bool = True) -> Iterator[None]:
    """Inference mode with bf16 autocast (``enabled=False``: plain fp32, for models that fail under autocast)."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), \
            emulated(enabled and not native_bf16()):
        yield


def batches(tok: Any, texts: list[str], batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(indices, encoded batch) over ``texts`` sorted by token length; left padded, with position ids."""
    lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        yield idx, dict(enc)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask -> (B, T) positions counting real tokens only (left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def classify(model: Any, tok: Any, task: Task, idx: list[int], batch_size: int = 16,
             amp: bool = True) -> dict[int, str]:
    """Predicted label of each prompt in ``idx``."""
    label_ids = torch.tensor(task.label_ids)
    out: dict[int, str] = {}
    with autocast(amp):
        for sub, enc in batches(tok, [task.prompts[i] for i in idx], batch_size):
            logits = model(**enc, position_ids=position_ids(enc["attention_mask"]), logits_to_keep=1,
                           use_cache=False).logits  # (B, 1, V)
            best = logits[:, -1, label_ids].float().argmax(-1)  # (B,)
            for j, b in zip(sub, best.tolist()):
                out[idx[j]] = task.labels[b]  # type: ignore[index]
    return out


def generate_answers(model: Any, tok: Any, task: Task, idx: list[int], batch_size: int = 16,
                     amp: bool = True) -> dict[int, str]:
    """Greedy generation (<= 8 new tokens, stop at <|im_end|>) of each prompt in ``idx``."""
    end = tok.convert_tokens_to_ids(END)
    out: dict[int, str] = {}
    with autocast(amp):
        for sub, enc in batches(tok, [task.prompts[i] for i in idx], batch_size):
            gen = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=end,
                                 pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for j, text in zip(sub, texts):
                out[idx[j]] = text
    return out


def predict(model: Any, tok: Any, task: Task, idx: list[int] | None = None, batch_size: int = 16,
            amp: bool = True) -> dict[int, str]:
    idx = list(range(len(task))) if idx is None else idx
    if not idx:
        return {}
    fn = classify if task.labels else generate_answers
    return fn(model, tok, task, idx, batch_size, amp)


def correct(task: Task, i: int, pred: str) -> bool:
    if task.labels:
        return pred == task.answers[i]
    m = _INT.search(pred)
    return m is not None and m.group(0) == task.answers[i]


def accuracy(task: Task, preds: dict[int, str]) -> float:
    return sum(correct(task, i, p) for i, p in preds.items()) / max(len(preds), 1)


# ---------------------------------------------------------------------------------------------------- routing

Route = tuple[float, ...]


def routes_of(model: Any, tok: Any, texts: list[str], batch_size: int = 16) -> list[Route]:
    """The route (one weight per expert) a moerge model's own sequence-level router gives each prompt: one-hot
    for top-1, a soft mix for rows that fall back (``config.moerge.fallback``).

    Runs the model only up to its router input: the router's hook fires, then a hook registered after it
    stops the forward.  ``model.last_routes()`` is the route the full forward would use.
    """
    unit = model.get_submodule(model.config.moerge["router_input"])

    class _Stop(Exception):
        pass

    def stop(*_: Any, **__: Any) -> None:
        raise _Stop

    handle = unit.register_forward_pre_hook(stop)
    out: list[Route] = [()] * len(texts)
    try:
        with autocast():
            for idx, enc in batches(tok, texts, batch_size):
                try:
                    model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
                except _Stop:
                    pass
                for i, r in zip(idx, model.last_routes().float().tolist()):
                    out[i] = tuple(r)
    finally:
        handle.remove()
    return out


def route_key(route: Route, names: list[str]) -> str:
    """A one-hot route -> the expert's name; a mix -> ``name=weight,...`` (weights to 4 decimals)."""
    used = [(n, w) for n, w in zip(names, route) if w > 0]
    if len(used) == 1:
        return used[0][0]
    return ",".join(f"{n}={w:.4f}" for n, w in used)


def predict_routed(model: Any, tok: Any, task: Task, routes: list[Route], cache: dict[str, str],
                   batch_size: int = 16) -> dict[int, str]:
    """Predictions of a sequence-routed moerge model whose router gives prompt i the route ``routes[i]``.

    The model's output for a prompt depends only on the prompt and its route, so prompts are evaluated in
    groups under ``force_route(route)`` and each (prompt, route) pair is computed once: ``cache`` maps
    ``"i|route_key"`` to its prediction and is shared between routers of one checkpoint (prototype and
    calibrated routers differ only on the prompts they route differently).
    """
    names = getattr(model, "route_names", model.expert_names)  # the router's outputs: experts, then composed routes
    todo: dict[str, tuple[Route, list[int]]] = {}
    keys = [route_key(r, names) for r in routes]
    for i, (k, r) in enumerate(zip(keys, routes)):
        if f"{i}|{k}" not in cache:
            todo.setdefault(k, (r, []))[1].append(i)
    try:
        for k, (r, idx) in sorted(todo.items()):
            model.force_route({n: w for n, w in zip(names, r) if w > 0})
            for i, p in predict(model, tok, task, idx, batch_size).items():
                cache[f"{i}|{k}"] = p
    finally:
        model.force_route(None)
    return {i: cache[f"{i}|{k}"] for i, k in enumerate(keys)}


# ---------------------------------------------------------------------------------------------------- speed

def tokens_per_second(model: Any, tok: Any, prompt: str, batch: int, new_tokens: int = 32) -> float:
    """Greedy generation of exactly ``new_tokens`` tokens for ``batch`` copies of ``prompt`` (prefill
    included): generated tokens per CPU second of this thread, with one torch thread, in fp32.

    CPU time of the generating thread, not wall time: on a machine shared with other jobs wall time mostly
    measures the neighbours, while the thread's CPU time is what the generation costs."""
    enc = tok([prompt] * batch, return_tensors="pt", add_special_tokens=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():  # fp32, the checkpoints' dtype (bf16 autocast re-casts every weight)
            t = time.thread_time()
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            return batch * new_tokens / (time.thread_time() - t)
    finally:
        torch.set_num_threads(threads)


def speed_vs(model: Any, ref: Any, tok: Any, prompt: str, batch: int, reps: int = 3,
             new_tokens: int = 32) -> tuple[float, float]:
    """(tokens/s of ``model``, ratio to ``ref``): best of ``reps`` runs each, timed alternately, after one
    short warm-up each."""
    tokens_per_second(model, tok, prompt, batch, 4)
    tokens_per_second(ref, tok, prompt, batch, 4)
    mine, theirs = [], []
    for _ in range(reps):
        mine.append(tokens_per_second(model, tok, prompt, batch, new_tokens))
        theirs.append(tokens_per_second(ref, tok, prompt, batch, new_tokens))
    return max(mine), max(mine) / max(theirs)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
