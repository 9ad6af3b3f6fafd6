"""Benchmark: a native Mixtral MoE of 3 full experts of a ~0.7B bf16 llama, mergekit-moe vs moerge.

    python bench/moe_build.py [--reps 1] [--no-record] [--regen]

Generates (once, cached in ``bench/_work/moe/``) a random llama with hidden 1536, 24 layers, intermediate 4864,
12 heads / 4 KV heads, the tiny tokenizer's vocabulary, bf16, in 500 MB shards, plus three full "fine-tunes"
of it (every tensor perturbed) and 4 prompts per expert (synthetic sentiment / topic / math prompts).  Then, each
as a child process and at default settings:

* ``mergekit-moe <config> <out>`` with ``gate_mode: hidden`` (router rows from the base's hidden states on the
  prompts), ``experts_per_token: 2``, ``dtype: bfloat16``;
* ``python -m moerge build <recipe> <out>`` with ``output: {format: mixtral}``, token-level routing of every MLP,
  the same prompts as calibration data; everything else at its default (task-arithmetic merge of the attention,
  2 experts per token, router rows measured at each layer's post-attention norm output).

For every child: wall time, peak anonymous RSS (sum of ``RssAnon`` over the child and its descendants, polled
every ~20 ms; page-cache pages of memory-mapped checkpoints do not count), peak total RSS and ``ru_maxrss``
(the measuring code is ``bench/_measure.py``'s).  It checks that both outputs hold the same expert MLP
weights (mergekit's fused ``gate_up_proj`` is split back), prints a table with moerge / mergekit ratios and
appends it to ``bench/RESULTS.md`` under ``## moe_build (issue 5)``.
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
WORK = HERE / "_work" / "moe"
RESULTS = HERE / "RESULTS.md"
HEADING = "## moe_build (issue 5)"
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

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

MODEL = {"family": "llama", "hidden": 1536, "layers": 24, "intermediate": 4864, "heads": 12, "kv_heads": 4,
         "tie": False, "seed": 0, "max_shard_size": "500MB"}
TASKS = ("sentiment", "topic", "math")
N_PROMPTS = 4
EXPERT_SCALE = 0.02
TOP_K = 2


# ------------------------------------------------------------------------------------------------ inputs


def _stamp() -> dict[str, object]:
    return {"model": MODEL, "experts": len(TASKS), "scale": EXPERT_SCALE, "dtype": "bfloat16", "version": 1}


def prepare_models(regen: bool = False) -> tuple[Path, list[Path]]:
    """Base + experts under ``bench/_work/moe`` (rebuilt only when missing, changed or ``regen``)."""
    base, experts = WORK / "base", [WORK / f"expert_{i}" for i in range(len(TASKS))]
    stamp = WORK / "models.json"
    if not regen and stamp.is_file() and json.loads(stamp.read_text()) == _stamp() and all(
            (p / "config.json").is_file() for p in [base, *experts]):
        return base, experts
    import torch

    from moerge.testing.tiny import make_base, make_full_expert

    for p in [base, *experts]:
        shutil.rmtree(p, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"generating the benchmark models in {WORK} ...", flush=True)
    make_base(base, dtype=torch.bfloat16, **MODEL)
    for i, e in enumerate(experts):
        make_full_expert(base, e, seed=1 + i, scale=EXPERT_SCALE)
    stamp.write_text(json.dumps(_stamp()))
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return base, experts


def prompts() -> dict[str, list[str]]:
    import random

    from moerge.testing.tiny import make_prompt

    return {t: [make_prompt(t, random.Random(f"moe_build:{t}:{i}")) for i in range(N_PROMPTS)] for t in TASKS}


def write_configs(base: Path, experts: list[Path]) -> tuple[Path, Path]:
    import yaml

    texts = prompts()
    data = WORK / "data"
    data.mkdir(parents=True, exist_ok=True)
    for t, rows in texts.items():
        (data / f"{t}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    recipe = {
        "base": str(base),
        "experts": [{"name": t, "source": str(p), "calibration": {"data": str(data / f"{t}.jsonl")}}
                    for t, p in zip(TASKS, experts)],
        "routing": {"router": {"level": "token"}},
        "output": {"format": "mixtral", "experts_per_token": TOP_K},
    }
    mergekit = {
        "base_model": str(base),
        "gate_mode": "hidden",
        "dtype": "bfloat16",
        "experts_per_token": TOP_K,
        "experts": [{"source_model": str(p), "positive_prompts": texts[t]} for t, p in zip(TASKS, experts)],
    }
    r, m = WORK / "moerge_recipe.yml", WORK / "mergekit_moe.yml"
    r.write_text(yaml.safe_dump(recipe, sort_keys=False))
    m.write_text(yaml.safe_dump(mergekit, sort_keys=False))
    return r, m


# ------------------------------------------------------------------------------------------------ checks


def compare_experts(ours: Path, theirs: Path, layers: list[int]) -> tuple[int, float, str]:
    """(tensors compared, max abs difference, note) of expert MLP weights: ours per expert (w1 gate, w3 up,
    w2 down), mergekit's fused (E, 2I, C) gate_up_proj and (E, C, I) down_proj."""
    import torch
    from safetensors import safe_open

    io, it = tensor_index(ours), tensor_index(theirs)

    def get(idx: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(idx[name]), framework="pt") as h:
            return h.get_tensor(name)

    fused = "model.layers.0.mlp.experts.gate_up_proj" in it
    n, worst = 0, 0.0
    for i in layers:
        p = f"model.layers.{i}"
        if fused:
            gu, down = get(it, f"{p}.mlp.experts.gate_up_proj"), get(it, f"{p}.mlp.experts.down_proj")
            inter = gu.shape[1] // 2
            ref = {"w1": gu[:, :inter], "w3": gu[:, inter:], "w2": down}
        else:
            ref = {w: torch.stack([get(it, f"{p}.block_sparse_moe.experts.{e}.{w}.weight") for e in range(len(TASKS))])
                   for w in ("w1", "w2", "w3")}
        for w, r in ref.items():
            mine = torch.stack([get(io, f"{p}.block_sparse_moe.experts.{e}.{w}.weight") for e in range(len(TASKS))])
            worst = max(worst, (mine.float() - r.float()).abs().max().item())
            n += len(TASKS)
    note = ("mergekit wrote transformers-v5's fused in-memory layout (`mlp.experts.gate_up_proj`); moerge wrote the "
            "per-expert `block_sparse_moe.experts.{e}.w1/w2/w3` that save_pretrained writes") if fused else \
        "both wrote per-expert tensors"
    return n, worst, note


# ------------------------------------------------------------------------------------------------ report


def table(runs: list[Run]) -> str:
    def med(label: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs if r.label == label)

    rows = [("wall time", "wall_s", lambda v: f"{v:.1f} s"), ("peak anon RSS", "peak_anon", mib),
            ("peak total RSS", "peak_rss", mib), ("ru_maxrss (wait4)", "ru_maxrss", mib)]
    lines = ["| metric (median) | moerge | mergekit-moe | moerge / mergekit-moe | goal |", "|---|---:|---:|---:|---|"]
    goals = {"wall_s": "<= 0.8", "peak_anon": "<= 0.5"}
    for label, attr, fmt in rows:
        a, b = med("moerge", attr), med("mergekit", attr)
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {a / b:.3f} | {goals.get(attr, '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1, help="runs of each tool (alternating order); median reported")
    ap.add_argument("--regen", action="store_true", help="regenerate the cached models")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    exe = venv_exe("mergekit-moe")
    if exe is None:
        raise SystemExit("mergekit-moe not found (pip install mergekit==0.1.5)")
    base, experts = prepare_models(args.regen)
    recipe, mk_config = write_configs(base, experts)
    out_moerge, out_mergekit = WORK / "out_moerge", WORK / "out_mergekit"
    env = child_env()
    cmds = {"moerge": [sys.executable, "-m", "moerge", "build", str(recipe), str(out_moerge), "--force", "--quiet"],
            "mergekit": [exe, str(mk_config), str(out_mergekit), "--quiet"]}
    warm_page_cache([base, *experts])  # the first timed run should not pay for cold reads
    load_before = loadavg()
    order = alternating(args.reps, "moerge", "mergekit")
    runs = []
    for tool in order:
        shutil.rmtree(out_moerge if tool == "moerge" else out_mergekit, ignore_errors=True)
        run = measure(tool, cmds[tool], env)
        runs.append(run)
        print(f"{tool:9s} {run.wall_s:7.1f} s  anon {mib(run.peak_anon):>10s}  total {mib(run.peak_rss):>10s}",
              flush=True)
    load_after = loadavg()
    n, worst, note = compare_experts(out_moerge, out_mergekit, [0, MODEL["layers"] - 1])
    summary = table(runs)
    t = statistics.median(r.wall_s for r in runs if r.label == "moerge") / statistics.median(
        r.wall_s for r in runs if r.label == "mergekit")
    a = statistics.median(r.peak_anon for r in runs if r.label == "moerge") / statistics.median(
        r.peak_anon for r in runs if r.label == "mergekit")
    verdict = (f"time {t:.2f}x mergekit-moe's (goal <= 0.8x: {'met' if t <= 0.8 else 'NOT met'}); peak anon RSS "
               f"{a:.2f}x (goal <= 0.5x: {'met' if a <= 0.5 else 'NOT met'})")
    check = f"expert MLP tensors of layers 0 and {MODEL['layers'] - 1}: {n} compared, max abs difference {worst:.3g}; {note}"
    print("\n" + summary + "\n\n" + verdict + "\n" + check)
    if not args.no_record:
        params = n_params(base)
        entry = "\n".join([
            f"### {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}", "",
            f"- machine: {machine()}",
            f"- load average (1/5/15 min) before: {load_before}, after: {load_after}",
            f"- command: `{shlex.join(['python', 'bench/moe_build.py', *(argv if argv is not None else sys.argv[1:])])}`",
            (f"- model: llama hidden {MODEL['hidden']}, {MODEL['layers']} layers, intermediate {MODEL['intermediate']}, "
             f"{MODEL['heads']} heads / {MODEL['kv_heads']} KV heads, {params / 1e9:.2f}B parameters, bf16, "
             f"{MODEL['max_shard_size']} shards; {len(TASKS)} full experts (every tensor perturbed), "
             f"{N_PROMPTS} prompts each; output: Mixtral, {len(TASKS)} experts, top-{TOP_K}"),
            ("- mergekit-moe: `mergekit-moe <config> <out> --quiet` (gate_mode hidden, dtype bfloat16); moerge: "
             "`python -m moerge build <recipe> <out> --force --quiet` (output.format mixtral, token routing, defaults "
             "otherwise: attention = task-arithmetic merge, routers from the calibration prompts, 1GB shards)"),
            f"- {args.reps} run(s) each ({', '.join(order)}), page cache warm; medians:", "",
            summary, "", f"- {verdict}", f"- {check}",
        ])
        record(entry, HEADING)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
