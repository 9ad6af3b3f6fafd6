"""Real pool: native Mixtral MoE of the four LoRA experts, moerge vs mergekit-moe, on the dev splits.

    python bench/moe_real.py [--n 200] [--no-record] [--skip-calibrated]

Base: SmolLM2-135M-Instruct (``tools/get_base_model.py``); experts: the pool's LoRA adapters imdb, tweets, bbc,
arith (``shared/REAL_DATA.md``); both tools get the same 64 calibration prompts per task (``calib.jsonl``, under
the chat template) and write a 4-expert, top-2 Mixtral:

* mergekit-moe (``gate_mode: hidden``, fp32) takes full checkpoints, so each adapter is first merged into the
  base (``merge_and_unload``, cached in ``bench/_work/moe_real/``); it keeps the base's attention;
* moerge (``output.format: mixtral``, token routing, dense experts) takes the adapters directly; attention is the
  task-arithmetic merge; router rows come from the same prompts at each layer's post-attention norm output;
  ``moerge +calibrated`` also fits the rows (supervised calibration, ``export_from_plan(calibrate=True)``).

Scores on the dev split (the held-out test split is not used), rules of ``shared/REAL_DATA.md`` (code in
``bench/real/evaluate.py``, bf16 autocast, fp32 weights):

* task accuracy per task, and normalised by the reference expert accuracies of REAL_DATA.md;
* self-routing accuracy: share of a task's prompts whose router probabilities, averaged over real tokens and
  layers, pick that task's expert; token self-routing: share of (real token, layer) pairs whose top-1 expert is
  the task's.

Appends a table to ``bench/RESULTS.md`` under ``## moe_real (issue 5)``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "moe_real"
POOL = Path(os.environ.get("MOERGE_POOL", REPO.parent / "shared" / "pool"))
RESULTS = HERE / "RESULTS.md"
HEADING = "## moe_real (issue 5)"
TASKS = ("imdb", "tweets", "bbc", "arith")
EXPERT_REF = {"imdb": 0.775, "tweets": 0.565, "bbc": 0.935, "arith": 0.360}  # REAL_DATA.md, dev n=200
TOP_K = 2
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _measure import machine, record


def _evaluate_module() -> Any:
    """``bench/real/evaluate.py`` (the pool's scoring rules), imported by path."""
    if "real_evaluate" in sys.modules:
        return sys.modules["real_evaluate"]
    spec = importlib.util.spec_from_file_location("real_evaluate", HERE / "real" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["real_evaluate"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def base_model() -> Path:
    from tools.get_base_model import get_base_model

    return Path(get_base_model())


def merged_experts(base: Path) -> list[Path]:
    """Each LoRA adapter merged into the base as a full fp32 checkpoint (for mergekit-moe), cached."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = []
    for t in TASKS:
        folder = WORK / f"full_{t}"
        if not (folder / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, POOL / "experts" / t).merge_and_unload()
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(base).save_pretrained(folder)
        out.append(folder)
    return out


def calib_prompts(tok: Any) -> dict[str, list[str]]:
    ev = _evaluate_module()
    return {t: [ev.template(tok, r["prompt"]) for r in ev.read_rows(POOL / "data" / t / "calib.jsonl", None)]
            for t in TASKS}


def write_configs(base: Path, full: list[Path], prompts: dict[str, list[str]]) -> tuple[dict, Path]:
    import yaml

    recipe = {
        "base": str(base),
        "experts": [{"name": t, "source": str(POOL / "experts" / t),
                     "calibration": {"data": str(POOL / "data" / t / "calib.jsonl"), "field": "prompt",
                                     "chat_template": True, "max_samples": 64}} for t in TASKS],
        "routing": {"router": {"level": "token"}},
        "output": {"format": "mixtral", "experts_per_token": TOP_K},
    }
    mergekit = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": TOP_K,
                "experts": [{"source_model": str(p), "positive_prompts": prompts[t]} for t, p in zip(TASKS, full)]}
    path = WORK / "mergekit_moe.yml"
    path.write_text(yaml.safe_dump(mergekit, sort_keys=False))
    return recipe, path


def build_all(recipe: dict, mk_config: Path, calibrated: bool) -> dict[str, tuple[Path, float]]:
    from moerge.export import export_from_plan
    from moerge.pipeline.context import BuildContext
    from moerge.pipeline.plan import make_plan
    from moerge.recipe import recipe_from_dict

    outs: dict[str, tuple[Path, float]] = {}
    exe = shutil.which("mergekit-moe", path=str(Path(sys.executable).parent)) or "mergekit-moe"
    t0 = time.perf_counter()
    subprocess.run([exe, str(mk_config), str(WORK / "out_mergekit"), "--quiet"], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    outs["mergekit-moe"] = (WORK / "out_mergekit", time.perf_counter() - t0)
    for name, cal in [("moerge", False), ("moerge +calibrated", True)][: 2 if calibrated else 1]:
        t0 = time.perf_counter()
        plan = make_plan(BuildContext.open(recipe_from_dict(recipe)), progress=False)
        out = WORK / ("out_moerge_cal" if cal else "out_moerge")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_from_plan(plan, out, force=True, progress=False, calibrate=cal)
        outs[name] = (out, time.perf_counter() - t0)
    return outs


# ------------------------------------------------------------------------------------------------ scoring


@contextmanager
def router_probs(model: Any) -> Iterator[list[torch.Tensor]]:
    """While active, collects every MoE router's probabilities (B*T, E) of each forward, in layer order."""
    probs: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: probs.append(out[0].float().softmax(-1)))
             for layer in model.model.layers]
    try:
        yield probs
    finally:
        for h in hooks:
            h.remove()


def routing_hits(probs: list[torch.Tensor], mask: torch.Tensor, expert: int) -> tuple[int, float]:
    """(prompts whose mean router probability over real tokens and layers picks ``expert``, real (token, layer)
    pairs whose top-1 expert is ``expert``)."""
    p = torch.stack(probs).view(len(probs), *mask.shape, -1)  # (L, B, T, E)
    w = mask[None, :, :, None].float()  # (1, B, T, 1)
    mean = (p * w).sum((0, 2)) / w.sum((0, 2))  # (B, E)
    top = (p.argmax(-1) == expert).float() * w[..., 0]  # (L, B, T)
    return int((mean.argmax(-1) == expert).sum()), float(top.sum())


def score_task(model: Any, tok: Any, task: Any, expert: int, batch_size: int = 16) -> dict[str, float]:
    """Task accuracy and self-routing (prompt level and token level) from the same forwards."""
    ev = _evaluate_module()
    hits, tok_hits, n_tok = 0, 0.0, 0.0
    preds: dict[int, str] = {}
    label_ids = torch.tensor(task.label_ids) if task.labels else None
    with router_probs(model) as probs, ev.autocast():
        for idx, enc in ev.batches(tok, task.prompts, batch_size):
            probs.clear()
            mask = enc["attention_mask"]  # (B, T)
            logits = model(**enc, position_ids=ev.position_ids(mask), use_cache=False, logits_to_keep=1).logits
            h, t = routing_hits(probs, mask, expert)
            hits, tok_hits, n_tok = hits + h, tok_hits + t, n_tok + float(mask.sum()) * len(probs)
            if label_ids is not None:
                for i, b in zip(idx, logits[:, -1, label_ids].float().argmax(-1).tolist()):
                    preds[i] = task.labels[b]
    if label_ids is None:
        preds = ev.generate_answers(model, tok, task, list(range(len(task))), batch_size)
    return {"acc": ev.accuracy(task, preds), "route": hits / len(task), "token_route": tok_hits / max(n_tok, 1)}


def score(folder: Path, n: int | None) -> dict[str, dict[str, float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ev = _evaluate_module()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    out = {}
    for e, task in enumerate(ev.load_tasks(POOL, tok, n)):
        out[task.name] = r = score_task(model, tok, task, e)
        print(f"  {folder.name:16s} {task.name:7s} acc {r['acc']:.3f} self-routing {r['route']:.3f} "
              f"(tokens {r['token_route']:.3f})", flush=True)
    return out


def table(results: dict[str, dict[str, dict[str, float]]], times: dict[str, float]) -> str:
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for t in TASKS:
        lines.append(f"| {t} task accuracy | " + " | ".join(f"{results[m][t]['acc']:.3f}" for m in names) + " |")
    lines.append("| normalised accuracy (/ expert, mean) | " + " | ".join(
        f"{sum(results[m][t]['acc'] / EXPERT_REF[t] for t in TASKS) / len(TASKS):.3f}" for m in names) + " |")
    for t in TASKS:
        lines.append(f"| {t} self-routing | " + " | ".join(f"{results[m][t]['route']:.3f}" for m in names) + " |")
    lines.append("| self-routing (mean) | " + " | ".join(
        f"{sum(results[m][t]['route'] for t in TASKS) / len(TASKS):.3f}" for m in names) + " |")
    lines.append("| token self-routing (mean) | " + " | ".join(
        f"{sum(results[m][t]['token_route'] for t in TASKS) / len(TASKS):.3f}" for m in names) + " |")
    lines.append("| build time | " + " | ".join(f"{times[m]:.0f} s" for m in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="dev prompts per task (default all 200)")
    ap.add_argument("--skip-calibrated", action="store_true", help="no supervised-calibration variant")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    WORK.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    base = base_model()
    full = merged_experts(base)
    recipe, mk_config = write_configs(base, full, calib_prompts(AutoTokenizer.from_pretrained(base)))
    built = build_all(recipe, mk_config, not args.skip_calibrated)
    results = {name: score(folder, args.n) for name, (folder, _) in built.items()}
    summary = table(results, {k: v[1] for k, v in built.items()})
    print("\n" + summary)
    if not args.no_record:
        record("\n".join([
            f"### {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}", "",
            f"- machine: {machine()}",
            f"- command: `{shlex.join(['python', 'bench/moe_real.py', *(argv if argv is not None else sys.argv[1:])])}`",
            (f"- SmolLM2-135M-Instruct base, the pool's 4 LoRA experts; native Mixtral, 4 experts, top-{TOP_K}, every "
             f"layer MoE; same 64 templated calib prompts per task for both; dev split, n={args.n or 200} per task, "
             "bf16 autocast; normalised = accuracy / the reference expert accuracy of REAL_DATA.md"),
            ("- mergekit-moe: adapters merged into full fp32 checkpoints first (not timed), gate_mode hidden, base "
             "attention; moerge: `output.format: mixtral`, token routing, attention = task-arithmetic merge of the "
             "adapters"),
            "", summary,
        ]), HEADING)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
