"""Benchmark: the twin kind on the full fine-tune pool, exact vs randomized SVD, next to a dense build.

Issue 11's target: a twin r16 build of every unit of the real full-fine-tune pool (SmolLM2-135M-Instruct, four
experts that change every tensor, cached by ``tools/get_full_pool.py``) costs at most 1.5x the dense build of the
same pool, with accuracy unchanged within noise.  In one run, interleaved, each as a user would run it
(``python -m moerge build recipe out --quiet``, routers uniform so only the tensor work is timed):

* ``dense``: every unit routed as dense experts (the peer);
* ``twin r16 randomized``: ``svd: randomized`` (what ``auto`` picks for these 576 x 1536 linears);
* ``twin r16 exact``: ``svd: exact`` (a full SVD per delta, the behaviour before).

Then, per twin build, each task's dev accuracy with the route forced to its own expert (isolating what the
stored factors keep, not the router) and the relative Frobenius error of the stored factors against the exact
delta, over every linear and expert.

    python bench/twin_svd.py [--n 200] [--reps 1] [--threads 2] [--no-exact] [--write]
    python bench/twin_svd.py --synthetic [--reps 3]   # cost only, where the real experts cannot be made

``--synthetic`` times dense against twin r16 randomized on four stand-in experts written from the converted base
(``moerge.testing.tiny.make_full_expert``: every tensor + Gaussian noise at 1% of its std, seeds 0-3: full rank, same shapes and file layout as the real
full fine-tunes), no accuracy: the cost side of the target without the real experts.  (Their generator trains
under bf16 autocast, about 16x slower than fp32 on a CPU without AVX512-BF16 / AMX; ``tools/get_full_pool.py``
now runs it with ``tools/bf16_emulation.py`` there, about an hour on two cores.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _measure import machine_with_transformers, measure, record

from bench.real.evaluate import TASKS, accuracy, load_tasks, predict

WORK = HERE / "_work" / "twin_svd"
POOL = HERE.parent.parent / "shared" / "pool"
CACHE = Path(os.environ.get("MOERGE_CACHE") or Path.home() / ".cache" / "moerge")
BUILDS = {"dense": {"kind": "dense"}, "twin r16 randomized": {"kind": "twin", "rank": 16, "svd": "randomized"},
          "twin r16 exact": {"kind": "twin", "rank": 16, "svd": "exact"}}


EXPERTS = CACHE / "smollm2-135m-instruct-full"


def synthetic_experts(base: Path, out: Path, scale: float = 0.01) -> Path:
    """Four full-rank stand-ins for the full fine-tunes (:func:`moerge.testing.tiny.make_full_expert`: every tensor
    + seeded noise of ``scale`` x its std), written once."""
    from moerge.testing.tiny import make_full_expert

    for seed, task in enumerate(TASKS):
        if not (out / task / "model.safetensors").is_file():
            make_full_expert(base, out / task, seed, scale)
    return out


def recipe(expert: dict, experts_dir: Path) -> dict:
    experts = [{"name": t, "source": str(experts_dir / t)} for t in TASKS]
    return {"base": str(CACHE / "smollm2-135m-instruct"), "seed": 0, "experts": experts,
            "merge": {"method": "task_arithmetic", "lambda": 1.0},
            "routing": {"select": {"all": True}, "modules": "both", "expert": expert,
                        "router": {"level": "sequence", "init": "uniform", "top_k": 1}}}


def build(label: str, expert: dict, threads: int, experts_dir: Path = EXPERTS) -> float:
    path = WORK / f"{label.replace(' ', '_')}.yaml"
    path.write_text(yaml.safe_dump(recipe(expert, experts_dir), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MOERGE_NO_CACHE": "1"}
    run = measure(label, [sys.executable, "-m", "moerge", "build", str(path), str(path.with_suffix("")), "--force",
                          "--quiet", "--device", "cpu"], env)
    return run.wall_s


def factor_errors(folder: Path, base: Path) -> list[float]:
    """Relative Frobenius error of U V against the exact W_e - W_s, every routed linear and expert (with
    ``fold_norms``, W_e has expert e's norm scale over the merged one folded into its columns, as the build does)."""
    from moerge.arch import family_for
    from moerge.checkpoint import Checkpoint
    from moerge.io.sources import ModelFolder

    family = family_for(json.loads((base / "config.json").read_text()), str(base / "config.json"))
    groups = {module: group for group, (module, _) in family.groups.items()}  # "self_attn" -> "attention"
    ckpt = Checkpoint.open(folder)
    loader = ckpt.loader()
    experts = [ModelFolder(EXPERTS / t) for t in ckpt.manifest.experts]
    folds = bool(yaml.safe_load((folder / "moerge_recipe.yaml").read_text())["routing"].get("fold_norms"))
    errs = []
    for unit, lin, _ in ckpt.manifest.linears():
        w_s = loader.get(f"{unit}.{lin}.weight").float()
        layer, module = family.layer_of(unit), unit.rsplit(".", 1)[-1]
        norm = family.input_norm(layer, groups[module], lin) if layer is not None else None
        for e, model in enumerate(experts):
            w_e = model.get(f"{unit}.{lin}.weight").float()
            if norm is not None and folds:
                off = family.norm_offset  # the norm scales by off + g
                g_s = loader.get(norm).float() + off  # the written merged norm: expert e's own scale is folded in
                w_e = w_e * torch.where(g_s.abs() > 0, (model.get(norm).float() + off) / g_s, 1.0)[None, :]
            delta = w_e - w_s  # (O, I)
            uv = loader.get(f"{unit}.{lin}.experts.{e}.U").float() @ loader.get(f"{unit}.{lin}.experts.{e}.V").float()
            errs.append(float(torch.linalg.matrix_norm(delta - uv) / torch.linalg.matrix_norm(delta)))
    return errs


def forced_accuracy(folder: Path, n: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moerge  # noqa: F401  (registers the model type)

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    for task in load_tasks(POOL, tok, n):
        model.force_route(task.name)
        out[task.name] = accuracy(task, predict(model, tok, task))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="dev prompts per task (0 = all 200)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--synthetic", action="store_true", help="stand-in experts, dense vs twin randomized, cost only")
    ap.add_argument("--no-exact", action="store_true",
                    help="leave out the exact-SVD twin build (the behaviour before; its scoring is a third of the run)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    builds, experts_dir = BUILDS, EXPERTS
    if args.synthetic:
        experts_dir = synthetic_experts(CACHE / "smollm2-135m-instruct", WORK / "synthetic")
    if args.synthetic or args.no_exact:
        builds = {k: v for k, v in BUILDS.items() if k != "twin r16 exact"}
    times: dict[str, list[float]] = {k: [] for k in builds}
    for _ in range(args.reps):
        for label, expert in builds.items():
            times[label].append(build(label, expert, args.threads, experts_dir))
            print(f"{label}: {times[label][-1]:.1f} s", flush=True)
    rows = cost_table(times) if args.synthetic else table(times, args.n or None)
    print("\n".join(rows))
    if args.write:
        cmd = (f"--synthetic --reps {args.reps} --threads {args.threads}" if args.synthetic
               else f"--n {args.n} --reps {args.reps} --threads {args.threads}" + " --no-exact" * args.no_exact)
        record("\n".join([(f"### {time.strftime('%Y-%m-%d %H:%M')} `python bench/twin_svd.py {cmd}`"), "", (f"- machine: "
                          f"{machine_with_transformers(args.threads)}"), "", *rows, ""]),
               "## twin: exact vs randomized SVD on the full fine-tune pool (issue 11)")


def cost_table(times: dict[str, list[float]]) -> list[str]:
    """Stand-in experts: wall per build and its ratio to dense (no accuracy: the experts are noise)."""
    dense = statistics.median(times["dense"])
    rows = ["| build (synthetic experts) | wall s (median) | / dense | wall s per rep |", "|---|---|---|---|"]
    for label, ts in times.items():
        med = statistics.median(ts)
        rows.append(f"| {label} | {med:.1f} | {med / dense:.2f}x | {' / '.join(f'{t:.1f}' for t in ts)} |")
    return rows


def table(times: dict[str, list[float]], n: int | None) -> list[str]:
    dense = statistics.median(times["dense"])
    rows = ["| build | wall s (median) | / dense | imdb | tweets | bbc | arith | factor error (median / max) |",
            "|---|---|---|---|---|---|---|---|"]
    for label, ts in times.items():
        folder = WORK / label.replace(" ", "_")
        acc = forced_accuracy(folder, n or 200)
        err = "-"
        if label != "dense":
            errs = factor_errors(folder, CACHE / "smollm2-135m-instruct")
            err = f"{statistics.median(errs):.4f} / {max(errs):.4f}"
        med = statistics.median(ts)
        rows.append(f"| {label} | {med:.1f} | {med / dense:.2f}x | " + " | ".join(f"{acc[t]:.3f}" for t in TASKS)
                    + f" | {err} |")
        print(json.dumps({"build": label, "acc": acc}), flush=True)
    return rows


if __name__ == "__main__":
    main()
