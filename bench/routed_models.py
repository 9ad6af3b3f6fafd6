"""Shared models, data and routed builds for the issue-3 benchmarks (generate_speed, storage, build_memory).

Everything is cached under ``bench/_work`` (gitignored) and rebuilt only when missing or when its stamp
changed:

* the ~110M llama base and full experts ``expert_0..2`` come from ``bench/merge_speed.py``'s
  ``prepare_models`` (same generator, same stamp), ``expert_3`` is added here with the same recipe
  (``make_full_expert(seed=4, scale=0.02)``);
* ``lora_0..3``: PEFT LoRA adapters (rank 16, alpha 32, MLP linears) over that base;
* ``data/<task>.jsonl``: 32 calibration prompts for each of the 4 tasks (``make_task_data``, seed 0);
* ``routed/<kind>-<dtype>``: moerge builds with 4 experts, every MLP routed, sequence-level top-1
  routing with prototypes calibrated on the task data (expert i <- task i);
* ``big/``: a ~350M llama (hidden 1024, 24 layers, intermediate 3328) with 4 full experts, for build_memory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
TASKS = ("sentiment", "topic", "math", "code")
N_EXPERTS = 4
EXPERT_SCALE = 0.02  # merge_speed.py's
LORA = {"r": 16, "alpha": 32, "scale": 0.02, "target_modules": ("gate_proj", "up_proj", "down_proj")}
KIND_PARAMS: dict[str, dict] = {"dense": {}, "wemoe": {}, "twin": {"rank": 16}, "bit1": {}, "lora": {},
                                "sparse": {"density": 0.1}}
BIG_MODEL = {"family": "llama", "hidden": 1024, "layers": 24, "intermediate": 3328, "heads": 16, "kv_heads": 16,
             "tie": False, "seed": 0, "max_shard_size": "500MB"}

for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


def auto_threads(value: str, load: str) -> int:
    """``--threads``: an int, or ``auto`` = 2 when the 1-minute load average is below 0.5, else 1 (two OpenMP
    threads on two shared, busy cores stall at every barrier; one thread degrades gracefully)."""
    if value != "auto":
        return int(value)
    return 2 if float(load.split()[0]) < 0.5 else 1


def _log(msg: str) -> None:
    print(msg, flush=True)


def _stamp_ok(folder: Path, stamp: dict) -> bool:
    f = folder / ".bench_stamp.json"
    return f.is_file() and json.loads(f.read_text()) == stamp


def _write_stamp(folder: Path, stamp: dict) -> None:
    (folder / ".bench_stamp.json").write_text(json.dumps(stamp, sort_keys=True))


def base_stamp(base: Path) -> str:
    """Identity of the generated base: its config and shard index (changes when it is regenerated)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        f = base / name
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def prepare_110m() -> dict:
    """Base, 4 full experts, 4 LoRA experts and the 4 task data files of the ~110M model."""
    from merge_speed import prepare_models

    base, experts = prepare_models()
    bstamp = base_stamp(base)
    from moerge.testing import tiny

    extra = [WORK / f"expert_{i}" for i in range(len(experts), N_EXPERTS)]
    for i, e in enumerate(extra, start=len(experts)):
        stamp = {"base": bstamp, "seed": 1 + i, "scale": EXPERT_SCALE}
        if not _stamp_ok(e, stamp):
            _log(f"generating {e.name} ...")
            shutil.rmtree(e, ignore_errors=True)
            tiny.make_full_expert(base, e, seed=1 + i, scale=EXPERT_SCALE)
            _write_stamp(e, stamp)
    full = [*experts, *extra][:N_EXPERTS]
    loras = []
    for i in range(N_EXPERTS):
        d = WORK / f"lora_{i}"
        stamp = {"base": bstamp, "seed": 101 + i, **{k: list(v) if isinstance(v, tuple) else v for k, v in LORA.items()}}
        if not _stamp_ok(d, stamp):
            _log(f"generating {d.name} ...")
            shutil.rmtree(d, ignore_errors=True)
            tiny.make_lora_expert(base, d, seed=101 + i, r=LORA["r"], alpha=LORA["alpha"], scale=LORA["scale"],
                                  target_modules=LORA["target_modules"])
            _write_stamp(d, stamp)
        loras.append(d)
    data = {t: WORK / "data" / f"{t}.jsonl" for t in TASKS}
    for t, f in data.items():
        if not f.is_file():
            tiny.make_task_data(f, t, 32, seed=0)
    return {"base": base, "full": full, "lora": loras, "data": data, "stamp": bstamp}


def routed_recipe(models: dict, kind: str, dtype: str = "float32", sources: list[Path] | None = None,
                  calibrate: bool = True, shard_size: str = "1GB") -> dict:
    if sources is None:
        sources = models["lora"] if kind == "lora" else models["full"]
    experts = []
    for i, s in enumerate(sources):
        e: dict = {"name": TASKS[i], "source": str(s)}
        if calibrate:
            e["calibration"] = {"data": str(models["data"][TASKS[i]]), "max_samples": 32, "chat_template": True}
        experts.append(e)
    return {
        "base": str(models["base"]),
        "dtype": dtype,
        "experts": experts,
        "merge": {"method": "ties", "density": 0.5},
        "routing": {"select": {"all": True}, "modules": "mlp", "expert": {"kind": kind, **KIND_PARAMS[kind]},
                    "router": {"level": "sequence", "init": "prototype" if calibrate else "uniform", "top_k": 1}},
        "output": {"shard_size": shard_size},
    }


def build_routed(models: dict, kind: str, dtype: str = "float32", calibrate: bool = True) -> Path:
    """The cached moerge build of ``kind`` at ``dtype`` (``routed/<kind>-<dtype>``; ``-uniform`` without the
    prototype calibration: same tensors and bytes, routers left uniform)."""
    from moerge import build
    from moerge.recipe import recipe_from_dict

    raw = routed_recipe(models, kind, dtype, calibrate=calibrate)
    out = WORK / "routed" / f"{kind}-{dtype}{'' if calibrate else '-uniform'}"
    stamp = {"base": models["stamp"], "recipe": raw}
    if _stamp_ok(out, stamp):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _log(f"building {out.relative_to(HERE)} ...")
    t0 = time.perf_counter()
    build(recipe_from_dict(raw), out, force=True, progress=False)
    _write_stamp(out, stamp)
    _log(f"  done in {time.perf_counter() - t0:.1f} s")
    return out


def prepare_big() -> dict:
    """The ~350M base and its 4 full experts (for build_memory)."""
    from moerge.testing import tiny

    root = WORK / "big"
    base = root / "base"
    stamp = {"model": BIG_MODEL, "version": 1}
    if not _stamp_ok(base, stamp):
        _log(f"generating {base.relative_to(HERE)} (~350M) ...")
        shutil.rmtree(base, ignore_errors=True)
        tiny.make_base(base, **BIG_MODEL)
        _write_stamp(base, stamp)
    bstamp = base_stamp(base)
    full = []
    for i in range(N_EXPERTS):
        e = root / f"expert_{i}"
        s = {"base": bstamp, "seed": 1 + i, "scale": EXPERT_SCALE}
        if not _stamp_ok(e, s):
            _log(f"generating {e.relative_to(HERE)} ...")
            shutil.rmtree(e, ignore_errors=True)
            tiny.make_full_expert(base, e, seed=1 + i, scale=EXPERT_SCALE)
            _write_stamp(e, s)
        full.append(e)
    return {"base": base, "full": full, "lora": [], "data": {}, "stamp": bstamp}


def n_params(folder: Path) -> int:
    from moerge.io.index import CheckpointIndex

    total = 0
    for info in CheckpointIndex.from_folder(folder).tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        total += n
    return total
