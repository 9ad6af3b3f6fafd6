"""``moerge demo``: make tiny offline models, build the bundled recipe, load the result and generate.

Everything is local and random (no hub access): a tiny Llama base, two full fine-tunes and one LoRA
adapter, plus synthetic calibration prompts; the MoE is then loaded in a fresh process with transformers
and generates for one prompt per task.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from .checkpoint.summary import inspect_checkpoint
from .pipeline import build
from .recipe import load_recipe
from .testing import tiny

TASKS = {"sentiment": "sentiment", "topic": "topic", "math": "math"}


def make_demo_models(root: Path) -> None:
    base = tiny.make_base(root / "models" / "base", family="llama", hidden=64, layers=4, seed=0)
    tiny.make_full_expert(base, root / "models" / "sentiment", seed=1, scale=0.3)
    tiny.make_full_expert(base, root / "models" / "topic", seed=2, scale=0.3)
    tiny.make_lora_expert(base, root / "models" / "math_lora", seed=3, r=8, alpha=16, scale=0.2)
    for task in TASKS.values():
        tiny.make_task_data(root / "data" / f"{task}.jsonl", task, n=32, seed=7)


LOAD_AND_GENERATE = """
import sys, torch, moerge
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
prompts = sys.argv[2:]
texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
         for p in prompts]
enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
routes = model.last_routes()
names = model.config.moerge["experts"]
for i, p in enumerate(prompts):
    text = tok.decode(out[i, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    r = ", ".join(f"{n}={w:.2f}" for n, w in zip(names, routes[i].tolist()))
    print(f"[{r}] {p!r} -> {text!r}")
"""


def run_demo(workdir: Path, force: bool = False) -> Path:
    workdir = workdir.absolute()
    if force and workdir.exists():
        shutil.rmtree(workdir)
    if not (workdir / "models" / "base").exists():
        print(f"making tiny models in {workdir / 'models'}")
        make_demo_models(workdir)
    recipe_path = workdir / "demo.yaml"
    recipe_path.write_text(resources.files("moerge").joinpath("recipes/demo.yaml").read_text())
    out = workdir / "moe"
    build(load_recipe(recipe_path), out, force=True, file=str(recipe_path))
    print(f"built {out}")
    print(inspect_checkpoint(out))
    prompts = [tiny.make_prompt(t, __import__("random").Random(99)) for t in TASKS.values()]
    subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out), *prompts], check=True)
    return out
