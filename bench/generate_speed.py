"""Benchmark: greedy generate tokens/s of routed moerge checkpoints vs the dense base and a mergekit-moe Mixtral.

    python bench/generate_speed.py [--reps 4] [--new-tokens 64] [--threads auto] [--kinds dense,twin,...]
                                   [--no-mergekit] [--gate-mode hidden] [--no-record]

Model: the ~110M llama of ``bench/merge_speed.py`` (hidden 768, 12 layers, intermediate 3072, 12 heads, fp32),
4 experts (full fine-tunes ``expert_0..3``; LoRA adapters ``lora_0..3`` for kind ``lora``), every MLP routed,
sequence-level top-1 routing with prototypes calibrated on 32 ``make_task_data`` prompts of 4 tasks
(sentiment, topic, math, code -> expert 0..3); all cached in ``bench/_work`` (see ``routed_models.py``).
mergekit-moe builds a Mixtral (``gate_mode`` hidden by default, experts_per_token 1 and 2) of the same 4 full
experts with 8 positive prompts each, run as its own process.

Reference row "base, moerge kernel": the same dense base with its MLP linears (the routed ones) applied by moerge's
cached-weight kernel (`cached_linear`); the routed rows over this row isolate what routing costs from what the
kernel choice gains.

Prompts: chat-templated ``make_task_data`` prompts (seed 1, not the calibration ones).  Batch 1: one prompt per
rep, rotating over the 4 tasks (every route is timed).  Batch 8: 2 prompts of each task, left-padded, so the
rows take 4 different routes (checked with ``last_routes()`` and recorded).  Every generate is greedy with
exactly ``--new-tokens`` new tokens (``min_new_tokens == max_new_tokens``, EOS unset).  Each model is loaded
next to the base and timed interleaved with it (base, model, base, model, ...) after a warm-up of every
prompt; tokens/s = generated tokens / wall time of ``generate`` (prefill included); the ratio is the median
of the per-rep ratios model/base.  Results go to ``bench/RESULTS.md`` under ``## generate_speed (issue 3)``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import routed_models as rm
from _measure import loadavg, machine_with_transformers, record, venv_exe

RESULTS = HERE / "RESULTS.md"
HEADING = "## generate_speed (issue 3)"
KINDS = tuple(rm.KIND_PARAMS)
GOAL_B1, GOAL_B8 = 0.9, 0.7


# ------------------------------------------------------------------------------------------------ mergekit


def mergekit_build(models: dict, top_k: int, gate_mode: str) -> tuple[Path | None, str]:
    """Cached ``mergekit-moe`` Mixtral of the 4 full experts; (folder or None, note)."""
    import yaml

    exe = venv_exe("mergekit-moe")
    if exe is None:
        return None, "mergekit-moe not found"
    experts = []
    for i, task in enumerate(rm.TASKS):
        rows = [json.loads(line) for line in models["data"][task].read_text().splitlines() if line.strip()]
        experts.append({"source_model": str(models["full"][i]), "positive_prompts": [r["prompt"] for r in rows[:8]]})
    config = {"base_model": str(models["base"]), "gate_mode": gate_mode, "dtype": "float32",
              "experts_per_token": top_k, "experts": experts}
    root = rm.WORK / "mixtral"
    out = root / f"{gate_mode}-top{top_k}"
    stamp = {"base": models["stamp"], "config": config}
    if rm._stamp_ok(out, stamp) and (out / "config.json").is_file():
        return out, (out / ".bench_note").read_text() if (out / ".bench_note").is_file() else ""
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / f"{gate_mode}-top{top_k}.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe, str(cfg), str(out), "--no-cuda", "--quiet", "--device", "cpu"]
    rm._log(f"running {shlex.join(cmd)} ...")
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return None, f"`mergekit-moe` failed (exit {proc.returncode}): " + " / ".join(tail)
    note = f"mergekit-moe {gate_mode} top{top_k} build {wall:.0f} s"
    (out / ".bench_note").write_text(note)
    rm._write_stamp(out, stamp)
    return out, note


def mixtral_check(path: Path, models: dict) -> str:
    """Does mergekit's Mixtral load in this transformers without missing / unexpected keys, and is expert e of a
    layer the MLP of full expert e (the fused gate_up_proj / down_proj layout read right)?"""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    bad = {k: len(v) for k, v in info.items() if v}
    layer = model.model.layers[3].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for e, src in enumerate(models["full"]):
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).model.layers[3].mlp
        with torch.no_grad():
            got = layer.experts(x, torch.full((5, 1), e), torch.ones(5, 1))
            worst = max(worst, (got - ref(x)).abs().max().item())
    kind = type(layer.experts).__name__
    impl = getattr(model.config, "_experts_implementation", None)
    return (f"loads in transformers (missing/unexpected/mismatched keys: {bad or 'none'}); {kind} "
            f"(experts implementation {impl}); layer-3 expert e vs expert_e's MLP: max abs diff {worst:.3g}")


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Result:
    name: str
    load_note: str = ""
    b1: list[float] = field(default_factory=list)  # tokens/s per rep (wall time)
    b8: list[float] = field(default_factory=list)
    base_b1: list[float] = field(default_factory=list)  # the interleaved base runs
    base_b8: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # "b1", "base_b1", ...: tokens per CPU second
    routes: str = ""
    switch_ms: float | None = None  # first batch-1 forward on a new route minus a repeat (effective weights built)
    cache_bytes: int | None = None  # held by the routed linears' caches after the timed runs

    def ratio(self, batch: int, cpu: bool = False) -> float:
        if cpu:
            mine, base = self.cpu.get(f"b{batch}", []), self.cpu.get(f"base_b{batch}", [])
        else:
            mine, base = (self.b1, self.base_b1) if batch == 1 else (self.b8, self.base_b8)
        return statistics.median(a / b for a, b in zip(mine, base)) if mine else float("nan")


def prompts(tok) -> tuple[list[str], list[str]]:
    """(4 single prompts, one per task; 8 batch prompts: 2 per task, tasks interleaved), chat-templated."""
    from moerge.testing.tiny import make_prompt

    per_task = {}
    for t in rm.TASKS:
        rng = random.Random(f"bench-generate:{t}")
        per_task[t] = [make_prompt(t, rng) for _ in range(3)]
    def wrap(p: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)

    singles = [wrap(per_task[t][0]) for t in rm.TASKS]
    batch = [wrap(per_task[t][1 + j]) for j in range(2) for t in rm.TASKS]
    return singles, batch


def generate_s(model, enc: dict, new_tokens: int, pad: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one greedy generate of exactly ``new_tokens`` tokens."""
    import torch

    with torch.inference_mode():
        c0, t0 = time.process_time(), time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] == enc["input_ids"].shape[1] + new_tokens, out.shape
    return wall, cpu


def load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    import moerge  # noqa: F401  (registers model_type moerge)

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    model.eval()
    model.generation_config.eos_token_id = None  # never stop early (min_new_tokens == max_new_tokens anyway)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    note = "" if not bad else "; ".join(f"{k}: {len(v)} (e.g. {sorted(v)[:2]})" for k, v in bad.items())
    return model, note


def load_kernel_reference(path: Path):
    """The dense base with its MLP linears (the ones the routed builds route) applied through moerge's
    `cached_linear`, the kernel of cached effective weights: separates what that kernel gains from what routing
    costs."""
    import torch
    from transformers import AutoModelForCausalLM

    from moerge.modeling.modeling_moerge import cached_linear

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".mlp." in f".{name}.":
            weight = mod.weight.detach()
            mod.forward = lambda x, w=weight, bias=mod.bias: cached_linear(x, w, bias)
    return model, ""


def route_summary(model, enc: dict) -> str:
    """moerge: the top-1 expert of each batch row; Mixtral: distinct top-1 experts over prompt tokens."""
    import torch

    if hasattr(model, "last_routes"):
        r = model.last_routes()
        return "rows -> experts " + "".join(str(int(i)) for i in r.argmax(-1).tolist()) + \
            f" ({len(set(r.argmax(-1).tolist()))} distinct)"
    with torch.inference_mode():
        out = model(**enc, output_router_logits=True)
    logits = getattr(out, "router_logits", None)
    if not logits:
        return ""
    mask = enc["attention_mask"].reshape(-1).bool()
    used = [len(set(lg.reshape(mask.shape[0], -1)[mask].argmax(-1).tolist())) for lg in logits]
    return f"token-level; distinct top-1 experts per layer over the batch's tokens: min {min(used)}, max {max(used)}"


def time_pair(name: str, path: Path, base, tok, singles, batch, args, loader=load) -> Result:
    model, note = loader(path)
    res = Result(name, note)
    pad = tok.pad_token_id
    enc1 = [tok([p], return_tensors="pt", add_special_tokens=False) for p in singles]
    enc8 = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
    if hasattr(model, "clear_route_cache"):  # cost of a route not seen before (batch 1: its effective weights)
        generate_s(model, enc1[0], 1, pad)
        cold = []
        for e in enc1[1:]:
            model.clear_route_cache()
            first = generate_s(model, e, 1, pad)[0]
            cold.append(first - generate_s(model, e, 1, pad)[0])
        res.switch_ms = 1000 * statistics.median(cold)
    for m in (base, model):  # warm-up: every route, both batch sizes
        for e in enc1:
            generate_s(m, e, 4, pad)
        generate_s(m, enc8, 4, pad)
    res.routes = route_summary(model, enc8)
    n = args.new_tokens
    for rep in range(args.reps):
        e1 = enc1[rep % len(enc1)]
        order = [(base, True), (model, False)] if rep % 2 == 0 else [(model, False), (base, True)]
        for size, enc in ((1, e1), (8, enc8)):
            for m, is_base in order:
                wall, cpu = generate_s(m, enc, n, pad)
                key = f"base_b{size}" if is_base else f"b{size}"
                getattr(res, key).append(size * n / wall)
                res.cpu.setdefault(key, []).append(size * n / cpu)
        rm._log(f"  {name:<14} rep {rep + 1}: b1 {res.b1[-1]:6.1f} tok/s (base {res.base_b1[-1]:6.1f}), "
                f"b8 {res.b8[-1]:6.1f} tok/s (base {res.base_b8[-1]:6.1f})  load {loadavg()}")
    res.cache_bytes = cache_bytes(model)
    del model
    return res


def cache_bytes(model) -> int | None:
    """Bytes of the effective weights / deltas / kernel indices cached by the routed linears (moerge only)."""
    return model.route_cache_bytes() if hasattr(model, "route_cache_bytes") else None


# ------------------------------------------------------------------------------------------------ main


def table(results: list[Result], base_label: str) -> str:
    med = statistics.median
    lines = [("| model | b1 tok/s | b1 vs base | (CPU time) | goal >= 0.9x | b8 tok/s | b8 vs base | (CPU time) | "
              "goal >= 0.7x | new route (b1) | route caches | routes (batch 8) |"),
             "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|"]
    all_b1 = [x for r in results for x in r.base_b1]
    all_b8 = [x for r in results for x in r.base_b8]
    if all_b1:
        lines.append(f"| {base_label} | {med(all_b1):.1f} | 1.00 | | | {med(all_b8):.1f} | 1.00 | | | | | |")
    for r in results:
        if not r.b1:
            lines.append(f"| {r.name} | - | - | | | - | - | | | | | {r.load_note} |")
            continue
        switch = "" if r.switch_ms is None else f"+{r.switch_ms:.0f} ms"
        caches = "" if r.cache_bytes is None else f"{r.cache_bytes / 2**20:,.0f} MiB"
        q1, q8 = r.ratio(1), r.ratio(8)
        ok1 = "met" if q1 >= GOAL_B1 else "**missed**"
        ok8 = "met" if q8 >= GOAL_B8 else "**missed**"
        if r.name.startswith("mergekit") or r.name.endswith("(reference)"):
            ok1 = ok8 = "(reference)"
        routes = r.routes + (f"; LOAD WARNING: {r.load_note}" if r.load_note else "")
        lines.append(f"| {r.name} | {med(r.b1):.1f} | {q1:.2f} | {r.ratio(1, True):.2f} | {ok1} | {med(r.b8):.1f} | "
                     f"{q8:.2f} | {r.ratio(8, True):.2f} | {ok8} | {switch} | {caches} | {routes} |")
    ref = next((r for r in results if r.name.endswith("(reference)") and r.b8), None)
    routed = [r for r in results if r.b8 and r.name in KINDS]
    if ref is not None and routed:
        lines += ["", "Routed kinds over the kernel reference (the cost of routing alone), batch 1 / batch 8: " +
                  ", ".join(f"{r.name} {r.ratio(1) / ref.ratio(1):.2f} / {r.ratio(8) / ref.ratio(8):.2f}"
                            for r in routed)]
    return "\n".join(lines)


def runs_table(results: list[Result]) -> str:
    lines = ["| model | rep | b1 tok/s | base b1 | b8 tok/s | base b8 | b1 CPU ratio | b8 CPU ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r.cpu
        for i, (a, b, d, e) in enumerate(zip(r.b1, r.base_b1, r.b8, r.base_b8)):
            lines.append(f"| {r.name} | {i + 1} | {a:.1f} | {b:.1f} | {d:.1f} | {e:.1f} | "
                         f"{c['b1'][i] / c['base_b1'][i]:.2f} | {c['b8'][i] / c['base_b8'][i]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4, help="timed runs per model and batch size (interleaved with base)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", default="auto", help="torch intra-op threads; auto = 2 when the 1-min load < 0.5, else 1")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--gate-mode", default="hidden", choices=["hidden", "cheap_embed", "random"])
    ap.add_argument("--mergekit-k", default="1,2", help="experts_per_token values of the Mixtral builds")
    ap.add_argument("--no-kernel-reference", action="store_true",
                    help="skip the row of the base run through moerge's cached-weight kernel")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    load_start = loadavg()
    threads = rm.auto_threads(args.threads, load_start)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    kinds = [k for k in args.kinds.split(",") if k]

    models = rm.prepare_110m()
    paths: dict[str, Path] = {k: rm.build_routed(models, k) for k in kinds}
    notes: dict[str, str] = {}
    if not args.no_mergekit:
        for k in [int(x) for x in args.mergekit_k.split(",") if x]:
            out, note = mergekit_build(models, k, args.gate_mode)
            name = f"mergekit top{k}"
            notes[name] = note
            if out is not None:
                paths[name] = out
                try:
                    notes[name] += "; " + mixtral_check(out, models)
                except Exception as exc:  # noqa: BLE001 - recorded as the result
                    notes[name] += f"; does NOT load/run in transformers: {type(exc).__name__}: {str(exc)[:300]}"
            rm._log(f"{name}: {note}")
    torch.set_num_threads(threads)  # builds may have changed it

    tok = AutoTokenizer.from_pretrained(models["base"])
    tok.padding_side = "left"
    singles, batch = prompts(tok)
    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None
    rm._log(f"threads {threads}, load {load_start}; timing {len(paths)} models x {args.reps} reps ...")
    results: list[Result] = []
    for name, path in paths.items():
        try:
            results.append(time_pair(name, path, base, tok, singles, batch, args))
        except Exception as exc:  # noqa: BLE001 - recorded as the result (e.g. a checkpoint that does not load)
            rm._log(f"{name}: FAILED {type(exc).__name__}: {exc}")
            results.append(Result(name, f"failed: {type(exc).__name__}: {str(exc)[:300]}"))
    if not args.no_kernel_reference:
        name = "base, moerge kernel (reference)"
        results.append(time_pair(name, Path(models["base"]), base, tok, singles, batch, args, load_kernel_reference))
        notes[name] = ("the dense base with its MLP linears applied by moerge's `cached_linear` (the kernel of "
                       "cached effective weights); routed rows / this row = the cost of routing itself")
    for name, note in notes.items():
        if name not in paths and not any(r.name == name for r in results):
            results.append(Result(name, note))
    load_end = loadavg()
    base_label = f"dense base ({rm.n_params(models['base']) / 1e6:.0f}M, fp32)"
    summary = table(results, base_label)
    print()
    print(summary)
    if not args.no_record:
        cmd = shlex.join(["python", "bench/generate_speed.py", *(argv if argv is not None else sys.argv[1:])])
        entry = "\n".join([
            f"### {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"- machine: {machine_with_transformers(threads)}",
            f"- load average (1/5/15 min) before: {load_start}, after: {load_end}"
            + ("" if threads == 2 else " (machine shared and busy: 1 intra-op thread, see `--threads`)"),
            f"- command: `{cmd}`",
            (f"- model: llama hidden 768, 12 layers, intermediate 3072, 12 heads, fp32; 4 experts, every MLP routed, "
             f"sequence-level top-1, prototypes calibrated on 4 tasks; twin rank 16, sparse density 0.1, "
             f"lora = 4 LoRA adapters (r {rm.LORA['r']}, MLP linears); mergekit-moe: Mixtral of the 4 full experts, "
             f"gate_mode {args.gate_mode}, 8 positive prompts each"),
            (f"- greedy generate, {args.new_tokens} new tokens (min = max), {args.reps} reps per model, interleaved with "
             f"the base; batch 1 rotates over the 4 task prompts, batch 8 = 2 prompts per task (left-padded); "
             f"medians (ratios: median of per-rep ratios to the interleaved base run; \"CPU time\": the same ratio "
             f"from process CPU time, less sensitive to other processes on the machine)"),
            ("- new route (b1): extra wall time of the first batch-1 forward on a route whose effective weights are "
             "not cached yet (`clear_route_cache()`; every routed linear then builds W_s + Δ_e once and keeps it in a "
             "4-route LRU), median over 3 routes; not included in the tok/s (warm-up first); route caches: what the "
             "routed linears hold after the runs (`route_cache_bytes()`: the effective weights of the 4 routes, "
             "used at batch 1 and, for every kind but twin / lora, by the batch-8 groups), on top of the "
             "checkpoint's own tensors"),
            "",
            summary,
            "",
            *[f"- {k}: {v}" for k, v in notes.items() if v],
            "",
            "<details><summary>all runs</summary>",
            "",
            runs_table(results),
            "",
            "</details>",
        ])
        record(entry, HEADING)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
