"""Tokens/s of built checkpoints against the base, timed alternately (:func:`bench.real.evaluate.speed_vs`),
batch 1 (32 new tokens) and batch 8 (16), on the arith prompt the benchmark times; for rows a ``--no-speed`` run left
without tokens/s.

    python -m bench.real.speed_of CKPT_DIR [CKPT_DIR ...] [--reps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import evaluate as ev

REPO = Path(__file__).resolve().parents[2]
BASE = Path.home() / ".cache" / "moerge" / "smollm2-135m-instruct"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--base", type=Path, default=BASE)
    ap.add_argument("--pool", type=Path, default=REPO.parent / "shared" / "pool")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.base)
    prompt = ev.load_tasks(args.pool, tok, 1)[ev.TASKS.index("arith")].prompts[0]
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    for folder in args.checkpoints:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        for batch, new in ((1, 32), (8, 16)):
            tps, ratio = ev.speed_vs(model, base, tok, prompt, batch, reps=args.reps, new_tokens=new)
            print(f"{folder.name} batch {batch}: {tps:.1f} tok/s, {ratio:.2f}x the base", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
