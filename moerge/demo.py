"""``moerge demo``: what routing buys, in under 30 seconds, offline.

It makes a tiny Llama base and trains three tiny experts on toy tasks for a few seconds each (only their linear
layers, one torch thread, seeded): ``sentiment`` answers a review with ``positive`` / ``negative``, ``topic`` a
headline with ``sports`` / ``politics`` / ``business``, ``math`` "Compute: 3 plus 4" with the sum.  It then
builds the bundled recipe ``moerge/recipes/demo.yaml`` (every linear routed, dense experts, a router initialised
from 32 prompts per task, the static task-arithmetic merge as the shared weights), loads the result in a fresh
process with plain transformers and answers fresh prompts of each task three ways, side by side:

* **routed**: the MoE as served (its router picks the expert);
* **static merge**: the same checkpoint with the shared weights only (``force_route({})``), i.e. what a static
  merge of the three experts answers;
* **expert alone**: the right expert's own folder, loaded as a plain Llama.

Routed answers equal the right expert's; the static merge's mostly do not (``tests/test_demo.py``).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from .checkpoint.summary import inspect_checkpoint
from .pipeline import build
from .recipe import load_recipe
from .testing import tiny

POSITIVE = ("great", "good", "wonderful", "loved", "amazing", "excellent", "fun", "best")
NEGATIVE = ("bad", "awful", "boring", "terrible", "worst", "hated", "dull", "weak")
FILLER = ("the", "film", "movie", "plot", "acting", "was", "and", "a", "story", "actor", "scene", "ending")
TOPICS = {"sports": ("team", "match", "goal", "league", "coach", "player", "win", "season"),
          "politics": ("minister", "vote", "election", "parliament", "president", "policy", "government", "party"),
          "business": ("market", "shares", "stocks", "profit", "company", "trade", "bank", "economy")}
STEPS = {"sentiment": 120, "topic": 120, "math": 250}  # Adam steps of batch 16 (~1-3 s each on one core)
LR = 3e-3
OUTPUT_NORM_SCALE = 6.0  # the base's final norm, scaled up so that tiny experts can answer with confidence
PROMPTS_PER_TASK = 2


def sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    major, minor = (POSITIVE, NEGATIVE) if label == "positive" else (NEGATIVE, POSITIVE)
    words = [rng.choice(major) for _ in range(3)] + [rng.choice(minor)]
    words += [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
    rng.shuffle(words)
    return "Review: " + " ".join(words), label


def topic(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(list(TOPICS))
    words = [rng.choice(TOPICS[label]) for _ in range(rng.randint(3, 5))] + [rng.choice(["the", "a", "of", "today"])]
    rng.shuffle(words)
    return "Headline: " + " ".join(words), label


def math(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    return f"Compute: {a} plus {b}", str(a + b)


TOY_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"sentiment": sentiment, "topic": topic,
                                                                    "math": math}


def corpus() -> list[str]:
    """Tokenizer lines: every toy word alone (answers start a line) and in running text."""
    words = [*POSITIVE, *NEGATIVE, *FILLER, *(w for ws in TOPICS.values() for w in ws), *TOPICS, "positive",
             "negative", "Review:", "Headline:", "Compute:", "plus"]
    numbers = [str(i) for i in range(10)]
    return [w for w in words + numbers for _ in range(4)] + [" ".join(words)] * 6 + [" ".join(numbers)] * 6


# ---------------------------------------------------------------- models

@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_demo_base(out: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with its output norm scaled by OUTPUT_NORM_SCALE."""
    from safetensors.torch import load_file, save_file

    base = tiny.make_base(out, family="llama", hidden=64, layers=2, heads=4, kv_heads=2, seed=0, corpus=corpus())
    state = load_file(str(base / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] * OUTPUT_NORM_SCALE
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


def toy_batch(tok, task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n examples: input ids (n, L) right-padded, attention mask, labels (the answer and <|im_end|> only)."""
    rng = random.Random(f"{seed}:{task}")
    rows = []
    for _ in range(n):
        prompt, answer = TOY_TASKS[task](rng)
        ids = tok(chat(tok, prompt), add_special_tokens=False).input_ids
        rows.append((ids, tok(answer + tok.eos_token, add_special_tokens=False).input_ids))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((n, width), tok.pad_token_id)
    mask, labels = torch.zeros(n, width, dtype=torch.long), torch.full((n, width), -100)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return ids, mask, labels


def chat(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def train_expert(base: Path, out: Path, task: str, seed: int = 0) -> Path:
    """Fine-tune the base's linear layers on ``task`` (so every weight that changes is a routed one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids, mask, labels = toy_batch(tok, task, 256, seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    params = [p for n, p in model.named_parameters() if n.endswith("_proj.weight")]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=LR)
    gen = torch.Generator().manual_seed(seed)
    with one_thread():
        for _ in range(STEPS[task]):
            b = torch.randint(0, len(ids), (16,), generator=gen)  # (16,)
            loss = model(input_ids=ids[b], attention_mask=mask[b], labels=labels[b]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_demo_models(root: Path) -> None:
    base = make_demo_base(root / "models" / "base")
    for task in TOY_TASKS:
        train_expert(base, root / "models" / task, task)
        rng = random.Random(f"calib:{task}")
        rows = [json.dumps({"prompt": TOY_TASKS[task](rng)[0]}) for _ in range(32)]
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / f"{task}.jsonl").write_text("\n".join(rows) + "\n")


def demo_prompts() -> list[tuple[str, str, str]]:
    """(task, prompt, right answer), PROMPTS_PER_TASK fresh prompts per task (seeded)."""
    rng = random.Random("demo")
    return [(task, *gen(rng)) for task, gen in TOY_TASKS.items() for _ in range(PROMPTS_PER_TASK)]


# ---------------------------------------------------------------- answering (in a fresh process)

ANSWER = """
import json, sys, torch, moerge
from transformers import AutoModelForCausalLM, AutoTokenizer
moe, models, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
def answer(model, tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
tok = AutoTokenizer.from_pretrained(moe)
model = AutoModelForCausalLM.from_pretrained(moe).eval()  # plain transformers: moerge registered its model type
experts = {t: AutoModelForCausalLM.from_pretrained(f"{models}/{t}").eval() for t in {t for t, _ in prompts}}
for task, prompt in prompts:
    routed = answer(model, tok, prompt)
    route = model.expert_names[int(model.last_routes()[0].argmax())]
    model.force_route({})
    merged = answer(model, tok, prompt)
    model.force_route(None)
    print(json.dumps({"task": task, "prompt": prompt, "routed": routed, "route": route, "merge": merged,
                      "expert": answer(experts[task], tok, prompt)}))
"""


def answer_all(moe: Path, models: Path, prompts: list[tuple[str, str, str]]) -> list[dict]:
    arg = json.dumps([[t, p] for t, p, _ in prompts])
    run = subprocess.run([sys.executable, "-c", ANSWER, str(moe), str(models), arg], check=True,
                         capture_output=True, text=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    for row, (_, _, right) in zip(rows, prompts):
        row["right"] = right
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ("prompt", "right", "routed [expert]", "static merge", "expert alone")
    cells = [head] + [(r["prompt"], r["right"], f"{r['routed']!r} [{r['route']}]", repr(r["merge"]), repr(r["expert"]))
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    same = sum(r["routed"] == r["expert"] for r in rows)
    merge_same = sum(r["merge"] == r["expert"] for r in rows)
    lines.append(f"\nrouted = expert alone on {same}/{len(rows)} prompts; static merge = expert alone on "
                 f"{merge_same}/{len(rows)}")
    return "\n".join(lines)


def run_demo(workdir: Path, force: bool = False) -> list[dict]:
    """Make the models (once), build the demo recipe, answer the demo prompts; returns the answer rows."""
    start = time.perf_counter()
    workdir = workdir.absolute()
    if force and workdir.exists():
        shutil.rmtree(workdir)
    if not (workdir / "models" / "math").exists():
        print(f"training three tiny experts in {workdir / 'models'} (a few seconds each)")
        make_demo_models(workdir)
    recipe_path = workdir / "demo.yaml"
    recipe_path.write_text(resources.files("moerge").joinpath("recipes/demo.yaml").read_text())
    out = workdir / "moe"
    build(load_recipe(recipe_path), out, force=True, file=str(recipe_path), progress=False)
    print(f"built {out}")
    print(inspect_checkpoint(out))
    rows = answer_all(out, workdir / "models", demo_prompts())
    print()
    print(format_rows(rows))
    print(f"\n{time.perf_counter() - start:.1f} s")
    return rows
