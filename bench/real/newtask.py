"""New tasks on a built model, leave-one-out on the real pool (issue 14) -> ``bench/RESULTS.md``.

    python -m bench.real.newtask --pool lora|full [--recipe RECIPE] [--n 200] [--tasks imdb ...]
                                 [--phases add,compose] [--threads 2] [--no-record]

For each of the four tasks T, with the recipe's other three experts:

1. ``moerge build`` the recipe without T, ``moerge calibrate --unknown shared`` on the three calib splits (64
   prompts each), and score it on the dev splits: the three tasks' accuracy and routing, where T's prompts go
   (fallback rate: the share that takes the shared weights), and the AUROC of known-task vs T prompts for several
   out-of-distribution scores computed from the router's own input (maximum probability, energy, cosine to the
   nearest prototype, distance to the nearest route mean, the detector's relative Mahalanobis score);
2. ``moerge add-expert`` T with its 64 calib prompts (router recalibrated): wall time, bytes added, T's
   accuracy (normalized by the expert alone on the same prompts) and routing, the three old tasks' accuracy on
   the same prompts before and after, how many old prompts changed route, and a bit-for-bit comparison of old
   prompts' logits on unchanged routes (add-expert anchors a full expert by default: ``moerge/routing/add_expert.py``);
   the unknown-prompt detector's per-prompt scores on both models give its fallback rates at other thresholds
   (``calibrate`` reports the out-of-fold quantiles each ``--unknown-quantile`` would choose);
3. ``moerge remove-expert`` T from the result: forced logits against the three-expert build, and add-expert again:
   forced logits against the first add (the round trip);
4. ``moerge calibrate --compose T`` on the three-expert model with 32 labelled calib examples of T: T's dev
   accuracy under the composed route next to the base, the merged model (task arithmetic, lambda 1, of the
   three experts) and each other expert forced.

Pools: ``lora`` = ``recipes/real_pool.yaml`` (the pool's LoRA experts, lora kind over the base); ``full`` = the
full fine-tunes of ``~/.cache/moerge/smollm2-135m-instruct-full`` under an all-units ``bit1`` recipe over a
task-arithmetic shared weight (``--recipe`` takes any recipe file whose experts are named after the tasks; an
expert path that does not exist is replaced by the full expert of that name in the moerge cache, so
``--pool full --recipe recipes/real_pool_full.yaml`` runs the shipped full-pool recipe).
Scoring as ``bench/real/evaluate.py``; builds and results are cached under ``bench/_work/real/newtask``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.real"

import torch
import yaml

from . import evaluate as ev
from .methods import REPO, WORK, Env, load_causal_lm, run

FULL_EXPERTS = Path(os.environ.get("MOERGE_CACHE", Path.home() / ".cache" / "moerge")) / "smollm2-135m-instruct-full"
HEADING = "## new tasks (issue 14)"
COMPOSE_N = 32
DETECTOR = "relative Mahalanobis (stored)"
ROUTE_SCORES = "relative distance to each route"
CHECK_N = 24  # old prompts per task whose logits are compared bit for bit


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- recipes

def full_recipe(env: Env) -> dict:
    """All units routed as bit1 over a task-arithmetic (lambda 1) shared weight, full fine-tune experts."""
    experts = [{"name": t, "source": str(FULL_EXPERTS / t),
                "calibration": {"data": str(env.calib(t)), "field": "prompt", "max_samples": 64,
                                "chat_template": True}} for t in ev.TASKS]
    return {"base": str(env.base), "seed": 0, "experts": experts,
            "merge": {"method": "task_arithmetic", "lambda": 1.0},
            "routing": {"select": {"all": True}, "modules": "both", "expert": {"kind": "bit1"}, "shared": "merge",
                        "router": {"level": "sequence", "init": "prototype", "top_k": 1}}}


def file_recipe(path: Path, env: Env) -> dict:
    """A recipe file with its paths made absolute and ``base`` set to the converted base model."""
    raw = yaml.safe_load(path.read_text())
    for e in raw["experts"]:
        e["source"] = str((path.parent / e["source"]).resolve())
        if e.get("calibration"):
            e["calibration"]["data"] = str((path.parent / e["calibration"]["data"]).resolve())
    raw["base"] = str(env.base)
    for e in raw["experts"]:  # a full-pool recipe's repo-local expert paths: the tool's default cache instead
        if not Path(e["source"]).exists() and (FULL_EXPERTS / e["name"]).is_dir():
            e["source"] = str(FULL_EXPERTS / e["name"])
    return raw


def without(raw: dict, task: str) -> dict:
    out = json.loads(json.dumps(raw))
    out["experts"] = [e for e in out["experts"] if e["name"] != task]
    return out


def source_of(raw: dict, task: str) -> str:
    return next(e["source"] for e in raw["experts"] if e["name"] == task)


# ---------------------------------------------------------------------------------------------------- data files

def calib_mapping(env: Env, tasks: list[str], folder: Path) -> Path:
    path = folder / f"calib_{'_'.join(tasks)}.yaml"
    path.write_text(yaml.safe_dump({t: {"data": str(env.calib(t)), "field": "prompt", "max_samples": 64,
                                        "chat_template": True} for t in tasks}))
    return path


def compose_pairs(env: Env, task: str, folder: Path) -> Path:
    """The first 32 rows of T's calib split: prompt -> answer."""
    rows = ev.read_rows(env.calib(task), COMPOSE_N)
    path = folder / f"pairs_{task}.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": str(r["answer"])}) + "\n" for r in rows))
    return path


def cli(args: list[Any], log_file: Path, env: Env) -> float:
    t = time.perf_counter()
    run([sys.executable, "-m", "moerge", *args], log_file, env)
    return time.perf_counter() - t


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------- scoring

class Scorer:
    """Dev-split scoring of one pool (tokenizer, tasks, oracle accuracies cached on disk)."""

    def __init__(self, env: Env, n: int | None, work: Path) -> None:
        from transformers import AutoTokenizer

        self.env, self.work = env, work
        self.tok = AutoTokenizer.from_pretrained(env.base)
        self.tok.padding_side = "left"
        self.tasks = {t.name: t for t in ev.load_tasks(env.pool, self.tok, n)}

    def routed(self, model: Any, task: str, cache: dict) -> tuple[list[int], list[str], float]:
        """Top route per prompt (-1 = the zero route: shared weights), predictions, accuracy."""
        t = self.tasks[task]
        routes = ev.routes_of(model, self.tok, t.prompts)
        top = [max(range(len(r)), key=r.__getitem__) if max(r) > 0 else -1 for r in routes]
        preds = ev.predict_routed(model, self.tok, t, routes, cache.setdefault(task, {}))
        return top, [preds[i] for i in range(len(t))], ev.accuracy(t, preds)

    def forced(self, model: Any, task: str, route: Any) -> tuple[list[str], float]:
        """Predictions and accuracy of ``task`` under ``force_route(route)``."""
        t = self.tasks[task]
        model.force_route(route)
        try:
            preds = ev.predict(model, self.tok, t)
        finally:
            model.force_route(None)
        return [preds[i] for i in range(len(t))], ev.accuracy(t, preds)

    def plain(self, folder: Path, task: str, key: str) -> float:
        """Accuracy of a dense model folder on ``task`` (cached by ``key``)."""
        path = self.work / "plain.json"
        seen = json.loads(path.read_text()) if path.is_file() else {}
        k = f"{key}|{task}|{len(self.tasks[task])}"
        if k not in seen:
            model = load_causal_lm(folder)
            seen[k] = ev.accuracy(self.tasks[task], ev.predict(model, self.tok, self.tasks[task]))
            now = json.loads(path.read_text()) if path.is_file() else {}  # another run (other --tasks) may have added
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**now, **seen}, indent=1))
            os.replace(tmp, path)  # atomic: a parallel run never reads half a file
        return seen[k]


def ood_scores(model: Any, tok: Any, ckpt: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """Per score (higher = more unlike the known tasks): (N,) for ``texts`` from the router's own input."""
    from moerge.checkpoint import Checkpoint
    from moerge.routing.features import pooled_and_segments

    c = Checkpoint.open(ckpt)
    router = next(iter(c.routers().values()))
    unit = c.manifest.router_input
    segments = c.manifest.unknown.segments if c.manifest.unknown else 4
    means, segs = pooled_and_segments(model, tok, texts, [unit], segments)
    x = means[unit]
    logits = router.logits(x)
    protos = router.prototypes - router.prototypes.mean(0)
    cos = torch.nn.functional.normalize(x - router.center, dim=-1) @ torch.nn.functional.normalize(protos, dim=-1).T
    out = {"max probability": -logits.softmax(-1).max(-1).values, "energy": -logits.logsumexp(-1),
           "cosine to prototypes": -cos.max(-1).values}
    if router.unknown is not None:
        det = router.unknown
        d = segs[unit][:, None, :] - det.means[None]
        out["distance to route means"] = d.pow(2).mean(-1).min(-1).values
        out[DETECTOR] = det.score(segs[unit])
        out[ROUTE_SCORES] = det.route_scores(segs[unit])  # (N, O): not a score of its own (no AUROC)
    return out


# ---------------------------------------------------------------------------------------------------- stages

class LeaveOneOut:
    """One pool, one left-out task: the checkpoints and every measurement, cached in ``folder``."""

    def __init__(self, env: Env, raw: dict, task: str, scorer: Scorer, folder: Path, kind: str) -> None:
        self.env, self.raw, self.task, self.scorer, self.folder, self.kind = env, raw, task, scorer, folder, kind
        self.known = [t for t in ev.TASKS if t != task]
        folder.mkdir(parents=True, exist_ok=True)
        self.logs = folder / "log.txt"
        self.results = folder / "results.json"
        self.r: dict[str, Any] = json.loads(self.results.read_text()) if self.results.is_file() else {}
        self.add_rank: int | None = None
        self.calib_args: list[str] = []  # detector options for calibrate and add-expert (--unknown-quantile / -tail)

    def seed_from(self, other: Path) -> None:
        """Start from another run's three-expert stage (same recipe and prompts; ``--add-rank`` changes the add)."""
        if self.r or not (other / "results.json").is_file():
            return
        done = json.loads((other / "results.json").read_text())
        if "before" not in done or not (other / "three").is_dir():
            return
        shutil.copytree(other / "three", self.three, dirs_exist_ok=True)
        self.r = {k: v for k, v in done.items() if k in ("three", "auroc", "detector_scores", "detector_route_scores",
                                                          "before")}
        self.save()

    def add_options(self) -> list[str]:
        """add-expert's flags beyond the expert and its data (the first add and the round trip's re-add alike)."""
        return [*(["--rank", str(self.add_rank)] if self.add_rank else []), *self.calib_args]

    def save(self) -> None:
        self.results.write_text(json.dumps(self.r, indent=1) + "\n")

    @property
    def three(self) -> Path:
        return self.folder / "three"

    @property
    def added(self) -> Path:
        return self.folder / "added"

    def build_three(self) -> None:
        if "three" in self.r and self.three.is_dir():
            return
        recipe = self.folder / "recipe3.yaml"
        recipe.write_text(yaml.safe_dump(without(self.raw, self.task), sort_keys=False))
        build_s = cli(["build", recipe, self.three, "--force", "--quiet"], self.logs, self.env)
        data = calib_mapping(self.env, self.known, self.folder)
        calib_s = cli(["calibrate", self.three, "--data", data, "--method", "supervised", "--holdout", "0.2",
                       "--unknown", "shared", *self.calib_args, "--quiet"], self.logs, self.env)
        report = json.loads((self.three / "calibration.json").read_text())
        self.r["three"] = {"build_s": build_s, "calib_s": calib_s, "bytes": safetensors_bytes(self.three),
                           "unknown": report.get("unknown"), "calib_heldout_routing": report["accuracy"]}
        self.save()

    def score_three(self) -> None:
        if "before" in self.r:
            return
        model = load_causal_lm(self.three)
        cache: dict = {}
        before: dict[str, Any] = {}
        for t in ev.TASKS:
            top, preds, acc = self.scorer.routed(model, t, cache)
            before[t] = {"routes": top, "preds": preds, "acc": acc}
        tok = self.scorer.tok
        scores = {t: ood_scores(model, tok, self.three, self.scorer.tasks[t].prompts) for t in ev.TASKS}
        from moerge.routing.unknown import auroc

        known = {k: torch.cat([scores[t][k] for t in self.known]) for k in scores[self.task] if k != ROUTE_SCORES}
        self.r["auroc"] = {k: auroc(known[k], scores[self.task][k]) for k in known}
        if DETECTOR in scores[self.task]:  # per prompt: thresholds other than the stored one, offline
            self.r["detector_scores"] = {t: scores[t][DETECTOR].tolist() for t in ev.TASKS}
            self.r["detector_route_scores"] = {t: scores[t][ROUTE_SCORES].tolist() for t in ev.TASKS}
        self.r["before"] = before
        self.save()

    def add(self) -> None:
        if "add" in self.r and self.added.is_dir():
            return
        shutil.rmtree(self.added, ignore_errors=True)
        data = calib_mapping(self.env, [self.task], self.folder)
        add_s = cli(["add-expert", self.three, "--name", self.task, "--source", source_of(self.raw, self.task),
                     "--data", data, "--out", self.added, *self.add_options(), "--quiet"], self.logs, self.env)
        report = json.loads((self.added / "calibration.json").read_text())
        self.r["add"] = {"add_s": add_s, "bytes_added": safetensors_bytes(self.added) - self.r["three"]["bytes"],
                         "new_shard_bytes": (self.added / f"moerge_expert_{self.task}.safetensors").stat().st_size,
                         "calib_heldout_routing": report["accuracy"], "unknown": report.get("unknown")}
        self.save()

    def score_added(self, oracle: dict[str, float]) -> None:
        if "after" in self.r:
            return
        model = load_causal_lm(self.added)
        cache: dict = {}
        after = {}
        for t in ev.TASKS:
            top, preds, acc = self.scorer.routed(model, t, cache)
            after[t] = {"routes": top, "preds": preds, "acc": acc}
        self.r["after"] = after
        self.r["oracle"] = oracle
        scores = {t: ood_scores(model, self.scorer.tok, self.added, self.scorer.tasks[t].prompts) for t in ev.TASKS}
        if DETECTOR in scores[self.task]:
            self.r["detector_scores_added"] = {t: scores[t][DETECTOR].tolist() for t in ev.TASKS}
            self.r["detector_route_scores_added"] = {t: scores[t][ROUTE_SCORES].tolist() for t in ev.TASKS}
        self.r["identical"] = self.bit_check(model)
        self.save()

    def bit_check(self, after_model: Any) -> dict[str, Any]:
        """Old prompts whose route did not change: next-token logits of both models, bit for bit."""
        before_model = load_causal_lm(self.three)
        names = after_model.expert_names
        same = total = 0
        worst = 0.0
        for t in self.known:
            b, a = self.r["before"][t]["routes"], self.r["after"][t]["routes"]
            idx = [i for i in range(len(a)) if a[i] == b[i]][:CHECK_N]
            for i in idx:
                route = {} if a[i] < 0 else names[a[i]]
                enc = self.scorer.tok([self.scorer.tasks[t].prompts[i]], return_tensors="pt", add_special_tokens=False)
                outs = []
                for m in (before_model, after_model):
                    m.force_route(route)
                    with ev.autocast():
                        outs.append(m(**enc, use_cache=False, logits_to_keep=1).logits.float())
                    m.force_route(None)
                same += int(torch.equal(outs[0], outs[1]))
                worst = max(worst, float((outs[0] - outs[1]).abs().max()))
                total += 1
        return {"identical": same, "compared": total, "max_abs_diff": worst}

    def round_trip(self) -> None:
        """remove-expert T from the added checkpoint, compare with the three-expert build; add it back, compare
        with the first add."""
        if "round_trip" in self.r:
            return
        work = self.folder / "roundtrip"
        shutil.rmtree(work, ignore_errors=True)
        rm_s = cli(["remove-expert", self.added, self.task, "--out", work, "--quiet"], self.logs, self.env)
        vs_three = forced_diff(work, self.three, self.known)
        data = calib_mapping(self.env, [self.task], self.folder)
        cli(["add-expert", work, "--name", self.task, "--source", source_of(self.raw, self.task), "--data", data,
             *self.add_options(), "--quiet"], self.logs, self.env)
        vs_added = forced_diff(work, self.added, ev.TASKS, routed=True)
        self.r["round_trip"] = {"remove_s": rm_s, "removed_vs_three": vs_three, "readded_vs_added": vs_added}
        shutil.rmtree(work, ignore_errors=True)
        self.save()

    def compose(self) -> None:
        if "compose" in self.r and self.r["compose"].get("routed_by") == "route_names":
            return
        if "compose" in self.r:  # results from before the fix: the composed route was scored as the zero route
            self.r["compose"].update(self.routed_with_composed(self.folder / "composed"))
            self.save()
            return
        work = self.folder / "composed"
        shutil.rmtree(work, ignore_errors=True)
        pairs = compose_pairs(self.env, self.task, self.folder)
        t = time.perf_counter()
        cli(["calibrate", self.three, "--data", pairs, "--compose", self.task, "--chat-template", "--out", work,
             "--quiet"], self.logs, self.env)
        compose_s = time.perf_counter() - t
        report = json.loads((work / "calibration.json").read_text())
        self.r["compose"] = {"compose_s": compose_s, **self.compose_scores(work), "routing": report["accuracy"]}
        self.save()

    def compose_scores(self, folder: Path) -> dict[str, Any]:
        model = load_causal_lm(folder)
        out: dict[str, Any] = {}
        for e in self.known:
            out[f"expert:{e}"] = self.scorer.forced(model, self.task, e)[1]
        out["composed"] = self.scorer.forced(model, self.task, self.task)[1]
        units = list(model.config.moerge["units"])
        if self.kind == "lora":  # shared = base: the merge is the route with weight 1 on every expert
            model.add_route("_merged", {u: [1.0] * len(self.known) for u in units})
            out["merged"] = self.scorer.forced(model, self.task, "_merged")[1]
            out["base"] = self.scorer.forced(model, self.task, {})[1]
        else:  # shared = the task-arithmetic merge: the zero route
            out["merged"] = self.scorer.forced(model, self.task, {})[1]
            out["base"] = self.scorer.plain(self.env.base, self.task, "base")
        out["weights"] = json.loads((folder / "config.json").read_text())["moerge"]["routes"][self.task]
        return {**out, **self.routed_with_composed(folder, model)}

    def routed_with_composed(self, folder: Path, model: Any = None) -> dict[str, Any]:
        """T's dev accuracy when the router picks the route (composed route included), and how often it picks it."""
        top, _, acc = self.scorer.routed(model or load_causal_lm(folder), self.task, {})
        return {"routed": acc, "routed_to_composed": sum(r == len(self.known) for r in top) / len(top),
                "routed_by": "route_names"}


def forced_diff(a: Path, b: Path, names: list[str], routed: bool = False) -> dict[str, float]:
    """max |logit a - logit b| over four fixed prompts under each forced expert (and, ``routed``, unforced)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    enc = tok(["Is the sentiment of this movie review positive or negative? I loved it.", "Calculate 12 + 30.",
               "Which topic is this news article about? Shares fell.", "Is the sentiment of this tweet negative?"],
              return_tensors="pt", padding=True, add_special_tokens=False)
    ma, mb = load_causal_lm(a), load_causal_lm(b)
    out = {}
    for route in [*names, *([None] if routed else [])]:
        logits = []
        for m in (ma, mb):
            m.force_route(route)
            with torch.inference_mode():
                logits.append(m(**enc, use_cache=False).logits)
            m.force_route(None)
        out[str(route or "routed")] = float((logits[0] - logits[1]).abs().max())
    return out


# ---------------------------------------------------------------------------------------------------- report

def oracle_accuracy(env: Env, scorer: Scorer, pool: str, loo: LeaveOneOut) -> dict[str, float]:
    """The expert alone on its task: LoRA = the added checkpoint's forced exact expert; full = the fine-tune."""
    if pool == "full":
        return {t: scorer.plain(FULL_EXPERTS / t, t, f"full-{t}") for t in [loo.task]}
    model = load_causal_lm(loo.added)
    return {loo.task: scorer.forced(model, loo.task, loo.task)[1]}


def summarize(rs: dict[str, dict], pool: str) -> list[str]:
    lines = [f"### pool `{pool}`", "",
             ("| left-out task T | T normalized (acc / expert) | T routing | old tasks: acc before -> after (max "
             "loss) | old prompts re-routed | unchanged routes: identical logits | add s | bytes added |"),
             "|---|---|---|---|---|---|---|---|"]
    for t, r in rs.items():
        if "after" not in r:
            continue
        n = len(r["after"][t]["routes"])
        e = len(ev.TASKS) - 1
        norm = r["after"][t]["acc"] / r["oracle"][t] if r["oracle"][t] else math.nan
        routing = sum(x == e for x in r["after"][t]["routes"]) / n
        olds = [k for k in ev.TASKS if k != t]
        pairs = ", ".join(f"{k} {r['before'][k]['acc']:.3f}->{r['after'][k]['acc']:.3f}" for k in olds)
        loss = max(r["before"][k]["acc"] - r["after"][k]["acc"] for k in olds)
        moved = sum(a != b for k in olds for a, b in zip(r["before"][k]["routes"], r["after"][k]["routes"]))
        ident = r["identical"]
        lines.append(f"| {t} | {norm:.3f} ({r['after'][t]['acc']:.3f} / {r['oracle'][t]:.3f}) | {routing:.3f} | "
                     f"{pairs} ({loss:+.3f}) | {moved} of {n * len(olds)} | {ident['identical']} of "
                     f"{ident['compared']} | {r['add']['add_s']:.0f} | {r['add']['bytes_added'] / 1e6:.1f} MB |")
    return (lines + [""] + unknown_table(rs) + [""] + threshold_table(rs) + [""] + compose_table(rs) + [""] +
            roundtrip_table(rs))


def fallback_rates(scores: dict[str, list[float]], thresholds: dict[str, float], tasks: list[str]) -> list[float]:
    """Per threshold (in ``thresholds``' order): the share of ``tasks``' prompts scoring above it."""
    pooled = torch.tensor([x for t in tasks for x in scores[t]])
    return [float((pooled > thr).float().mean()) for thr in thresholds.values()]


def route_fallback_rates(route_scores: dict[str, list[list[float]]], per_route: dict[str, dict[str, float]],
                         tasks: list[str]) -> list[float]:
    """Per-route thresholds (``calibrate``'s ``route_thresholds``: output -> quantile -> threshold, outputs in the
    router's order): per quantile, the share of ``tasks``' prompts beyond every route's own threshold."""
    rel = torch.tensor([x for t in tasks for x in route_scores[t]])  # (N, O)
    quantiles = next(iter(per_route.values()))
    return [float((rel > torch.tensor([per_route[o][q] for o in per_route])).all(-1).float().mean())
            for q in quantiles]


def detector_rates(r: dict, model: str, tasks: list[str]) -> list[float] | None:
    """Fallback rates of ``tasks``' stored prompts at each reported quantile, on the ``three`` or ``add`` model's
    detector (global or per-route thresholds, as calibrated); None when not measured."""
    report = (r.get(model) or {}).get("unknown") or {}
    suffix = "" if model == "three" else "_added"
    if report.get("route_thresholds") and r.get("detector_route_scores" + suffix):
        return route_fallback_rates(r["detector_route_scores" + suffix], report["route_thresholds"], tasks)
    if report.get("out_of_fold_quantiles") and r.get("detector_scores" + suffix):
        return fallback_rates(r["detector_scores" + suffix], report["out_of_fold_quantiles"], tasks)
    return None


def threshold_table(rs: dict[str, dict]) -> list[str]:
    """The detector at other quantiles of its out-of-fold calib scores (``calibrate`` reports them), from the
    stored per-prompt scores: unknown T's fallback rate and the known tasks' (three-expert model), and T's own
    fallback once added (four-expert model, its detector refitted by add-expert)."""
    lines = [("The unknown-prompt detector at other thresholds (`--unknown-quantile q`: the q-quantile of the "
             "out-of-fold calib scores, per route where the detector has per-route thresholds; the shipped default is "
             "0.995 per route, 0.98 before 2026-12-07), from the stored per-prompt scores. Three-expert "
             "model: T's fallback rate (should be high) and the known tasks' (low); after add-expert: T's own "
             "prompts falling back (low)."), "",
             ("| left-out task T | q | T -> shared (three experts) | known -> shared (three experts) | T -> shared "
             "after its add | old tasks -> shared after the add |"), "|---|---|---|---|---|---|"]
    for t, r in rs.items():
        three = ((r.get("three") or {}).get("unknown") or {}).get("out_of_fold_quantiles")
        olds = [k for k in ev.TASKS if k != t]
        unk, kn = detector_rates(r, "three", [t]), detector_rates(r, "three", olds)
        if not three or unk is None or kn is None:
            continue
        t_after = detector_rates(r, "add", [t]) or [math.nan] * len(three)
        o_after = detector_rates(r, "add", olds) or [math.nan] * len(three)
        for i, q in enumerate(three):
            lines.append(f"| {t} | {q} | {unk[i]:.3f} | {kn[i]:.3f} | {t_after[i]:.3f} | {o_after[i]:.3f} |")
    return lines


def unknown_table(rs: dict[str, dict]) -> list[str]:
    keys = next((list(r["auroc"]) for r in rs.values() if "auroc" in r), [])
    lines = [("Unknown prompts on the three-expert model (T's dev prompts vs the three known tasks' dev prompts): "
             "AUROC of each out-of-distribution score; with the stored detector at the threshold `calibrate` chose, "
             "the share of T's prompts that take the shared weights and the known tasks' routing (top route = "
             "their expert)."), "",
             "| left-out task T | " + " | ".join(f"AUROC {k}" for k in keys) + " | T -> shared weights | T -> "
             "an expert | known routing | known -> shared |", "|---|" + "---|" * (len(keys) + 4)]
    for t, r in rs.items():
        if "auroc" not in r:
            continue
        b = r["before"]
        olds = [k for k in ev.TASKS if k != t]
        n = len(b[t]["routes"])
        fb = sum(x < 0 for x in b[t]["routes"]) / n
        known = sum(x == i for i, k in enumerate(olds) for x in b[k]["routes"]) / (n * len(olds))
        known_fb = sum(x < 0 for k in olds for x in b[k]["routes"]) / (n * len(olds))
        lines.append(f"| {t} | " + " | ".join(f"{r['auroc'][k]:.3f}" for k in keys) +
                     f" | {fb:.3f} | {1 - fb:.3f} | {known:.3f} | {known_fb:.3f} |")
    if rs:
        means = {k: sum(r["auroc"][k] for r in rs.values() if "auroc" in r) / max(1, sum("auroc" in r for r in rs.values()))
                 for k in keys}
        lines.append("| mean | " + " | ".join(f"{v:.3f}" for v in means.values()) + " | | | | |")
    return lines


def compose_table(rs: dict[str, dict]) -> list[str]:
    lines = [(f"Composed route for T from {COMPOSE_N} labelled calib examples (`moerge calibrate --compose T`, "
             "per-layer weights over the three experts), T's dev accuracy:"), "",
             ("| left-out task T | base | merged (TA of 3) | best other expert | composed | above both | routed "
             "(router picks the route) | compose s |"), "|---|---|---|---|---|---|---|---|"]
    for t, r in rs.items():
        c = r.get("compose")
        if not c:
            continue
        best = max((v, k.split(":")[1]) for k, v in c.items() if k.startswith("expert:"))
        above = c["composed"] > c["merged"] and c["composed"] > best[0]
        lines.append(f"| {t} | {c['base']:.3f} | {c['merged']:.3f} | {best[0]:.3f} ({best[1]}) | {c['composed']:.3f}"
                     f" | {'yes' if above else 'no'} | {c['routed']:.3f} ({c['routed_to_composed']:.3f} on the "
                     f"route) | {c['compose_s']:.0f} |")
    return lines


def roundtrip_table(rs: dict[str, dict]) -> list[str]:
    lines = [("remove-expert T from the four-expert model, then add-expert T again (max |logit difference|, fp32, "
             "four fixed prompts, each expert forced; `routed` = the model's own routes):"), "",
             "| left-out task T | removed vs the three-expert build | re-added vs the first add | remove s |",
             "|---|---|---|---|"]
    for t, r in rs.items():
        rt = r.get("round_trip")
        if rt:
            lines.append(f"| {t} | {max(rt['removed_vs_three'].values()):.2e} | "
                         f"{max(rt['readded_vs_added'].values()):.2e} | {rt['remove_s']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", choices=["lora", "full"], default="lora")
    ap.add_argument("--recipe", type=Path, help="recipe file (default: recipes/real_pool.yaml for lora, an "
                                                "all-units bit1 over task arithmetic for full)")
    ap.add_argument("--n", type=int, default=200, help="dev prompts per task (default 200)")
    ap.add_argument("--tasks", nargs="*", default=list(ev.TASKS))
    ap.add_argument("--phases", default="add,compose", help="add (1-3) and/or compose (4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--add-rank", type=int, help="add-expert --rank R (the added full expert's rank in twin units)")
    ap.add_argument("--unknown-quantile", type=float, help="calibrate / add-expert --unknown-quantile (default: theirs)")
    ap.add_argument("--unknown-tail", choices=["empirical", "exponential"], help="calibrate / add-expert "
                    "--unknown-tail (default: theirs)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--pool-dir", type=Path, default=REPO.parent / "shared" / "pool")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO / "tools"))
    from get_base_model import get_base_model

    env = Env(pool=args.pool_dir, base=get_base_model(), threads=args.threads)
    raw = file_recipe(args.recipe, env) if args.recipe else (
        file_recipe(REPO / "recipes" / "real_pool.yaml", env) if args.pool == "lora" else full_recipe(env))
    kind = "lora" if raw["routing"].get("shared") == "base" else "full"
    work = WORK / "newtask" / (args.pool + (f"-{args.recipe.stem}" if args.recipe else ""))  # a recipe's own cache
    calib_args = [a for flag, v in (("--unknown-quantile", args.unknown_quantile), ("--unknown-tail", args.unknown_tail))
                  if v is not None for a in (flag, str(v))]
    if calib_args:  # its own cache: every checkpoint is calibrated with them
        work = work.with_name(work.name + "".join(f"-{v}" for v in calib_args[1::2]))
    plain_work = work
    if args.add_rank:  # its own cache, seeded with the plain run's three-expert stage
        work = work.with_name(work.name + f"-addrank{args.add_rank}")
    scorer = Scorer(env, args.n, work)
    t0 = time.perf_counter()
    results = {}
    for task in args.tasks:
        loo = LeaveOneOut(env, raw, task, scorer, work / task, kind)
        loo.calib_args = calib_args
        if args.add_rank:
            loo.add_rank = args.add_rank
            loo.seed_from(plain_work / task)
        steps = [loo.build_three, loo.score_three, loo.add,
                 lambda loo=loo: "after" in loo.r or loo.score_added(oracle_accuracy(env, scorer, args.pool, loo)),
                 loo.round_trip]
        for step in (steps if "add" in args.phases else [loo.build_three, loo.score_three]):
            log(f"{args.pool}/{task}: {getattr(step, '__name__', 'score_added')}")
            step()
        if "compose" in args.phases:
            log(f"{args.pool}/{task}: compose")
            loo.compose()
        results[task] = loo.r
    text = "\n".join(summarize(results, args.pool))
    print(text)
    if not args.no_record:
        record_section(text, args, time.perf_counter() - t0)
    return 0


def record_section(text: str, args: argparse.Namespace, wall: float) -> None:
    from bench._measure import record

    cmd = f"python -m bench.real.newtask --pool {args.pool}" + (f" --recipe {args.recipe}" if args.recipe else "")
    record(f"Command: `{cmd}` ({args.n} dev prompts per task), {time.strftime('%Y-%m-%d %H:%M')}, "
           f"{wall / 60:.1f} min wall this run (cached stages keep their earlier times).\n\n{text}",
           HEADING, REPO / "bench" / "RESULTS.md")


if __name__ == "__main__":
    raise SystemExit(main())
