"""Benchmark: supervised router calibration on the real pool (4 LoRA experts x 64 calibration prompts).

    python bench/calibrate_speed.py [--reps 2] [--no-dev] [--no-record]

Base: SmolLM2-135M-Instruct (``tools/get_base_model.py``); experts: the pool's LoRA adapters imdb, tweets, bbc,
arith (``shared/REAL_DATA.md``).  Builds once (cached in ``bench/_work/calibrate_speed/``) a sequence-level
moerge checkpoint routing every MLP with kind ``lora`` and an uninitialised (uniform) router, then times

    python -m moerge calibrate MOE --data DATA --holdout 0.2 --out COPY --force

as a child process (wall time includes Python start-up and loading the model), where DATA maps each task to
its ``calib.jsonl`` (field ``prompt``, ``chat_template: true``, at most 64 examples): 51 training and 13
held-out examples per task.  It reports the held-out routing accuracy of ``calibration.json`` and, unless
``--no-dev``, the routing accuracy on the dev splits (200 prompts per task, never seen by calibration),
computed with the calibrated model's own router on its router-input features; 8 dev prompts per task are
also run through the full model forward to check that ``last_routes()`` agrees.  Appends a table to
``bench/RESULTS.md`` under ``## calibrate_speed (issue 4)``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _measure import cpu_model, record

WORK = HERE / "_work" / "calibrate_speed"
POOL = Path(os.environ.get("MOERGE_POOL", REPO.parent / "shared" / "pool"))
RESULTS = HERE / "RESULTS.md"
HEADING = "## calibrate_speed (issue 4)"
TASKS = ("imdb", "tweets", "bbc", "arith")
MAX_SAMPLES = 64
HOLDOUT = 0.2


# ------------------------------------------------------------------------------------------------ setup

def real_base() -> Path:
    """The converted base (``tools/get_base_model.py`` prints its folder)."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "get_base_model.py")], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return Path(out.stdout.strip().splitlines()[-1])


def data_mapping(pool: Path) -> dict[str, dict[str, Any]]:
    return {t: {"data": str(pool / "data" / t / "calib.jsonl"), "field": "prompt", "chat_template": True,
                "max_samples": MAX_SAMPLES} for t in TASKS}


def build_real(base: Path, pool: Path, out: Path) -> Path:
    """Routed moerge checkpoint: every MLP routed, kind lora, sequence level, uniform router."""
    import moerge
    from moerge.recipe import recipe_from_dict

    raw = {"base": str(base), "experts": [{"name": t, "source": str(pool / "experts" / t)} for t in TASKS],
           "merge": {"method": "task_arithmetic"},
           "routing": {"select": {"all": True}, "modules": "mlp", "expert": {"kind": "lora"},
                       "router": {"level": "sequence", "init": "uniform"}}}
    if not (out / "config.json").is_file():
        moerge.build(recipe_from_dict(raw), out, force=True, progress=False)
    return out


def calibrate_real(moe: Path, pool: Path, out: Path | None = None) -> dict[str, Any]:
    """Supervised calibration through the Python API (used by the slow test)."""
    from moerge.routing.calibrate import CalibrateOptions, calibrate

    report = calibrate(moe, data_mapping(pool), out=out, force=True, options=CalibrateOptions(holdout=HOLDOUT))
    assert report is not None
    return report


# ------------------------------------------------------------------------------------------------ measures

def time_cli(moe: Path, data: Path, out: Path) -> tuple[float, dict[str, Any]]:
    cmd = [sys.executable, "-m", "moerge", "calibrate", str(moe), "--data", str(data), "--holdout", str(HOLDOUT),
           "--out", str(out), "--force", "--quiet"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    return wall, json.loads((out / "calibration.json").read_text())


@torch.no_grad()
def dev_routing(moe: Path, pool: Path, n_check: int = 8) -> dict[str, Any]:
    """Dev-split routing accuracy per task with the calibrated router, and a full-forward cross-check."""
    from moerge.routing.calibrate import load_model, load_tokenizer
    from moerge.routing.features import pooled_inputs

    model, tok = load_model(moe, None), load_tokenizer(moe)
    unit = model.config.moerge["router_input"]
    per_task, agree, checked = {}, 0, 0
    for e, task in enumerate(TASKS):
        rows = [json.loads(line)["prompt"] for line in (pool / "data" / task / "dev.jsonl").read_text().splitlines()]
        texts = [tok.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True,
                                         tokenize=False) for r in rows]
        feats = pooled_inputs(model, tok, texts, [unit], batch_size=16)[unit]
        pred = model.moerge_router.probs(feats).argmax(-1)  # (N,)
        per_task[task] = float((pred == e).float().mean())
        tok.padding_side = "right"
        enc = tok(texts[:n_check], return_tensors="pt", padding=True, add_special_tokens=False)
        model(**enc, use_cache=False, logits_to_keep=1)
        agree += int((model.last_routes().argmax(-1) == pred[:n_check]).sum())
        checked += n_check
    return {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task), "forward_agree": f"{agree}/{checked}"}


# ------------------------------------------------------------------------------------------------ report

def machine() -> str:
    """CPU, torch threads and the current load average (this benchmark's own format)."""
    cpu = cpu_model(platform.processor())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}; {os.cpu_count()} CPUs visible; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"load average {load}")


def table(runs: list[tuple[float, dict[str, Any]]], dev: dict[str, Any] | None) -> str:
    head = ("| run | wall (CLI) | load | features | fit | held-out acc | n train / held-out | temperature | "
            "threshold |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, (wall, rep) in enumerate(runs):
        t = rep["timing"]
        n_tr, n_ho = sum(rep["n_train"].values()), sum(rep["n_heldout"].values())
        temp = ", ".join(f"{v:.3g}" for v in rep["temperature"].values())
        fb = rep["fallback"]["threshold"] if rep["fallback"] else None
        lines.append(f"| {i + 1} | {wall:.1f} s | {t['load_s']:.1f} s | {t['features_s']:.1f} s | {t['fit_s']:.1f} s | "
                     f"{rep['heldout']['accuracy']:.4f} | {n_tr} / {n_ho} | {temp} | {fb} |")
    text = "\n".join(lines)
    rep = runs[-1][1]
    text += "\n\nHeld-out per expert (last run): " + ", ".join(
        f"{k} P {v['precision']:.3f} R {v['recall']:.3f}" for k, v in rep["heldout"]["per_expert"].items())
    text += f"; mean routing entropy {rep['heldout']['mean_entropy']:.4f} nats; fallback rate " \
            f"{rep['heldout']['fallback_rate']:.4f}."
    if dev:
        text += "\n\nDev-split routing accuracy (200 per task, not used by calibration): " + ", ".join(
            f"{k} {v:.3f}" for k, v in dev["per_task"].items()) + f"; mean {dev['mean']:.4f}; full-forward " \
            f"`last_routes()` agrees with the feature-level route on {dev['forward_agree']} prompts."
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2, help="timed calibrations (default 2)")
    ap.add_argument("--no-dev", action="store_true", help="skip the dev-split routing accuracy")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cached = (WORK / "moe" / "config.json").is_file()
    moe = build_real(real_base(), POOL, WORK / "moe")
    build = "cached" if cached else f"{time.perf_counter() - t0:.0f} s"
    data = WORK / "data.yaml"
    data.write_text(yaml.safe_dump(data_mapping(POOL)))
    runs = [time_cli(moe, data, WORK / "calibrated") for _ in range(args.reps)]
    dev = None if args.no_dev else dev_routing(WORK / "calibrated", POOL)
    cmd = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/calibrate_speed.py " + \
          " ".join(shlex.quote(a) for a in sys.argv[1:])
    entry = (f"### {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\nMachine: {machine()}.\n\n"
             f"Command: `{cmd.strip()}`; each run: `python -m moerge calibrate MOE --data DATA --holdout {HOLDOUT} "
             f"--out COPY --force` (4 tasks x {MAX_SAMPLES} calib prompts, sequence level, all 30 MLPs routed, "
             f"kind lora; build, once: {build}).\n\n{table(runs, dev)}\n")
    print(entry)
    if not args.no_record:
        record(entry, HEADING)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
