"""The methods compared on the real pool: each is a small function that builds (once, cached) and loads a model.

Groups:

* ``reference``: the base model; each expert alone on its own task (the oracle: it needs to know the task);
* ``static``: moerge's own static merges of the four LoRA experts (task arithmetic, TIES, DARE-TIES, DELLA);
* ``peer``: what a user would pick instead: ``mergekit-yaml`` TIES, ``mergekit-moe`` (hidden gates, over the
  experts merged into full checkpoints), PEFT ``add_weighted_adapter`` (ties, dare_ties, cat), PEFT Arrow
  routing (``create_arrow_model``);
* ``moerge``: routed builds, kind x selection, with the prototype router and (when ``moerge calibrate``
  exists) after supervised calibration on the calib split.

Everything built goes to ``bench/_work/real/`` (gitignored) and is reused when its recipe has not changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .evaluate import TASKS

REPO = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("MOERGE_BENCH_WORK") or REPO / "bench" / "_work" / "real")  # cache of builds/results


@dataclass
class Env:
    pool: Path  # shared/pool
    base: Path  # the converted base model folder
    work: Path = WORK
    threads: int = 2
    full: Path | None = None  # the full fine-tune experts (``--pool full``: tools/get_full_pool.py's folder)

    def adapter(self, task: str) -> Path:
        """Task's expert as a recipe source: the LoRA adapter, or the full fine-tune (``--pool full``)."""
        return self.full / task if self.full is not None else self.pool / "experts" / task

    def calib(self, task: str) -> Path:
        return self.pool / "data" / task / "calib.jsonl"


@dataclass
class Loaded:
    """A method ready to evaluate."""

    model_for: Callable[[str], Any]  # task name -> model (the same model for every task, except the oracle)
    storage: float | None  # checkpoint bytes / base bytes at the same dtype
    build_s: float = 0.0
    calib_s: float | None = None
    routed: bool = False  # a moerge top-1 sequence-routed model: evaluated through its router
    amp: bool = True  # bf16 autocast (False: fp32, for models that fail under autocast)
    folder: Path | None = None  # the checkpoint (moerge)
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Method:
    key: str  # unique id: cache file names, --only
    label: str  # the table's row label
    group: str  # reference | static | peer | moerge
    load: Callable[[Env], Loaded]
    quick: bool = False  # part of --quick
    params: dict = field(default_factory=dict)  # what the cache depends on
    dense: bool = False  # a plain model of the base's shape: generates at the base's speed (not re-timed)
    max_n: int | None = None  # evaluate on at most this many prompts per task (slow methods)
    default: bool = True  # part of a run without --only


class Skipped(Exception):
    """A method that cannot run here; the message goes to the table."""


# ---------------------------------------------------------------------------------------------------- helpers

def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_bytes(env: Env) -> int:
    """The base's parameter bytes at fp32 (every checkpoint here is fp32)."""
    return sum(int(torch.tensor(s).prod()) for s in tensor_shapes(env.base).values()) * 4


def tensor_shapes(folder: Path) -> dict[str, list[int]]:
    from moerge.io.index import CheckpointIndex

    return {n: list(i.shape) for n, i in CheckpointIndex.from_folder(folder).tensors.items()}


def folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(suffix))


def load_causal_lm(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    import moerge  # noqa: F401  (registers the moerge model type)

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_base(env: Env) -> Any:
    return load_causal_lm(env.base)


def cached(folder: Path, stamp: dict, make: Callable[[Path], None]) -> tuple[Path, float]:
    """Build ``folder`` with ``make(tmp)`` unless it holds a build of the same ``stamp``; (folder, seconds)."""
    marker = folder / ".bench_stamp.json"
    if marker.is_file() and json.loads(marker.read_text()).get("stamp") == stamp:
        return folder, float(json.loads(marker.read_text())["seconds"])
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make(tmp)
    seconds = time.perf_counter() - t
    (tmp / ".bench_stamp.json").write_text(json.dumps({"stamp": stamp, "seconds": seconds}) + "\n")
    os.replace(tmp, folder)
    return folder, seconds


def run(cmd: list[str], log: Path, env: Env) -> None:
    """Run a child process (1 line per command in the log); raises with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "OMP_NUM_THREADS": str(env.threads), "HF_HUB_OFFLINE": "1",
                 "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with log.open("a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=child_env, cwd=REPO,
                              check=False)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def bin_path(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# ---------------------------------------------------------------------------------------------------- reference

def full_expert(env: Env, task: str) -> Path:
    """The expert as a full fp32 checkpoint: the full fine-tune itself, or the LoRA expert merged into the base
    (peft ``merge_and_unload``)."""
    if env.full is not None:
        return env.full / task
    def make(tmp: Path) -> None:
        from peft import PeftModel
        from transformers import AutoTokenizer

        model = PeftModel.from_pretrained(load_base(env), env.adapter(task)).merge_and_unload()
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(env.base).save_pretrained(tmp)

    folder, _ = cached(env.work / "full" / task, {"adapter": str(env.adapter(task)), "v": 1}, make)
    return folder


def load_base_method(env: Env) -> Loaded:
    model = load_base(env)
    return Loaded(lambda task: model, 1.0)


def load_oracle(env: Env) -> Loaded:
    t = time.perf_counter()
    folders = {task: full_expert(env, task) for task in TASKS}
    build_s = time.perf_counter() - t
    current: dict[str, Any] = {}

    def model_for(task: str) -> Any:
        if task not in current:
            current.clear()
            current[task] = load_causal_lm(folders[task])
        return current[task]

    adapters = sum(folder_bytes(env.adapter(t)) for t in TASKS)
    what = "4 full fine-tunes" if env.full is not None else "base + 4 LoRA adapters"
    return Loaded(model_for, (0 if env.full is not None else 1) + adapters / base_bytes(env), build_s,
                  note=f"each task run by its own expert (needs the task); storage = {what}")


# ---------------------------------------------------------------------------------------------------- moerge builds

def recipe_dict(env: Env, merge: dict, routing: dict | None = None, calibration: bool = True) -> dict:
    experts = []
    for task in TASKS:
        e: dict[str, Any] = {"name": task, "source": str(env.adapter(task))}
        if calibration:
            e["calibration"] = {"data": str(env.calib(task)), "field": "prompt", "max_samples": 64,
                                "chat_template": True}
        experts.append(e)
    raw: dict[str, Any] = {"base": str(env.base), "seed": 0, "experts": experts, "merge": merge}
    if routing is not None:
        raw["routing"] = routing
    return raw


def moerge_build(env: Env, name: str, raw: dict) -> tuple[Path, float]:
    """Build a recipe with the moerge CLI (as a user would); cached on the recipe."""
    def make(tmp: Path) -> None:
        recipe = tmp.with_suffix(".yaml")
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
        run([sys.executable, "-m", "moerge", "build", recipe, tmp, "--force", "--quiet"],
            env.work / "logs" / f"{name}.log", env)
        recipe.unlink()

    return cached(env.work / "ckpt" / name, {"recipe": raw, "v": 1}, make)


def load_static(merge: dict) -> Callable[[Env], Loaded]:
    def load(env: Env) -> Loaded:
        name = "static-" + digest(merge)
        folder, build_s = moerge_build(env, name, recipe_dict(env, merge, calibration=False))
        model = load_causal_lm(folder)
        return Loaded(lambda task: model, folder_bytes(folder) / base_bytes(env), build_s, folder=folder)

    return load


# ---------------------------------------------------------------------------------------------------- peers

def load_mergekit_ties(env: Env) -> Loaded:
    experts = {t: full_expert(env, t) for t in TASKS}
    config = {"merge_method": "ties", "base_model": str(env.base), "dtype": "float32",
              "parameters": {"normalize": True},
              "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 1.0}} for p in experts.values()]}

    def make(tmp: Path) -> None:
        cfg = tmp.with_suffix(".yml")
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        run([bin_path("mergekit-yaml"), cfg, tmp, "--copy-tokenizer", "--lazy-unpickle"],
            env.work / "logs" / "mergekit_ties.log", env)
        cfg.unlink()

    folder, build_s = cached(env.work / "ckpt" / "mergekit-ties", config, make)
    model = load_causal_lm(folder)
    return Loaded(lambda task: model, folder_bytes(folder) / base_bytes(env), build_s,
                  folder=folder, note="mergekit-yaml over the 4 experts merged into full checkpoints")


def _hidden_prompts(env: Env, task: str, n: int = 8) -> list[str]:
    from .evaluate import read_rows

    return [r["prompt"] for r in read_rows(env.calib(task), n)]


def load_mergekit_moe(env: Env) -> Loaded:
    experts = {t: full_expert(env, t) for t in TASKS}
    config = {"base_model": str(env.base), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
              "experts": [{"source_model": str(p), "positive_prompts": _hidden_prompts(env, t)}
                          for t, p in experts.items()]}

    def make(tmp: Path) -> None:
        cfg = tmp.with_suffix(".yml")
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        run([bin_path("mergekit-moe"), cfg, tmp], env.work / "logs" / "mergekit_moe.log", env)
        cfg.unlink()

    folder, build_s = cached(env.work / "ckpt" / "mergekit-moe", config, make)
    try:
        model = load_causal_lm(folder)
    except Exception as exc:  # noqa: BLE001 - any load failure is the finding
        raise Skipped(f"mergekit-moe output does not load in transformers: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:160]}") from None
    return Loaded(lambda task: model, folder_bytes(folder) / base_bytes(env), build_s, folder=folder,
                  note="hidden gates from 8 calib prompts per expert, top-2 (its default)")


def _peft_model(env: Env) -> Any:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(env), env.adapter(TASKS[0]), adapter_name=TASKS[0])
    for task in TASKS[1:]:
        model.load_adapter(env.adapter(task), adapter_name=task)
    return model


def load_peft_weighted(combination: str, density: float | None) -> Callable[[Env], Loaded]:
    def load(env: Env) -> Loaded:
        t = time.perf_counter()
        model = _peft_model(env)
        kwargs = {"density": density} if density is not None else {}
        model.add_weighted_adapter(list(TASKS), [1.0] * len(TASKS), "merged", combination_type=combination,
                                   **kwargs)
        model.set_adapter("merged")
        for task in TASKS:
            model.delete_adapter(task)
        dense = model.merge_and_unload().eval()  # served as a dense model: the base's size and speed
        build_s = time.perf_counter() - t
        return Loaded(lambda task: dense, 1.0, build_s, note="merged adapter folded into the base "
                      "(merge_and_unload) for serving")

    return load


def load_arrow(top_k: int) -> Callable[[Env], Loaded]:
    def load(env: Env) -> Loaded:
        from peft import ArrowConfig, create_arrow_model

        t = time.perf_counter()
        model = create_arrow_model(load_base(env), [str(env.adapter(t)) for t in TASKS],
                                   ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)).eval()
        build_s = time.perf_counter() - t
        adapters = sum(folder_bytes(env.adapter(t)) for t in TASKS)
        return Loaded(lambda task: model, 1 + adapters / base_bytes(env), build_s, amp=False,
                      note="token-level, training-free; storage = base + 4 adapters; evaluated in fp32 (peft's "
                      "arrow forward fails under bf16 autocast: scatter dtype mismatch)")

    return load


def load_xlora(env: Env) -> Loaded:
    raise Skipped("X-LoRA's scaling classifier must be trained (it is not training-free); not run")


# ---------------------------------------------------------------------------------------------------- moerge routed

SELECTIONS: dict[str, dict] = {
    "mlp": {"select": {"all": True}, "modules": "mlp"},
    "all": {"select": {"all": True}, "modules": "both"},
    "top25": {"select": {"metric": "sign_conflict", "top_fraction": 0.25}, "modules": "both"},
    "budget1.3": {"select": {"budget": "1.3x"}, "modules": "both"},
}
SELECTION_LABELS = {"mlp": "all MLP", "all": "all units", "top25": "top 25% conflict", "budget1.3": "budget 1.3x"}
KINDS: dict[str, dict] = {
    "dense": {"kind": "dense"},
    "wemoe": {"kind": "wemoe"},
    "twin4": {"kind": "twin", "rank": 4},
    "twin8": {"kind": "twin", "rank": 8},
    "twin16": {"kind": "twin", "rank": 16},  # the experts' own rank: exact over the base
    "bit1": {"kind": "bit1"},
    "lora": {"kind": "lora"},
    "sparse": {"kind": "sparse", "density": 0.1},
}
ROUTED_MERGE = {"method": "task_arithmetic", "lambda": 1.0}  # unrouted units: the best static merge


def routed_recipe(env: Env, kind: str, selection: str) -> dict:
    routing = {**SELECTIONS[selection], "expert": KINDS[kind], "shared": "base",
               "router": {"level": "sequence", "init": "prototype", "top_k": 1}}
    return recipe_dict(env, ROUTED_MERGE, routing)


def calibrate_available() -> bool:
    return (REPO / "moerge" / "routing" / "calibrate.py").is_file()


def calib_data(env: Env) -> Path:
    """The four calib splits (64 prompts each) in one JSONL table with an ``expert`` column: what
    ``moerge calibrate --data`` reads."""
    from .evaluate import read_rows

    path = env.work / "calib_all.jsonl"
    rows = [{"prompt": r["prompt"], "expert": t} for t in TASKS for r in read_rows(env.calib(t), 64)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def calibrated_copy(env: Env, folder: Path) -> tuple[Path, float]:
    """A copy of ``folder`` (weights linked, small files copied) calibrated with ``moerge calibrate``."""
    def make(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for f in folder.iterdir():
            if f.name.startswith("model-") and f.suffix == ".safetensors":
                os.symlink(f.resolve(), tmp / f.name)
            elif f.is_file() and not f.name.startswith(".bench"):
                shutil.copy2(f, tmp / f.name)
        run([sys.executable, "-m", "moerge", "calibrate", tmp, "--data", calib_data(env), "--method", "supervised",
             "--holdout", "0.2", "--chat-template", "--quiet"], env.work / "logs" / f"{folder.name}-cal.log", env)

    stamp = {"source": json.loads((folder / ".bench_stamp.json").read_text())["stamp"], "cal": "supervised-0.2"}
    return cached(folder.with_name(folder.name + "-cal"), stamp, make)


def build_key(recipe: Any) -> str:
    """What a routed build's per-(prompt, route) predictions depend on: the validated recipe."""
    return digest(recipe.model_dump(mode="json", by_alias=True, exclude_none=True))


def load_moerge_checkpoint(folder: Path, key: str, build_s: float, calib_s: float | None) -> Loaded:
    from moerge.checkpoint.summary import storage_breakdown
    from moerge.io.index import CheckpointIndex

    config = json.loads((folder / "config.json").read_text())
    index = CheckpointIndex.from_folder(folder)
    shared = storage_breakdown(index, config).get("shared", index.total_bytes)  # base-shaped tensors
    model = load_causal_lm(folder)
    n_units = len(config["moerge"]["units"])
    return Loaded(lambda task: model, index.total_bytes / shared, build_s, calib_s, routed=n_units > 0,
                  folder=folder, note=f"{n_units} routed units", extra={"build_key": key, "units": n_units})


def load_routed(kind: str, selection: str, calibrated: bool) -> Callable[[Env], Loaded]:
    return load_built(f"moerge-{kind}-{selection}", lambda env: routed_recipe(env, kind, selection), calibrated)


def load_built(name: str, recipe_of: Callable[[Env], dict], calibrated: bool) -> Callable[[Env], Loaded]:
    """A routed recipe built with ``moerge build`` (cached as ``name``), optionally calibrated, loaded."""
    def load(env: Env) -> Loaded:
        from moerge.recipe import recipe_from_dict

        raw = recipe_of(env)
        folder, build_s = moerge_build(env, name, raw)
        calib_s = None
        if calibrated:
            if not calibrate_available():
                raise Skipped("moerge calibrate is not available yet (moerge/routing/calibrate.py)")
            folder, calib_s = calibrated_copy(env, folder)
        return load_moerge_checkpoint(folder, build_key(recipe_from_dict(raw)), build_s, calib_s)

    return load


RECIPE = REPO / "recipes" / "real_pool.yaml"
RECIPE_CALIB = REPO / "recipes" / "real_pool_calib.yaml"


def load_recipe_file(env: Env, recipe: Path = RECIPE, calib: Path = RECIPE_CALIB,
                     overrides: list[str] | None = None) -> Loaded:
    """A shipped recipe exactly as its header says: ``moerge build RECIPE --set base=...`` then
    ``moerge calibrate --data CALIB --method supervised --holdout 0.2``."""
    from moerge.recipe import load_recipe

    sets = [f"base={env.base}", *(overrides or [])]
    stamp = {"recipe": recipe.read_text(), "calib": calib.read_text(), "base": str(env.base), "v": 1,
             **({"sets": sets} if overrides else {})}
    times: dict[str, float] = {}

    def make(tmp: Path) -> None:
        log = env.work / "logs" / f"recipe-{recipe.stem}.log"
        t = time.perf_counter()
        run([sys.executable, "-m", "moerge", "build", recipe, tmp, *(a for s in sets for a in ("--set", s)), "--force",
             "--quiet"], log, env)
        times["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        run([sys.executable, "-m", "moerge", "calibrate", tmp, "--data", calib, "--method", "supervised",
             "--holdout", "0.2", "--quiet"], log, env)
        times["calib_s"] = time.perf_counter() - t
        (tmp / ".bench_times.json").write_text(json.dumps(times))

    folder, _ = cached(env.work / "ckpt" / f"recipe-{recipe.stem}", stamp, make)
    times = json.loads((folder / ".bench_times.json").read_text())
    loaded = load_moerge_checkpoint(folder, build_key(load_recipe(recipe, sets)), times["build_s"], times["calib_s"])
    loaded.note = "build + calibrate as the recipe's header; " + loaded.note
    return loaded


# ---------------------------------------------------------------------------------------------------- the list

def all_methods() -> list[Method]:
    ms = [
        Method("base", "base model", "reference", load_base_method, quick=True),
        Method("oracle", "expert alone on its task (oracle)", "reference", load_oracle, quick=True, dense=True),
    ]
    statics = [("task_arithmetic", {"method": "task_arithmetic", "lambda": 1.0}, True),
               ("ties", {"method": "ties", "density": 0.5, "lambda": 1.0}, True),
               ("dare_ties", {"method": "dare_ties", "density": 0.5, "lambda": 1.0}, False),
               ("della", {"method": "della", "density": 0.5, "epsilon": 0.15, "lambda": 1.0}, False)]
    for name, merge, quick in statics:
        ms.append(Method(f"static-{name}", f"moerge static {name} "
                         f"({', '.join(f'{k} {v}' for k, v in merge.items() if k != 'method')})", "static",
                         load_static(merge), quick, merge, dense=True))
    ms += [
        Method("mergekit-ties", "mergekit-yaml ties (density 0.5)", "peer", load_mergekit_ties, False, dense=True),
        Method("mergekit-moe", "mergekit-moe (hidden gates, top-2)", "peer", load_mergekit_moe, False),
        Method("peft-ties", "PEFT add_weighted_adapter ties (density 0.5)", "peer",
               load_peft_weighted("ties", 0.5), False, dense=True),
        Method("peft-dare_ties", "PEFT add_weighted_adapter dare_ties (density 0.5)", "peer",
               load_peft_weighted("dare_ties", 0.5), False, dense=True),
        Method("peft-cat", "PEFT add_weighted_adapter cat", "peer", load_peft_weighted("cat", None), False,
               dense=True),
        Method("arrow-top1", "PEFT Arrow routing (top_k 1)", "peer", load_arrow(1), False, max_n=50),
        Method("arrow-top3", "PEFT Arrow routing (top_k 3, default)", "peer", load_arrow(3), False, max_n=50),
        Method("xlora", "PEFT X-LoRA", "peer", load_xlora, False),
    ]
    ms.append(Method("recipe-real_pool", "recipes/real_pool.yaml (lora / all units / calibrated)", "moerge",
                     load_recipe_file, True, {"recipe": RECIPE.read_text(), "calib": RECIPE_CALIB.read_text()}))
    quick_routed = {("twin4", "all")}
    for kind, kind_params in KINDS.items():
        for sel, sel_params in SELECTIONS.items():
            if kind == "lora" and sel == "budget1.3":
                continue  # every lora unit fits in 1.3x: the same build as "all"
            if kind == "twin8" and sel != "all":
                continue  # the middle rank: one selection is enough to place it between ranks 4 and 16
            for cal in (False, True):
                label = f"moerge {kind} / {SELECTION_LABELS[sel]} / {'calibrated' if cal else 'prototype'}"
                ms.append(Method(f"moerge-{kind}-{sel}{'-cal' if cal else ''}", label, "moerge",
                                 load_routed(kind, sel, cal), (kind, sel) in quick_routed,
                                 {"kind": kind_params, "sel": sel_params, "cal": cal}))
    return ms
