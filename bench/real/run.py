"""The real-pool benchmark: every method on the dev splits -> ``bench/RESULTS.md`` table + accuracy/storage PNG.

    python -m bench.real.run [--pool lora|full] [--quick] [--only KEY ...] [--fresh] [--threads 1] [--jobs N]
                             [--no-record] [--table-only]

``--pool full``: the four full fine-tune experts (``tools/get_full_pool.py``, made once into the moerge cache;
issue 15) and their methods (:mod:`.full`): static merges, mergekit, and moerge at storage budgets (the
activation-based allocation against weight-metric selections and a uniform twin rank of the same bytes); its
results go to their own sections of ``bench/RESULTS.md`` and ``bench/real/full_accuracy_vs_storage.png``, its
cache to ``bench/_work/real_full/``.  The LoRA pool (``--pool lora``) is the default.

``--quick``: base, oracle, two static merges, the shipped recipe and one routed grid row, on the first 50 dev
prompts per task (about 7 minutes on an idle 2-core CPU).  The full run: every method; the reference, static
and peer rows and ``recipes/real_pool.yaml`` on the first ``--n`` dev prompts per task (100; ``--n 0``: all
200; PEFT Arrow, evaluated in fp32, on at most 50), the moerge grid (kind x selection x router) on
``--screen`` prompts (20), then its best builds again on ``--n``.  Built checkpoints, evaluation results and
per-(prompt, route) predictions are cached under ``bench/_work/real/`` (``$MOERGE_BENCH_WORK``); ``--fresh``
re-evaluates (builds are reused while their recipe is unchanged); ``--table-only`` writes the table from whatever
is cached.  ``--jobs N`` (default 2 for ``--pool full``, 1 for the LoRA pool): every row's build and accuracy run
in N worker processes of one torch thread each (the rows of one build in the same worker); the tokens/s rows are
then measured alone, in the main process.  The results go to ``bench/RESULTS.md`` under ``## real benchmark (issue 6)`` (only that section is
rewritten) and to ``bench/real/accuracy_vs_storage.png``.

Per method: accuracy per task, mean normalized accuracy (accuracy / the expert's own accuracy on the same
prompts, averaged over tasks), routing accuracy (moerge: share of dev prompts the router sends to their task's
expert), storage (checkpoint bytes / base bytes at the same dtype), build / calibration / evaluation time,
and generation speed at batch 1 and 8 (tokens/s, and the ratio to the dense base timed alternately with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/real/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.real"

import torch

from bench._measure import cpu_model

from . import evaluate as ev
from .full import WORK_FULL, full_methods
from .methods import Env, Loaded, Method, Skipped, all_methods, calibrate_available

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "RESULTS.md"
PNG = REPO / "bench" / "real" / "accuracy_vs_storage.png"
HEADING = "## real benchmark (issue 6)"
QUICK_HEADING = "## real benchmark, quick mode (issue 6)"
ALL_HEADING = "## real benchmark, all 200 dev prompts per task (issue 6)"
FULL_N = 100  # dev prompts per task in the full run's main table (the first of each split; --n 0: all 200)
EVAL_VERSION = 3
SPEED_PROMPT_TASK = "arith"
GOALS = {"norm": 0.98, "routing": 0.97, "storage": 1.3, "speed": 0.9}
FULL_GOALS = {"norm": 0.98, "routing": 0.98, "storage": 1.05, "speed": 0.9}  # issue 15's shipped-recipe targets
HEADINGS = {  # pool -> (main, quick, all 200) sections of bench/RESULTS.md
    "lora": (HEADING, QUICK_HEADING, ALL_HEADING),
    "full": ("## full pool: benchmark run (issue 15)", "## full pool: quick run (issue 15)",
             "## full pool: all 200 dev prompts per task (issue 15)"),
}
PNGS = {"lora": PNG, "full": PNG.with_name("full_accuracy_vs_storage.png")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- one method

class Runner:
    def __init__(self, env: Env, n: int | None, fresh: bool, speed: bool) -> None:
        from transformers import AutoTokenizer

        self.env, self.n, self.fresh, self.speed = env, n, fresh, speed
        self.table_only = False
        self.tok = AutoTokenizer.from_pretrained(env.base)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tasks = ev.load_tasks(env.pool, self.tok, n)
        self._base: Any = None
        self.speed_prompt = ev.load_tasks(env.pool, self.tok, 1)[ev.TASKS.index(SPEED_PROMPT_TASK)].prompts[0]

    def capped(self, n: int) -> Runner:
        """The same runner on the first ``n`` prompts per task (shares the loaded base model)."""
        other = Runner.__new__(Runner)
        other.__dict__.update(self.__dict__)
        other.n, other.tasks = n, [ev.Task(t.name, t.prompts[:n], t.answers[:n], t.labels, t.label_ids)
                                   for t in self.tasks]
        return other

    @property
    def base(self) -> Any:
        if self._base is None:
            from .methods import load_base

            self._base = load_base(self.env)
        return self._base

    def cache_file(self, m: Method) -> Path:
        return self.env.work / "results" / f"{m.key}-n{self.n or 'all'}.json"

    def stamp(self, m: Method) -> dict:
        return {"params": m.params, "n": self.n, "v": EVAL_VERSION, "cal": calibrate_available()}

    def row(self, m: Method) -> dict:
        if m.max_n and (self.n is None or self.n > m.max_n):
            return Runner.capped(self, m.max_n).row(m)
        path = self.cache_file(m)
        cached = None
        if not self.fresh and path.is_file():
            data = json.loads(path.read_text())
            if data.get("stamp") == json.loads(json.dumps(self.stamp(m))) and data["row"]["status"] != "error":
                cached = data["row"]
        if cached is not None and (cached["status"] != "ok" or not self.wants_speed(m) or "tps1" in cached
                                   or self.table_only):
            log(f"{m.key}: cached")
            return cached
        if self.table_only:
            return {"key": m.key, "label": m.label, "group": m.group, "status": "not run", "note": "no cached result"}
        row = cached or {"key": m.key, "label": m.label, "group": m.group, "n": self.n, "dense": m.dense}
        t0 = time.perf_counter()
        try:
            loaded = m.load(self.env)
            if cached is None:
                row.update(self.measure(loaded))
            if self.wants_speed(m):
                row.update(self.speeds(loaded))
            row["status"] = "ok"
        except Skipped as exc:
            row.update(status="skipped", note=str(exc))
        except Exception as exc:  # noqa: BLE001 - one method failing must not stop the benchmark
            traceback.print_exc()
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        row["wall_s"] = row.get("wall_s", 0.0) + time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"stamp": self.stamp(m), "row": row}, indent=1) + "\n")
        log(f"{m.key}: {row['status']} in {time.perf_counter() - t0:.0f}s {row.get('acc', '')} {row.get('note', '')}")
        return row

    def wants_speed(self, m: Method) -> bool:
        return self.speed and not m.dense

    def measure(self, loaded: Loaded) -> dict:
        out: dict[str, Any] = {"storage": loaded.storage, "build_s": loaded.build_s, "calib_s": loaded.calib_s,
                               "note": loaded.note}
        t = time.perf_counter()
        routing = None
        if loaded.routed:
            preds, out["routes"], routing, out["route_check"] = self.routed_predictions(loaded)
        else:
            preds = {task.name: ev.predict(loaded.model_for(task.name), self.tok, task, amp=loaded.amp)
                     for task in self.tasks}
        out["eval_s"] = time.perf_counter() - t
        out["correct"] = {task.name: [int(ev.correct(task, i, preds[task.name][i])) for i in range(len(task))]
                          for task in self.tasks}
        out["acc"] = {task.name: ev.accuracy(task, preds[task.name]) for task in self.tasks}
        out["routing"] = routing
        return out

    def routed_predictions(self, loaded: Loaded) -> tuple[dict, dict, float, str]:
        """Per task: predictions and routes of a sequence-routed model; its routing accuracy (top expert ==
        the prompt's task); a check that the model's own unforced forward gives the same predictions."""
        model = loaded.model_for("")
        cache_path = self.env.work / "preds" / f"{loaded.extra['build_key']}.json"
        disk = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        preds, routes, hits = {}, {}, 0
        for e, task in enumerate(self.tasks):
            r = ev.routes_of(model, self.tok, task.prompts)
            routes[task.name] = [max(range(len(x)), key=x.__getitem__) for x in r]  # top expert per prompt
            routes[task.name + ":mixed"] = sum(sorted(x)[-2] > 0 for x in r)  # rows on a soft (fallback) route
            hits += sum(x == e for x in routes[task.name])
            preds[task.name] = ev.predict_routed(model, self.tok, task, r, disk.setdefault(task.name, {}))
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(disk) + "\n")
        total = sum(len(t) for t in self.tasks)
        return preds, routes, hits / total, self.route_check(model, disk)

    def route_check(self, model: Any, disk: dict) -> str:
        """The model's own routing (no force) on 4 prompts of each classification task agrees with the
        per-route predictions used for the table."""
        same = n = 0
        for task in self.tasks:
            if not task.labels:
                continue
            idx = list(range(min(4, len(task))))
            natural = ev.predict(model, self.tok, task, idx)
            routes = ev.routes_of(model, self.tok, [task.prompts[i] for i in idx])
            keys = [ev.route_key(r, model.expert_names) for r in routes]
            same += sum(natural[i] == disk[task.name].get(f"{i}|{keys[j]}") for j, i in enumerate(idx))
            n += len(idx)
        return f"{same}/{n}"

    def speeds(self, loaded: Loaded) -> dict:
        model = loaded.model_for(SPEED_PROMPT_TASK)
        out = {}
        for batch, new_tokens in ((1, 32), (8, 16)):
            tps, ratio = ev.speed_vs(model, self.base, self.tok, self.speed_prompt, batch, reps=2,
                                     new_tokens=new_tokens)
            out[f"tps{batch}"], out[f"speed{batch}"] = tps, ratio
        return out


# ---------------------------------------------------------------------------------------------------- parallel rows

@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to rebuild the parent's runner (methods travel by key: they hold closures)."""
    pool: str
    env: Env
    n: int | None
    fresh: bool


_WORKER_RUNNERS: dict[tuple, Runner] = {}  # per worker process: one runner per (n, fresh), built on first use


def _worker_rows(spec: WorkerSpec, keys: list[str]) -> list[dict]:
    """In a worker process (one torch thread): the rows of ``keys``, in order, without tokens/s."""
    torch.set_num_threads(1)
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    runner = _WORKER_RUNNERS.get((spec.n, spec.fresh))
    if runner is None:
        runner = _WORKER_RUNNERS[(spec.n, spec.fresh)] = Runner(spec.env, spec.n, spec.fresh, False)
    methods = {m.key: m for m in (all_methods() if spec.pool == "lora" else full_methods())}
    return [runner.row(methods[k]) for k in keys]


def worker_groups(keys: list[str]) -> list[list[str]]:
    """Method keys -> one group per build (``K`` and ``K-cal`` share a folder), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.removesuffix("-cal"), []).append(k)
    return list(groups.values())


def run_rows(runner: Runner, methods: list[Method], jobs: int, pool: str) -> list[dict]:
    """The rows of ``methods``, in their order.  With ``jobs`` > 1 every row's build and accuracy run in ``jobs``
    worker processes of one torch thread each (the rows of one build, its prototype and calibrated routers, in the
    same worker: they share its folder and per-(prompt, route) predictions); the tokens/s of the rows that have
    them are then measured here, alone (from the workers' cached rows), not beside another job."""
    if jobs <= 1 or runner.table_only:
        return [runner.row(m) for m in methods]
    alone = [m for m in methods if runner.wants_speed(m)]  # accuracy in a worker (unless --fresh), speeds here
    groups = worker_groups([m.key for m in methods if m not in alone or not runner.fresh])
    spec = WorkerSpec(pool, dataclasses.replace(runner.env, threads=1), runner.n, runner.fresh)
    done: dict[str, dict] = {}
    if groups:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as workers:
            futures = [workers.submit(_worker_rows, spec, keys) for keys in groups]
            done.update((r["key"], r) for f in futures for r in f.result())
    done.update((m.key, runner.row(m)) for m in alone)
    return [done[m.key] for m in methods]


# ---------------------------------------------------------------------------------------------------- table

def normalize(rows: list[dict], oracle: dict | None = None) -> None:
    """``norm`` per task = accuracy / the oracle's accuracy on the same prompts; ``mean_norm`` their mean."""
    oracle = oracle or next((r for r in rows if r["key"] == "oracle" and r["status"] == "ok"), None)
    if oracle is None:
        return
    for r in rows:
        if r["status"] != "ok":
            continue
        r["norm"] = {}
        for t in ev.TASKS:
            k = len(r["correct"][t])
            ref = sum(oracle["correct"][t][:k]) / k
            r["norm"][t] = r["acc"][t] / ref if ref else float("nan")
        defined = [v for v in r["norm"].values() if not math.isnan(v)]  # tasks where the oracle scores 0: left out
        r["mean_norm"] = sum(defined) / len(defined) if defined else float("nan")


def copy_dense_speed(rows: list[dict]) -> None:
    """Rows that are plain dense models of the base's shape generate at the base's speed."""
    base = next((r for r in rows if r["key"] == "base" and r["status"] == "ok" and "tps1" in r), None)
    for r in rows:
        if base and r["status"] == "ok" and "tps1" not in r and r.get("dense"):
            r.update(tps1=base["tps1"], speed1=1.0, tps8=base["tps8"], speed8=1.0)
            r["note"] = (r.get("note") + "; " if r.get("note") else "") + "dense like the base: its speed"


def finalists(grid: list[dict], n_fit: int = 3) -> list[str]:
    """Builds to re-run on every dev prompt: the best ``n_fit`` within the storage goal and the best overall
    (by mean normalized accuracy on the screening prompts); both routers of each build."""
    ok = sorted((r for r in grid if r["status"] == "ok" and "mean_norm" in r and not r["key"].startswith("mixed")),
                key=lambda r: -r["mean_norm"])  # (the mixed row's LoRA experts are not the oracle's: not a finalist)
    builds: list[str] = []
    for r in [r for r in ok if r["storage"] <= GOALS["storage"] + 1e-9] + ok[:1]:
        b = r["key"].removesuffix("-cal")
        if b not in builds and (len(builds) < n_fit or r is ok[0]):
            builds.append(b)
    return [k for b in builds for k in (b, b + "-cal")]


def best_moerge(rows: list[dict]) -> dict | None:
    """Highest mean normalized accuracy among moerge rows within the storage goal (else among all)."""
    ok = [r for r in rows if r["group"] == "moerge" and r["status"] == "ok" and "mean_norm" in r]
    fit = [r for r in ok if r["storage"] is not None and r["storage"] <= GOALS["storage"] + 1e-9]
    pool = fit or ok
    return max(pool, key=lambda r: (round(r["mean_norm"], 4), r.get("routing") or 0)) if pool else None


def _f(x: Any, fmt: str = ".3f", empty: str = "") -> str:
    return empty if x is None else format(x, fmt)


def table(rows: list[dict]) -> list[str]:
    head = ["method", "n", *ev.TASKS, "mean norm", "routing", "storage", "build s", "calib s", "eval s",
            "tok/s b1", "b1 / base", "tok/s b8", "b8 / base", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | " + " | ".join([""] * (len(head) - 2)) + f" | {r['status']}: "
                         f"{r.get('note', '')} |")
            continue
        note = r.get("note", "")
        mixed = sum((r.get("routes") or {}).get(f"{t}:mixed", 0) for t in ev.TASKS)
        if mixed:
            note += f"; {mixed} prompts on a soft (fallback) route"
        if r.get("route_check"):
            note += f"; unforced == forced on {r['route_check']}"
        cells = [r["label"], str(len(r["correct"][ev.TASKS[0]])), *[_f(r["acc"][t]) for t in ev.TASKS], _f(r.get("mean_norm")),
                 _f(r.get("routing"), empty="-"), _f(r["storage"], ".3f") + "x" if r["storage"] else "",
                 _f(r.get("build_s"), ".0f"), _f(r.get("calib_s"), ".0f", "-"), _f(r.get("eval_s"), ".0f"),
                 _f(r.get("tps1"), ".1f"), _f(r.get("speed1"), ".2f"), _f(r.get("tps8"), ".1f"),
                 _f(r.get("speed8"), ".2f"), note]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goals(rows: list[dict]) -> list[str]:
    recipe = next((r for r in rows if r["key"].startswith("recipe") and r["status"] == "ok"), None)
    best = recipe or best_moerge(rows)
    if best is None:
        return ["No moerge row finished."]
    peers = [r for r in rows if r["group"] in ("peer", "static") and r["status"] == "ok" and "mean_norm" in r]
    top_peer = max(peers, key=lambda r: r["mean_norm"]) if peers else None
    checks = [
        ("mean normalized accuracy", f">= {GOALS['norm']}", best["mean_norm"], best["mean_norm"] >= GOALS["norm"],
         best["mean_norm"] - GOALS["norm"]),
        ("routing accuracy (dev, held out)", f">= {GOALS['routing']}", best.get("routing"),
         (best.get("routing") or 0) >= GOALS["routing"], (best.get("routing") or 0) - GOALS["routing"]),
        ("storage / dense base", f"<= {GOALS['storage']}x", best["storage"], best["storage"] <= GOALS["storage"],
         GOALS["storage"] - best["storage"]),
        ("tokens/s at batch 1 / base", f">= {GOALS['speed']}", best.get("speed1"),
         best.get("speed1") is not None and best["speed1"] >= GOALS["speed"],
         (best.get("speed1") or 0) - GOALS["speed"]),
    ]
    if top_peer:
        checks.append((f"above every peer and static merge (best: {top_peer['label']})", f"> {top_peer['mean_norm']:.3f}",
                       best["mean_norm"], best["mean_norm"] > top_peer["mean_norm"],
                       best["mean_norm"] - top_peer["mean_norm"]))
    top = best_moerge(rows)
    lines = [f"Goals, for the shipped recipe **{best['label']}**" if recipe else
             f"Goals, for the best moerge row **{best['label']}**",
             "" if top is None or top is best else
             f"(best moerge row within {GOALS['storage']}x storage: {top['label']}, mean norm {top['mean_norm']:.3f})",
             "", "| goal | target | value | met | margin |", "|---|---|---|---|---|"]
    for name, target, value, met, margin in checks:
        lines.append(f"| {name} | {target} | {_f(value)} | {'yes' if met else 'NO'} | {margin:+.3f} |")
    return lines + ["", *confusion(best)]


def confusion(row: dict) -> list[str]:
    """Where the row's router sends each task's dev prompts (top expert)."""
    routes = row.get("routes")
    if not routes:
        return []
    lines = [f"Routing of {row['key']} (rows: the prompt's task, columns: top expert):", "",
             "| task | " + " | ".join(ev.TASKS) + " |", "|---|" + "---|" * len(ev.TASKS)]
    for t in ev.TASKS:
        lines.append(f"| {t} | " + " | ".join(str(routes[t].count(e)) for e in range(len(ev.TASKS))) + " |")
    return lines


def machine() -> str:
    cpu = cpu_model(platform.processor() or "cpu")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    import peft
    import transformers
    from bf16_emulation import note as bf16_note  # tools/ is on the path (evaluate)

    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}; {bf16_note()}; load average at the end {', '.join(f'{x:.2f}' for x in load)}")


METHOD_NOTES = (
    "Pool: SmolLM2-135M-Instruct (fp32, from `tools/get_base_model.py`) and the LoRA experts imdb, tweets, bbc, "
    "arith of `shared/pool`. Scoring as `shared/REAL_DATA.md`: bf16 autocast on fp32 weights, left padding, "
    "classification = argmax over the label words' first tokens, arith = exact match of greedy generation "
    "(<= 8 new tokens). **mean norm** = mean over tasks of accuracy / the expert's own accuracy on the same "
    "prompts. **routing** = share of dev prompts whose top route is their task's expert (dev prompts are held "
    "out from the calib prompts the routers were built or calibrated from). **storage** = checkpoint bytes / "
    "base bytes at the same dtype (fp32). **tok/s** = generated tokens per CPU second of one torch thread in "
    "fp32 (greedy, 32 new tokens at batch 1, 16 at batch 8, after the first arith dev prompt, prefill "
    "included; best of 2), and `/ base` = ratio to the dense base timed alternately with it; CPU time "
    "rather than wall time because the machine is shared. moerge routed rows: units not routed are merged "
    "by task arithmetic (lambda 1); routed units keep the base as their shared weight and store each "
    "expert's delta in the row's kind; one sequence-level top-1 router reads the first routed unit's input; "
    "`prototype` = the training-free router `moerge build` initialises from the calib prompts, "
    "`calibrated` = after `moerge calibrate --method supervised --holdout 0.2` on the same calib prompts "
    "(64 per task). A sequence-routed model's output for a prompt depends only on the prompt and its route, "
    "so its accuracy is computed per (prompt, route) under `force_route`; the notes show the check against "
    "the model's own unforced forward (`unforced == forced`)."
)


def heading(args: argparse.Namespace) -> str:
    main, quick, every = HEADINGS[args.pool]
    return quick if args.quick else every if args.n == 0 else main


def rows_minutes(rows: list[dict]) -> float:
    """The rows' own wall times added up (what a run without cached rows takes), in minutes."""
    return sum(r.get("wall_s", 0.0) for r in rows) / 60


def section(rows: list[dict], grid: list[dict], args: argparse.Namespace, wall: float, n_main: int,
            n_grid: int) -> str:
    jobs = getattr(args, "jobs", None) or 1
    cmd = "python -m bench.real.run" + (" --pool full" if args.pool == "full" else "") + \
        (" --quick" if args.quick else "") + (" --only " + " ".join(args.only) if args.only else "") + \
        "".join(f" --{k} {v}" for k, v in (("n", args.n), ("screen", None if args.quick else args.screen),
                                            ("threads", args.threads),
                                            ("jobs", jobs if jobs > 1 else None))
                if v is not None)
    lines = [heading(args), "",
             (f"Command: `{cmd}` ({'quick' if args.quick else 'full'} mode), run on "
              f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {wall / 60:.1f} min wall "
              f"(rows cached from an earlier run keep the times measured then; the rows' own wall times add up to "
              f"{rows_minutes(rows + grid):.1f} min)."),
             f"Machine: {machine()}; {args.threads} torch threads for evaluation"
             + (f", rows' builds and accuracy in {jobs} worker processes of 1 thread each, tokens/s alone after them"
                if jobs > 1
                else ", shared with other jobs") + ".", "",
             METHOD_NOTES if args.pool == "lora" else FULL_NOTES, ""]
    lines += goals(rows) + ["", f"### Main table ({n_main} dev prompts per task)", "", *table(rows), ""]
    if grid:
        lines += [f"### moerge grid: kind x selection x router ({n_grid} dev prompts per task)", "",
                  ("Every routed kind and selection; the best builds (3 within 1.3x storage, and the best overall) "
                   f"are re-run on the main table's {n_main} prompts per task. Speeds are not measured here."), "",
                  *table(grid), ""]
    if not args.quick:
        lines += [f"![accuracy vs storage](real/{PNGS[args.pool].name})", ""]
    return "\n".join(lines)


def write_section(text: str, heading: str = HEADING) -> None:
    old = RESULTS.read_text() if RESULTS.is_file() else "# Benchmarks\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(heading))
        new = old[:start] + text + (old[nxt + 1:] if nxt >= 0 else "")
    RESULTS.write_text(new.rstrip("\n") + "\n")


def plot(rows: list[dict], grid: list[dict], n_main: int, n_grid: int, pool: str = "lora") -> None:
    """Mean normalized accuracy vs storage: main-table rows filled, the moerge grid (screening prompts) hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ok(r: dict) -> bool:
        return r["status"] == "ok" and bool(r.get("storage")) and "mean_norm" in r

    colors = {"reference": "black", "static": "tab:blue", "peer": "tab:orange", "moerge": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 6))
    for group, color in colors.items():
        pts = [r for r in rows if r["group"] == group and ok(r)]
        ax.scatter([r["storage"] for r in pts], [r["mean_norm"] for r in pts], c=color, s=30, alpha=0.85,
                   label=group, marker="^" if group == "moerge" else "o")
    shown = {r["key"] for r in rows}
    pts = [g for g in grid if ok(g) and g["key"] not in shown]
    if pts:
        ax.scatter([r["storage"] for r in pts], [r["mean_norm"] for r in pts], facecolors="none",
                   edgecolors="tab:green", s=30, marker="^", label=f"moerge grid (screen, {n_grid} prompts/task)")
    for r in rows:
        if ok(r) and (r["group"] != "moerge" or r["key"].startswith("recipe")):
            ax.annotate(r["key"], (r["storage"], r["mean_norm"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(GOALS["norm"], ls="--", c="grey", lw=0.8)
    ax.axvline(GOALS["storage"], ls="--", c="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("storage / dense base (log)")
    ax.set_ylabel("mean normalized accuracy (method / expert)")
    ax.set_title(f"real pool (SmolLM2-135M, 4 {'full fine-tune' if pool == 'full' else 'LoRA'} experts): "
                 "accuracy vs storage\n"
                 f"filled: main table, {n_main} dev prompts/task (Arrow: its own cap); hollow: grid", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = PNGS[pool]
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


FULL_NOTES = METHOD_NOTES.replace(
    "and the LoRA experts imdb, tweets, bbc, arith of `shared/pool`",
    "and the full fine-tune experts imdb, tweets, bbc, arith (`shared/pool/full/make_full_experts.py`, cached by "
    "`tools/get_full_pool.py`)").replace(
    "routed units keep the base as their shared weight and store each expert's delta in the row's kind",
    "routed units keep the task-arithmetic merge as their shared weight and store each expert's delta in the row's "
    "kind (allocation rows: per unit the kind and per expert the rank chosen from calibration activations; each "
    "expert's routed q/k/v and gate/up absorb its own input norm's scale)") + (
    " **storage** targets here are the issue's: <= 1.05x (same dtype) for the shipped recipe.")


def make_env(args: argparse.Namespace, base: Path) -> Env:
    """The pool's environment: the LoRA experts, or the full fine-tunes from tools/get_full_pool.py."""
    if args.pool == "lora":
        return Env(pool=args.pool_dir, base=base, threads=args.threads)
    from get_full_pool import get_full_pool

    return Env(pool=args.pool_dir, base=base, threads=args.threads, work=WORK_FULL,
               full=get_full_pool(args.pool_dir))


# ---------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer methods, 50 dev prompts per task")
    ap.add_argument("--n", type=int, default=None, help="dev prompts per task in the main table, 0 = all 200 "
                    "(default: 50 quick, all 200 full)")
    ap.add_argument("--screen", type=int, default=20, help="dev prompts per task for the moerge grid (full mode)")
    ap.add_argument("--only", nargs="*", help="method keys (prefix match) to run")
    ap.add_argument("--fresh", action="store_true", help="ignore cached evaluation results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (one torch thread each) for the rows' "
                    "builds and accuracy; tokens/s are measured alone after them (default: 2 for --pool full, "
                    "as timed for issue 15's 60 minutes; 1 for the LoRA pool)")
    ap.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurements")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md and the PNG")
    ap.add_argument("--table-only", action="store_true", help="run nothing: the table from cached results")
    ap.add_argument("--pool", choices=("lora", "full"), default="lora", help="the LoRA experts of shared/pool, or "
                    "the full fine-tunes (tools/get_full_pool.py; issue 15)")
    ap.add_argument("--pool-dir", type=Path, default=REPO.parent / "shared" / "pool", help="the real pool folder")
    args = ap.parse_args(argv)
    if args.jobs is None:
        args.jobs = 2 if args.pool == "full" else 1
    torch.set_num_threads(args.threads)
    for var, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(var, value)  # local files only (peft otherwise looks the base's name up online)
    sys.path.insert(0, str(REPO / "tools"))
    from get_base_model import get_base_model

    if not (args.pool_dir / "experts").is_dir():
        raise SystemExit(f"error: the real pool is not at {args.pool_dir} (pass --pool-dir)")
    env = make_env(args, get_base_model())
    methods = all_methods() if args.pool == "lora" else full_methods()
    if args.only:  # the named methods (quick or not) plus the references
        methods = [m for m in methods if any(m.key.startswith(p) for p in args.only) or m.key in ("base", "oracle")]
    else:
        methods = [m for m in methods if m.default and (m.quick or not args.quick)]
    if args.pool == "full":
        GOALS.update(FULL_GOALS)
    t0 = time.perf_counter()
    speed = not args.no_speed
    if args.quick:  # one stage: every quick method on 50 prompts per task
        n = args.n or 50
        log(f"quick: {len(methods)} methods, {n} dev prompts per task, {args.threads} threads, work {env.work}")
        runner = Runner(env, n, args.fresh, speed)
        runner.table_only = args.table_only
        rows, grid = run_rows(runner, methods, args.jobs, args.pool), []
        normalize(rows)
    else:  # the moerge grid on --screen prompts, then the main table (finalists included) on --n prompts
        n = FULL_N if args.n is None else (args.n or None)  # None: every dev prompt
        main_methods = [m for m in methods if m.group != "moerge" or m.key.startswith("recipe")]
        grid_methods = [m for m in methods if m not in main_methods]
        log(f"full: {len(main_methods)} methods + a {len(grid_methods)}-row moerge grid, {args.threads} threads")
        runner = Runner(env, n, args.fresh, speed)
        runner.table_only = args.table_only
        rows = run_rows(runner, main_methods, args.jobs, args.pool)
        screen = Runner(env, args.screen, args.fresh, False)
        screen.table_only = args.table_only
        grid = run_rows(screen, grid_methods, args.jobs, args.pool)
        oracle = next((r for r in rows if r["key"] == "oracle"), None)
        normalize(grid, oracle)
        keep = finalists(grid)
        log(f"finalists: {', '.join(keep)}")
        runner.speed = speed and args.pool == "lora"  # full pool: tokens/s of the recipe row (and peers) only
        rows += run_rows(runner, [m for m in grid_methods if m.key in keep], args.jobs, args.pool)
        normalize(rows)
    copy_dense_speed(rows)
    wall = time.perf_counter() - t0
    text = section(rows, grid, args, wall, n or 200, args.screen)
    log(f"sum of the per-row wall times (what a run without cached rows takes): "
        f"{rows_minutes(rows + grid):.1f} min")
    print(text)
    if not args.no_record:
        write_section(text, heading(args))
        if not args.quick:
            plot(rows, grid, n or 200, args.screen, args.pool)
        log(f"wrote {RESULTS}" + ("" if args.quick else f" and {PNGS[args.pool]}"))
    log(f"done in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
