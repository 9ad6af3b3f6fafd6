"""Benchmark: TIES merge (density 0.5, 3 full experts) of a ~110M-parameter fp32 llama, moerge vs mergekit.

    python bench/merge_speed.py [--reps 2] [--no-record] [--regen]

Generates (once, cached in ``bench/_work/``) a random llama with hidden 768, 12 layers, intermediate 3072,
12 heads and the tiny tokenizer's vocabulary, saved in 200 MB shards, plus three full "fine-tunes" of it.
Then times ``moerge build`` and ``mergekit-yaml`` on the same TIES recipe, each as a child
process, alternating the order (moerge, mergekit, mergekit, moerge, ...).  For every child it records:

* wall time;
* peak anonymous RSS (sum of ``RssAnon`` over the child and its descendants, polled from
  ``/proc/<pid>/status`` every ~20 ms; mmapped checkpoint pages do not count here);
* peak total RSS (max of the kernel's ``VmHWM`` and the polled sum of ``VmRSS``; includes file-backed
  pages of memory-mapped inputs);
* ``ru_maxrss`` from ``os.wait4`` on that child, as a cross-check of the total.

It checks that both outputs hold the same tensors (max abs difference reported), prints a side-by-side
table of medians with moerge/mergekit ratios and appends it, with the machine, date, load and command, to
``bench/RESULTS.md`` under ``## merge_speed (issue 2)``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _measure import (
    Run,
    alternating,
    child_env,
    loadavg,
    machine,
    measure,
    mib,
    n_params,
    record,
    tensor_index,
    venv_exe,
    warm_page_cache,
)

WORK = HERE / "_work"
RESULTS = HERE / "RESULTS.md"
HEADING = "## merge_speed (issue 2)"

MODEL = {"family": "llama", "hidden": 768, "layers": 12, "intermediate": 3072, "heads": 12, "kv_heads": 12,
         "tie": False, "seed": 0, "max_shard_size": "200MB"}
N_EXPERTS = 3
EXPERT_SCALE = 0.02
DENSITY = 0.5
WEIGHTS = (1.0, 0.8, 1.2)
LAMBDA = 1.0


# ------------------------------------------------------------------------------------------------ models


def _stamp() -> dict[str, object]:
    return {"model": MODEL, "experts": N_EXPERTS, "scale": EXPERT_SCALE, "version": 1}


def prepare_models(regen: bool = False) -> tuple[Path, list[Path]]:
    """Base + experts under ``bench/_work`` (rebuilt only when missing, changed or ``regen``)."""
    base, experts = WORK / "base", [WORK / f"expert_{i}" for i in range(N_EXPERTS)]
    stamp_file = WORK / "models.json"
    if not regen and stamp_file.is_file() and json.loads(stamp_file.read_text()) == _stamp() and all(
            (p / "config.json").is_file() for p in [base, *experts]):
        return base, experts
    sys.path.insert(0, str(REPO))
    from moerge.testing.tiny import make_base, make_full_expert

    for p in [base, *experts]:
        shutil.rmtree(p, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"generating the benchmark models in {WORK} ...", flush=True)
    make_base(base, **MODEL)
    for i, e in enumerate(experts):
        make_full_expert(base, e, seed=1 + i, scale=EXPERT_SCALE)
    stamp_file.write_text(json.dumps(_stamp()))
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return base, experts


def moerge_cli() -> list[str]:
    """The ``moerge`` console script of this environment, or ``python -m moerge`` when it is not installed."""
    exe = shutil.which("moerge", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "moerge"]


def write_configs(base: Path, experts: list[Path]) -> tuple[Path, Path]:
    import yaml

    names = [f"e{i}" for i in range(len(experts))]
    recipe = {
        "base": str(base),
        "dtype": "float32",
        "experts": [{"name": n, "source": str(p)} for n, p in zip(names, experts)],
        "merge": {"method": "ties", "density": DENSITY, "lambda": LAMBDA, "weights": dict(zip(names, WEIGHTS))},
        "output": {"shard_size": "1GB"},
    }
    mergekit = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": w, "density": DENSITY}} for p, w in zip(experts, WEIGHTS)],
        "parameters": {"normalize": True, "lambda": LAMBDA},
        "dtype": "float32",
    }
    r, m = WORK / "moerge_recipe.yml", WORK / "mergekit_config.yml"
    r.write_text(yaml.safe_dump(recipe, sort_keys=False))
    m.write_text(yaml.safe_dump(mergekit, sort_keys=False))
    return r, m


# ------------------------------------------------------------------------------------------------ measuring


def compare_outputs(a: Path, b: Path) -> tuple[int, float, int, list[str]]:
    """(tensor count, max abs difference, number of differing entries, problems)."""
    import torch
    from safetensors import safe_open

    ia, ib = tensor_index(a), tensor_index(b)
    problems = []
    if set(ia) != set(ib):
        problems.append(f"tensor names differ: only moerge {sorted(set(ia) - set(ib))[:5]}, "
                        f"only mergekit {sorted(set(ib) - set(ia))[:5]}")
    worst, differing = 0.0, 0
    for name in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[name]), framework="pt") as ha, safe_open(str(ib[name]), framework="pt") as hb:
            ta, tb = ha.get_tensor(name), hb.get_tensor(name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            problems.append(f"{name}: {tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype}")
            continue
        diff = (ta.to(torch.float64) - tb.to(torch.float64)).abs()
        worst, differing = max(worst, diff.max().item()), differing + int(torch.count_nonzero(diff))
    return len(ia), worst, differing, problems


# ------------------------------------------------------------------------------------------------ report


def table(runs: list[Run]) -> str:
    def med(label: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs if r.label == label)

    rows = [("wall time", "wall_s", lambda v: f"{v:.2f} s"),
            ("peak anon RSS", "peak_anon", mib),
            ("peak total RSS", "peak_rss", mib),
            ("ru_maxrss (wait4)", "ru_maxrss", mib)]
    lines = ["| metric (median) | moerge | mergekit | moerge / mergekit |", "|---|---:|---:|---:|"]
    for label, attr, fmt in rows:
        a, b = med("moerge", attr), med("mergekit", attr)
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {a / b:.3f} |" if b else f"| {label} | {fmt(a)} | {fmt(b)} | - |")
    return "\n".join(lines)


def runs_table(runs: list[Run]) -> str:
    lines = ["| # | tool | wall | peak anon | peak total | VmHWM | ru_maxrss | samples |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(runs):
        lines.append(f"| {i + 1} | {r.label} | {r.wall_s:.2f} s | {mib(r.peak_anon)} | {mib(r.peak_rss)} | "
                     f"{mib(r.hwm)} | {mib(r.ru_maxrss)} | {r.samples} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2, help="runs of each tool (alternating order); median reported")
    ap.add_argument("--regen", action="store_true", help="regenerate the cached models")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)

    mergekit_exe = venv_exe("mergekit-yaml")
    if mergekit_exe is None:
        raise SystemExit("mergekit-yaml not found (pip install mergekit==0.1.5)")
    base, experts = prepare_models(args.regen)
    recipe, mk_config = write_configs(base, experts)
    params = n_params(base)
    out_moerge, out_mergekit = WORK / "out_moerge", WORK / "out_mergekit"
    env = child_env()
    cmds = {
        "moerge": [*moerge_cli(), "build", str(recipe), str(out_moerge), "--force", "--quiet"],
        "mergekit": [mergekit_exe, str(mk_config), str(out_mergekit), "--no-cuda", "--quiet"],
    }
    warm_page_cache([base, *experts])  # the first timed run should not pay for cold reads
    load_before = loadavg()
    runs: list[Run] = []
    order = alternating(args.reps, "moerge", "mergekit")
    for tool in order:
        shutil.rmtree(out_moerge if tool == "moerge" else out_mergekit, ignore_errors=True)
        run = measure(tool, cmds[tool], env)
        runs.append(run)
        print(f"{tool:9s} {run.wall_s:7.2f} s  anon {mib(run.peak_anon):>10s}  total {mib(run.peak_rss):>10s}  "
              f"ru_maxrss {mib(run.ru_maxrss):>10s}", flush=True)
    load_after = loadavg()
    n_tensors, max_diff, n_diff, problems = compare_outputs(out_moerge, out_mergekit)
    import resource

    children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    summary = table(runs)
    t_ratio = statistics.median(r.wall_s for r in runs if r.label == "mergekit") / statistics.median(
        r.wall_s for r in runs if r.label == "moerge")
    anon_ok = statistics.median(r.peak_anon for r in runs if r.label == "moerge") <= statistics.median(
        r.peak_anon for r in runs if r.label == "mergekit")
    verdict = (f"moerge is {t_ratio:.2f}x faster than mergekit (goal >= 5x: {'met' if t_ratio >= 5 else 'NOT met'}); "
               f"peak anon RSS {'<=' if anon_ok else '>'} mergekit's (goal <=: {'met' if anon_ok else 'NOT met'})")
    check = (f"outputs: {n_tensors} tensors, same names/shapes/dtypes; max abs difference moerge vs mergekit "
             f"{max_diff:.3g}, {n_diff} of {params} entries differ"
             + (" (equal |task vector| values at the TIES density cut: both keep exactly k entries, mergekit's unstable "
                "argsort and moerge's lowest-index rule keep different ones of the tied values)" if n_diff else "")
             + ("" if not problems else "; PROBLEMS: " + "; ".join(problems)))
    print()
    print(summary)
    print()
    print(verdict)
    print(check)
    print(f"getrusage(RUSAGE_CHILDREN).ru_maxrss over all children: {mib(children_max)}")
    if not args.no_record:
        entry = "\n".join([
            f"### {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"- machine: {machine()}",
            f"- load average (1/5/15 min) before: {load_before}, after: {load_after}",
            f"- command: `{shlex.join(['python', 'bench/merge_speed.py', *(argv if argv is not None else sys.argv[1:])])}`",
            (f"- model: llama hidden {MODEL['hidden']}, {MODEL['layers']} layers, intermediate {MODEL['intermediate']}, "
             f"{MODEL['heads']} heads, {params / 1e6:.1f}M parameters, fp32, {MODEL['max_shard_size']} input shards; "
             f"TIES density {DENSITY}, {N_EXPERTS} full experts, weights {list(WEIGHTS)}, lambda {LAMBDA}"),
            ("- moerge: `moerge build <recipe> <out> --force --quiet` (shard_size 1GB); "
             "mergekit: `mergekit-yaml <config> <out> --no-cuda --quiet` (other options at their defaults)"),
            f"- {args.reps} runs each, alternating order ({', '.join(order)}), page cache warm; medians:",
            "",
            summary,
            "",
            f"- {verdict}",
            f"- {check}",
            "",
            "<details><summary>all runs</summary>",
            "",
            runs_table(runs),
            "",
            "</details>",
        ])
        record(entry, HEADING)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
