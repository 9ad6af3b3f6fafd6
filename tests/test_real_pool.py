"""The shipped real-pool recipe end to end (slow; needs the converted base model and ``shared/pool``).

Builds ``recipes/real_pool.yaml`` against the real pool, calibrates its router as the recipe's header says,
loads the result and checks the bbc dev accuracy of its own (unforced) routing on 20 prompts: the expert
reaches 0.935 there and the base 0.29, so a model that routes bbc prompts to the bbc expert passes and one
that does not fails.

    python -m pytest -m slow tests/test_real_pool.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "real_pool.yaml"
CALIB = REPO / "recipes" / "real_pool_calib.yaml"
POOL = REPO.parent / "shared" / "pool"
LABELS = ("business", "entertainment", "politics", "sports", "tech")

pytestmark = [pytest.mark.slow, pytest.mark.real]


def _base_model() -> Path:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from get_base_model import default_out_dir, is_valid
    finally:
        sys.path.pop(0)
    folder = default_out_dir()
    if not is_valid(folder):
        pytest.skip(f"the real base model is absent ({folder}); run python tools/get_base_model.py")
    if not (POOL / "experts").is_dir():
        pytest.skip(f"the real pool is absent ({POOL})")
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = _base_model()
    out = tmp_path_factory.mktemp("real_pool") / "moe"
    for cmd in (["build", RECIPE, out, "--set", f"base={base}", "--quiet"],
                ["calibrate", out, "--data", CALIB, "--method", "supervised", "--holdout", "0.2", "--quiet"]):
        subprocess.run([sys.executable, "-m", "moerge", *map(str, cmd)], check=True, cwd=REPO)
    return out


def test_real_pool_recipe_bbc_accuracy(built: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moerge  # noqa: F401  (registers the moerge model type)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(built)
    tok.padding_side = "left"
    rows = [json.loads(line) for line in (POOL / "data" / "bbc" / "dev.jsonl").read_text().splitlines()[:20]]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                     tokenize=False) for r in rows]
    label_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in LABELS]
    preds, routes = [], []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(texts), 10):
            enc = tok(texts[i:i + 10], return_tensors="pt", padding=True, add_special_tokens=False)
            logits = model(**enc, logits_to_keep=1).logits[:, -1, label_ids]  # (B, 5)
            preds += [LABELS[j] for j in logits.float().argmax(-1).tolist()]
            routes += model.last_routes().argmax(-1).tolist()
    accuracy = sum(p == r["answer"] for p, r in zip(preds, rows)) / len(rows)
    routed_right = sum(model.expert_names[e] == "bbc" for e in routes) / len(routes)
    assert routed_right >= 0.9, routes
    assert accuracy >= 0.8, (accuracy, preds)
