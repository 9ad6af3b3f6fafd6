"""Benchmark (issue 11, "Scale"): what a build costs as the work grows, side by side with mergekit in one run.

    python bench/scale.py [--quick] [--section layer,rss,plan] [--write] [--threads N] [--work DIR] [--keep]

Three sections (``--section`` picks any of them; all by default):

* ``layer`` - per-layer cost at real Mistral-7B shapes (hidden 4096, intermediate 14336, 32 / 8 heads: q/o
  4096 x 4096, k/v 1024 x 4096, MLP 3 x 4096 x 14336), 4 experts, bf16 on disk, on a one-layer synthetic pool
  (``synthetic_pool.py``: deltas = a decaying rank-64 part + full-rank noise, vocabulary 256).  On the same files in
  the same run: ``moerge build`` of a static TIES recipe and ``mergekit-yaml`` TIES (same density, both end to end,
  child processes, wall / peak RSS, startup measured by ``moerge validate`` / ``mergekit-yaml --help``); in process:
  reading + upcasting the tensors, the TIES merge math, the conflict analysis (``UnitStats``), bit1, and twin r16
  with the exact and the randomized factorisation (``moerge.linalg``), summed over the layer's 7 matrices x 4
  experts (``--exact per-shape``, the default, times the exact SVD on one expert per distinct shape and counts it
  for every matrix of that shape and every expert; ``--exact all`` times all 28).  Each cost is extrapolated to the
  whole Mistral-7B x 4 build: in-process costs x 32 layers (+ the embeddings' share for the merge math), end-to-end
  runs (moerge TIES, mergekit TIES, and a moerge twin r16 build of every attention and MLP unit) as the 1-layer
  wall - one layer + one layer x (32 + the embeddings' share), and the exact / randomized twin as estimates (the
  moerge TIES build + 32 x the layer's factorisations + the factors' bytes at the measured I/O rate).  Targets:
  randomized >= 10x faster than exact with error within 1%; twin r16 7B x 4 <= mergekit TIES (moonshot 0.3x).
* ``rss`` - peak anonymous RSS (``RssAnon``), peak total RSS and wall time of real streaming builds vs model size:
  llama pools of 114M, 347M, 1B and the largest preset the disk allows (``max``: free disk - 15 GB margin, and the
  RAM estimate 5 x (experts + 1) x largest tensor x 4 B), bf16, 4 experts.  Builds: static TIES and a routed twin r16 of
  every MLP (``select: {all: true}, router: {init: uniform}``: no calibration data).  Table + ``bench/scale_rss.png``.
  The issue asks for a flat anonymous-RSS line (within 15% from 347M up); the table prints the largest tensor x
  (experts + 1) in fp32, which is what the RSS tracks while every job loads whole tensors.  Twin builds are skipped
  above ``--twin-max-params`` (default: no cap; twin factorises by randomized SVD over row blocks, ``svd: auto``);
  ``--twin-set KEY=VALUE`` passes ``--set`` overrides to the twin builds (e.g. ``routing.expert.svd=exact``).
* ``plan`` - ``moerge plan`` of a 70B x 8 pool of sparse files (Llama-3-70B headers, config and index, 30 shards of
  ~5 GB each, data a hole: no disk), twin r16 on every attention and MLP unit (``select: {all: true}``, no conflict
  analysis); timed (goal < 60 s), its output shown, and the output bytes computed independently as a cross-check.

``--quick`` shrinks everything (layer: a quarter-width Mistral layer; rss: 3M and 27M pools; plan unchanged: it reads
headers only) and takes 2-3 minutes.  Full run times measured on this project's 2-core machine with ``--threads 1``
while another job kept the load at 1.5-4: layer 13.5 min (end-to-end runs 8 min, in process 6 min of which 5 min the
exact SVDs at one expert per shape; writing the two pools, once, 76 s), rss 35 min (114M..3B TIES, twin at 114M and 347M), plan 5 s.  Pools go to ``bench/_work/scale``
(``--work``, ``$MOERGE_BENCH_WORK``); the rss pools are deleted after use unless ``--keep``.  ``--write`` appends the
tables to ``bench/RESULTS.md`` under ``## scale (issue 11)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch
from _measure import Run, child_env, loadavg, machine, measure, mib, record, venv_exe, warm_page_cache
from synthetic_pool import PRESETS, DeltaSpec, ModelShape, Pool, layer_shape, write_pool

HEADING = "## scale (issue 11)"
SECTIONS = ("layer", "rss", "plan")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GB = 10**9


# ------------------------------------------------------------------------------------------------ helpers


def secs(s: float) -> str:
    """Seconds as ``0.123 s`` / ``12.3 s`` / ``4.5 min`` / ``1.2 h``."""
    if s < 1:
        return f"{s:.3f} s"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def gbytes(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def auto_threads(value: str) -> int:
    """``--threads``: an int, or ``auto`` = every core of this process when the 1-minute load average is below 0.5,
    else 1 (OpenMP threads on shared, busy cores stall at every barrier: a 1024 x 1024 SVD took 0.4 s on one
    thread and 2 to 15 s on two while two other jobs ran on this 2-core machine)."""
    if value != "auto":
        return int(value)
    return len(os.sched_getaffinity(0)) if float(loadavg().split()[0]) < 0.5 else 1


def moerge_cmd() -> list[str]:
    """The ``moerge`` console script of this environment, else ``python -m moerge``."""
    exe = venv_exe("moerge")
    return [exe] if exe else [sys.executable, "-m", "moerge"]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def write_yaml(path: Path, obj: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def cached_pool(root: Path, shape: ModelShape, n_experts: int, delta: DeltaSpec, seed: int = 0,
                shard_size: int = 5 * GB) -> Pool:
    """``write_pool`` unless ``root`` already holds the same pool (a stamp file records the arguments)."""
    stamp = json.dumps({"shape": dataclasses.asdict(shape), "experts": n_experts, "delta": dataclasses.asdict(delta),
                        "seed": seed, "shard_size": shard_size, "version": 1}, sort_keys=True)
    stamp_file = root / "pool.json"
    folders = [root / "base", *(root / f"expert_{i}" for i in range(n_experts))]
    if stamp_file.is_file() and stamp_file.read_text() == stamp and all((f / "config.json").is_file() for f in folders):
        return Pool(root, folders[0], folders[1:], shape, torch.bfloat16)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    log(f"writing the {shape.name} pool ({shape.n_params / 1e6:,.0f}M params x {n_experts + 1} models) in {root} ...")
    pool = write_pool(root, shape, n_experts, delta=delta, seed=seed, shard_size=shard_size)
    stamp_file.write_text(stamp)
    log(f"  written in {secs(time.perf_counter() - t0)}")
    return pool


def ties_recipe(pool: Pool, density: float) -> dict:
    return {"base": str(pool.base), "dtype": "bfloat16",
            "experts": [{"name": f"e{i}", "source": str(p)} for i, p in enumerate(pool.experts)],
            "merge": {"method": "ties", "density": density, "lambda": 1.0}, "output": {"shard_size": "5GB"}}


def mergekit_config(pool: Pool, density: float) -> dict:
    return {"merge_method": "ties", "base_model": str(pool.base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": density}} for p in pool.experts],
            "parameters": {"normalize": True, "lambda": 1.0}, "dtype": "bfloat16"}


def twin_recipe(pool: Pool, density: float, modules: str = "mlp", rank: int = 16) -> dict:
    return {**ties_recipe(pool, density),
            "routing": {"select": {"all": True}, "modules": modules, "expert": {"kind": "twin", "rank": rank},
                        "router": {"init": "uniform"}}}


# ------------------------------------------------------------------------------------------------ layer: in process


@dataclass
class MatrixTimes:
    """In-process costs of one linear of the layer, all experts (seconds)."""

    name: str
    shape: tuple[int, int]
    read: float = 0.0
    ties: float = 0.0
    conflict: float = 0.0
    bit1: float = 0.0
    rand: float = 0.0
    exact: float = 0.0
    exact_measured: str = ""  # "4/4" experts timed, or "1/4 (x4)", or "shape of q_proj"
    err_exact: float = float("nan")
    err_rand: float = float("nan")


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _load(pool: Pool, name: str) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """(seconds, base fp32 (O, I), experts fp32) read from the pool's files as moerge reads them (mmap + upcast)."""
    from moerge.io.sources import ModelFolder

    def read() -> tuple[torch.Tensor, list[torch.Tensor]]:
        models = [ModelFolder(f) for f in pool.folders]
        tensors = [m.get(name).float() for m in models]  # each (O, I)
        return tensors[0], tensors[1:]

    t, (base, experts) = _timed(read)
    return t, base, experts


def time_matrix(pool: Pool, name: str, args: argparse.Namespace, exact_cache: dict) -> MatrixTimes:
    """Every in-process cost of one linear (merge math, conflict stats, bit1, twin exact / randomized)."""
    from moerge.analysis.conflict import UnitStats
    from moerge.kinds.bit1 import bit1_delta
    from moerge.linalg import low_rank_factors, relative_error
    from moerge.merge.methods import METHODS, MergeParams, merge_tensor

    t_read, base, experts = _load(pool, name)
    mt = MatrixTimes(name, (base.shape[0], base.shape[1]), read=t_read)
    params = MergeParams(weights=(1.0,) * len(experts), density=args.density, normalize=True)
    mt.ties, merged = _timed(lambda: merge_tensor(METHODS.get("ties"), base, [e - base for e in experts], params, name))
    stats = UnitStats(len(experts), args.density)
    mt.conflict, _ = _timed(lambda: stats.add(torch.stack([e - base for e in experts]), merged - base))  # (N, O, I)
    mt.bit1, _ = _timed(lambda: [bit1_delta(e - merged) for e in experts])
    factors = []
    for e in experts:
        t, f = _timed(lambda e=e: low_rank_factors(e - merged, args.rank, method="randomized"))
        mt.rand += t
        factors.append(f)
    _time_exact(mt, merged, experts, args, exact_cache)
    mt.err_rand = relative_error(experts[0] - merged, *factors[0])
    return mt


def _time_exact(mt: MatrixTimes, merged: torch.Tensor, experts: list[torch.Tensor], args: argparse.Namespace,
                cache: dict) -> None:
    """Exact factorisation time: every expert (``--exact all``) or one expert per distinct shape, counted x experts."""
    from moerge.linalg import low_rank_factors, relative_error

    n = len(experts) if args.exact == "all" else (0 if mt.shape in cache else 1)
    for e in experts[:n]:
        t, f = _timed(lambda e=e: low_rank_factors(e - merged, args.rank, method="exact"))
        mt.exact += t
        if e is experts[0]:
            mt.err_exact = relative_error(experts[0] - merged, *f)
    if args.exact == "all":
        mt.exact_measured = f"{len(experts)}/{len(experts)}"
    elif n:
        cache[mt.shape] = (mt.exact, mt.name.split(".")[-2])
        mt.exact *= len(experts)
        mt.exact_measured = f"1/{len(experts)} (x{len(experts)})"
    else:
        per_expert, first = cache[mt.shape]
        mt.exact, mt.exact_measured = per_expert * len(experts), f"as {first} (same shape)"


# ------------------------------------------------------------------------------------------------ layer: end to end


@dataclass
class EndToEnd:
    """Child-process runs of both tools on the 1-layer and the 2-layer pool (medians over ``--reps``): the
    difference of the two is one decoder layer's end-to-end cost, free of start-up and embeddings."""

    walls: dict[tuple[str, int], float]  # (tool, layers) -> seconds
    anon: dict[tuple[str, int], int]  # (tool, layers) -> peak anonymous RSS
    startup: dict[str, float]  # tool -> `moerge validate` / `mergekit-yaml --help` seconds (for reference)
    read_bytes: dict[int, int]  # layers -> input bytes (base + experts)
    out_bytes: dict[tuple[str, int], int]

    def per_layer(self, tool: str) -> float:
        return max(1e-3, self.walls[tool, 2] - self.walls[tool, 1])

    def fixed(self, tool: str) -> float:
        """Start-up + the tiny embeddings: the 1-layer wall minus one layer."""
        return self.walls[tool, 1] - self.per_layer(tool)

    def layer_bytes(self, tool: str) -> int:
        """Bytes read + written for one decoder layer."""
        return self.read_bytes[2] - self.read_bytes[1] + self.out_bytes[tool, 2] - self.out_bytes[tool, 1]


def _e2e_commands(pools: dict[int, Pool], args: argparse.Namespace, work: Path) -> dict[tuple[str, int], list[str]]:
    mk = venv_exe("mergekit-yaml")
    if mk is None:
        raise SystemExit("mergekit-yaml not found (bash tools/setup.sh dev installs mergekit 0.1.5 as a peer)")
    cmds = {}
    for n, pool in pools.items():
        recipe = write_yaml(work / f"ties_{n}.yml", ties_recipe(pool, args.density))
        mk_cfg = write_yaml(work / f"mergekit_ties_{n}.yml", mergekit_config(pool, args.density))
        cmds["moerge", n] = [*moerge_cmd(), "build", str(recipe), str(work / f"out_moerge_{n}"), "--force", "--quiet"]
        cmds["mergekit", n] = [mk, str(mk_cfg), str(work / f"out_mergekit_{n}"), "--no-cuda", "--quiet"]
        twin = write_yaml(work / f"twin_{n}.yml", twin_recipe(pool, args.density, "both", args.rank))
        cmds["twin", n] = [*moerge_cmd(), "build", str(twin), str(work / f"out_twin_{n}"), "--force", "--quiet"]
    cmds["moerge", 0] = [*moerge_cmd(), "validate", str(work / "ties_1.yml")]
    cmds["mergekit", 0] = [mk, "--help"]
    return cmds


def run_end_to_end(pools: dict[int, Pool], args: argparse.Namespace, env: dict[str, str], work: Path) -> EndToEnd:
    """``moerge build`` and ``mergekit-yaml`` TIES on the 1- and 2-layer pools, ``--reps`` times each (medians)."""
    cmds = _e2e_commands(pools, args, work)
    for pool in pools.values():
        warm_page_cache(pool.folders)
    runs: dict[tuple[str, int], list[Run]] = {k: [] for k in cmds}
    out_bytes: dict[tuple[str, int], int] = {}
    for _ in range(args.reps):
        for (tool, n), cmd in cmds.items():
            out = work / f"out_{tool}_{n}"
            shutil.rmtree(out, ignore_errors=True)
            runs[tool, n].append(measure(f"{tool} {n}", cmd, env))
            if n:
                out_bytes[tool, n] = folder_bytes(out)
                shutil.rmtree(out, ignore_errors=True)
            log(f"  {tool} ({n} layer{'s' if n > 1 else ''}{', start-up' if not n else ''}): "
                f"{secs(runs[tool, n][-1].wall_s)}")
    walls = {k: statistics.median(r.wall_s for r in v) for k, v in runs.items()}
    anon = {k: max(r.peak_anon for r in v) for k, v in runs.items()}
    return EndToEnd({k: v for k, v in walls.items() if k[1]}, anon, {t: walls[t, 0] for t in ("moerge", "mergekit")},
                    {n: sum(folder_bytes(f) for f in p.folders) for n, p in pools.items()}, out_bytes)


# ------------------------------------------------------------------------------------------------ layer: report


@dataclass
class Extrapolation:
    target: ModelShape
    n_experts: int
    rank: int
    rows: list[tuple[str, float, float, str]] = field(default_factory=list)  # (what, layer s, target s, how)

    def embed_share(self) -> float:
        """The target's non-layer elements (embeddings, lm_head, final norm) in units of one decoder layer."""
        layer = sum(math.prod(s) for _, s in self.target.layer_tensors(0))
        return (self.target.n_params - self.target.layers * layer) / layer

    def factor_bytes(self) -> int:
        """bf16 bytes of the twin factors of every linear of one layer (U (O, r) + V (r, I) per expert)."""
        return self.n_experts * sum(self.rank * (s[0] + s[1]) for _, s in self.target.layer_tensors(0) if len(s) == 2) * 2


def io_rate(e2e: EndToEnd, ties_math: float) -> float:
    """moerge's I/O rate: one layer's bytes read + written over its end-to-end time less its merge math (bytes/s);
    the effective rate (whole per-layer time) when the merge math hides the I/O."""
    t = e2e.per_layer("moerge")
    io_time = t - ties_math
    return e2e.layer_bytes("moerge") / (io_time if io_time > 0.1 * t else t)


def extrapolate(mts: list[MatrixTimes], e2e: EndToEnd, target: ModelShape, n_experts: int, rank: int) -> Extrapolation:
    """Rows (what, measured per layer, extrapolated to ``target``, how)."""
    ex = Extrapolation(target, n_experts, rank)
    L, emb = target.layers, ex.embed_share()
    tot = {k: sum(getattr(m, k) for m in mts) for k in ("read", "ties", "conflict", "bit1", "rand", "exact")}
    e2e7 = {t: e2e.fixed(t) + e2e.per_layer(t) * (L + emb) for t in ("moerge", "mergekit")}
    f_io = ex.factor_bytes() / io_rate(e2e, tot["ties"])
    how_e2e = f"1-layer wall - per layer + per layer x ({L} + {emb:.2f})"
    ex.rows = [
        ("mergekit TIES (`mergekit-yaml`, end to end)", e2e.per_layer("mergekit"), e2e7["mergekit"], how_e2e),
        ("moerge TIES (`moerge build`, end to end)", e2e.per_layer("moerge"), e2e7["moerge"], how_e2e),
        ("moerge read + upcast (in process)", tot["read"], tot["read"] * (L + emb), f"x ({L} + {emb:.2f})"),
        ("moerge TIES merge math (in process)", tot["ties"], tot["ties"] * (L + emb), f"x ({L} + {emb:.2f})"),
        ("conflict analysis `UnitStats` (in process)", tot["conflict"], tot["conflict"] * L, f"x {L}"),
        ("bit1 deltas (in process)", tot["bit1"], tot["bit1"] * L, f"x {L}"),
        (f"twin r{rank} exact SVD (in process)", tot["exact"], tot["exact"] * L, f"x {L}"),
        (f"twin r{rank} randomized (in process)", tot["rand"], tot["rand"] * L, f"x {L}"),
    ]
    for label, key in (("exact", "exact"), ("randomized", "rand")):
        ex.rows.append((f"twin r{rank} build, {label} SVD (estimate)", e2e.per_layer("moerge") + tot[key] + f_io,
                        e2e7["moerge"] + (tot[key] + f_io) * L, ("moerge TIES + (SVDs + factor bytes / I/O rate) x "
                        f"{L}")))
    twin7 = e2e.fixed("twin") + e2e.per_layer("twin") * L + e2e.per_layer("moerge") * emb
    ex.rows.append((f"**moerge twin r{rank}, every unit (`moerge build`, end to end)**", e2e.per_layer("twin"), twin7,
                    f"1-layer wall - per layer + per layer x {L} + TIES per layer x {emb:.2f} (embeddings)"))
    return ex


def layer_verdict(mts: list[MatrixTimes], e2e: EndToEnd, ex: Extrapolation) -> list[str]:
    mk7, twin7 = ex.rows[0][2], ex.rows[-1][2]
    rand, exact = sum(m.rand for m in mts), sum(m.exact for m in mts)
    ratios = [m.err_rand / m.err_exact for m in mts if not math.isnan(m.err_exact) and m.err_exact > 0]
    rate = io_rate(e2e, sum(m.ties for m in mts))
    noisy = [t for t in ("moerge", "mergekit") if e2e.per_layer(t) < 0.5 * (e2e.walls[t, 1] - e2e.startup[t])]
    warn = [(f"- **noisy**: for {', '.join(noisy)} the 2-layer minus 1-layer wall is under half the 1-layer run's "
             "time beyond start-up (one layer is almost all of that pool): rerun on a quiet machine with `--reps 3`")
            ] if noisy else []
    return [*warn,
        (f"- randomized vs exact on the layer: **{exact / rand:.1f}x** faster (target >= 10x: "
         f"{'met' if exact / rand >= 10 else 'NOT met'}); err_rand / err_exact on expert 0, worst over {len(ratios)} "
         f"matrices with an exact SVD: **{max(ratios, default=float('nan')):.5f}** (target <= 1.01)"),
        (f"- twin r{ex.rank} build of {ex.target.name} x {ex.n_experts} (measured end to end on the layer, every unit "
         f"routed, `svd: auto` = randomized at these shapes), extrapolated: {secs(twin7)} = "
         f"**{twin7 / mk7:.2f}x** mergekit TIES ({secs(mk7)}; target <= 1: {'met' if twin7 <= mk7 else 'NOT met'}; "
         "moonshot 0.3x)"),
        (f"- end to end, 1-layer / 2-layer pool: moerge {secs(e2e.walls['moerge', 1])} / {secs(e2e.walls['moerge', 2])}, "
         f"mergekit {secs(e2e.walls['mergekit', 1])} / {secs(e2e.walls['mergekit', 2])} (start-up alone: moerge "
         f"validate {secs(e2e.startup['moerge'])}, mergekit-yaml --help {secs(e2e.startup['mergekit'])}); peak anon "
         f"RSS on the 2-layer pool: moerge {mib(e2e.anon['moerge', 2])}, mergekit {mib(e2e.anon['mergekit', 2])}"),
        (f"- I/O per layer: read {gbytes(e2e.read_bytes[2] - e2e.read_bytes[1])}, written (moerge) "
         f"{gbytes(e2e.out_bytes['moerge', 2] - e2e.out_bytes['moerge', 1])}; moerge I/O rate (bytes / (per-layer "
         f"time - merge math)) {rate / 1e6:,.0f} MB/s; effective (bytes / per-layer time): moerge "
         f"{e2e.layer_bytes('moerge') / e2e.per_layer('moerge') / 1e6:,.0f} MB/s, mergekit "
         f"{e2e.layer_bytes('mergekit') / e2e.per_layer('mergekit') / 1e6:,.0f} MB/s; the 7B x 4 build reads "
         f"{gbytes(ex.target.n_params * 2 * (ex.n_experts + 1))} and writes {gbytes(ex.target.n_params * 2)} "
         f"(+ {gbytes(ex.factor_bytes() * ex.target.layers)} of twin factors)"),
    ]


def matrix_table(mts: list[MatrixTimes]) -> list[str]:
    lines = [("| matrix | shape | read | TIES math | UnitStats | bit1 | exact (all experts) | exact timed | randomized "
              "(all experts) | speedup | err exact | err rand | ratio |"), "|---|---|" + "---:|" * 8 + "---:|---:|---:|"]
    for m in mts:
        ratio = m.err_rand / m.err_exact if not math.isnan(m.err_exact) and m.err_exact > 0 else float("nan")
        lines.append(f"| {m.name.split('layers.0.')[-1]} | {m.shape[0]} x {m.shape[1]} | {secs(m.read)} | {secs(m.ties)} | "
                     f"{secs(m.conflict)} | {secs(m.bit1)} | {secs(m.exact)} | {m.exact_measured} | {secs(m.rand)} | "
                     f"{m.exact / m.rand:.1f}x | {m.err_exact:.5f} | {m.err_rand:.5f} | {ratio:.5f} |")
    return lines


def layer_target(args: argparse.Namespace) -> ModelShape:
    """The model the layer costs are extrapolated to (``--quick``: a quarter-width one)."""
    full = PRESETS[args.layer_preset]
    if not args.quick:
        return full
    return dataclasses.replace(full, name=f"{full.name}/4", hidden=full.hidden // 4, intermediate=full.intermediate // 4,
                               heads=full.heads // 4, kv_heads=max(1, full.kv_heads // 4))


def section_layer(args: argparse.Namespace, env: dict[str, str], work: Path) -> list[str]:
    target = layer_target(args)
    root = work / "layer" / target.name.replace("/", "_")
    pools = {n: cached_pool(root / f"pool_{n}", layer_shape(target, layers=n, vocab=256), args.experts, DeltaSpec())
             for n in (1, 2)}
    log("end to end: moerge build / mergekit-yaml TIES on the 1- and 2-layer pools ...")
    e2e = run_end_to_end(pools, args, env, root)
    mts, cache = [], {}
    for lin in LINEARS:
        m = time_matrix(pools[1], f"model.layers.0.{lin}.weight", args, cache)
        mts.append(m)
        log(f"  {lin}: exact {secs(m.exact)} ({m.exact_measured}), randomized {secs(m.rand)}, ties {secs(m.ties)}, "
            f"conflict {secs(m.conflict)}, bit1 {secs(m.bit1)}")
    ex = extrapolate(mts, e2e, target, args.experts, args.rank)
    mk7 = ex.rows[0][2]
    layer = pools[2].shape.n_params - pools[1].shape.n_params
    table = [(f"| cost | one {target.name} layer x {args.experts} experts | {target.name} x {args.experts} "
              "(extrapolated) | / mergekit TIES | how |"), "|---|---:|---:|---:|---|"]
    table += [f"| {what} | {secs(a)} | {secs(b)} | {b / mk7:.3f} | {how} |" for what, a, b, how in ex.rows]
    head = (f"#### layer: one {target.name} decoder layer ({layer / 1e6:.0f}M params per model), {args.experts} experts, "
            f"bf16, TIES density {args.density}, twin rank {args.rank}; extrapolated to {target.name} "
            f"({target.n_params / 1e9:.2f}B params, {target.layers} layers, vocab {target.vocab})")
    return [head, "", *table, "", *layer_verdict(mts, e2e, ex), "", ("<details><summary>per matrix (in process, "
            "one layer)</summary>"), "", *matrix_table(mts), "", "</details>"]


# ------------------------------------------------------------------------------------------------ rss


def ram_estimate(shape: ModelShape, n_experts: int) -> int:
    """Anonymous memory of a build that loads whole fp32 tensors: 5 x (experts + 1) copies of the largest one + 1.5 GB
    (measured: the 1B x 4 TIES build peaked at 5.4 GB anonymous, ~20 x its 262 MB embedding: two jobs at once,
    each with base, experts, task vectors and the merge's stacked buffers)."""
    return 5 * (n_experts + 1) * shape.largest_tensor() * 4 + int(1.5 * GB)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


def pick_sizes(names: list[str], n_experts: int, work: Path, margin: int) -> list[tuple[str, ModelShape | None, str]]:
    """[(name, shape or None when skipped, note)]; ``max`` is the largest preset fitting disk and RAM."""
    free = shutil.disk_usage(work).free
    ram = mem_available()
    fits: list[tuple[str, ModelShape | None, str]] = []
    for name in names:
        cands = [s for s in sorted(PRESETS.values(), key=lambda s: s.n_params) if s.name != "llama3-70b"] \
            if name == "max" else [PRESETS[name]]
        ok = [s for s in cands if (n_experts + 2) * s.n_params * 2 + margin <= free + _pool_bytes(work, s.name)
              and ram_estimate(s, n_experts) <= ram]
        if ok and name == "max" and ok[-1].name in {f[0] for f in fits}:
            fits.append(("max", None, f"= {ok[-1].name}, already measured"))
        elif ok:
            fits.append((ok[-1].name, ok[-1], "largest that fits" if name == "max" else ""))
        else:
            fits.append((name, None, (f"skipped: needs {gbytes((n_experts + 2) * cands[0].n_params * 2 + margin)} disk "
                                     f"(free {gbytes(free)}) and ~{gbytes(ram_estimate(cands[0], n_experts))} RAM "
                                     f"(available {gbytes(ram)})")))
    return fits


def _pool_bytes(work: Path, name: str) -> int:
    """Bytes of a pool kept from an earlier run (``--keep``): reused, so they count as free."""
    pool = work / "rss" / name / "pool"
    return sum(f.stat().st_size for f in pool.rglob("*") if f.is_file()) if pool.is_dir() else 0


@dataclass
class RssRow:
    name: str
    shape: ModelShape
    n_experts: int
    write_s: float = 0.0
    validate: Run | None = None
    builds: dict[str, Run | str] = field(default_factory=dict)  # "ties" | "twin" -> Run, or a note when skipped
    estimates: dict[str, int] = field(default_factory=dict)  # "ties" | "twin" -> `moerge plan`'s peak RAM estimate


def plan_estimate(recipe: Path, env: dict[str, str], extra: list[str]) -> int | None:
    """Bytes of the peak-RAM estimate `moerge plan` prints for ``recipe`` (None when it prints none)."""
    run = measure("plan", [*moerge_cmd(), "plan", str(recipe), *extra], env)
    m = re.search(r"peak RAM estimate: ([\d.]+) GiB", run.output)
    return int(float(m.group(1)) * 2**30) if m else None


def rss_builds(pool: Pool, row: RssRow, args: argparse.Namespace, env: dict[str, str], root: Path) -> None:
    recipes = {"ties": ties_recipe(pool, args.density), "twin": twin_recipe(pool, args.density, "mlp", args.rank)}
    row.validate = measure("validate", [*moerge_cmd(), "validate", str(write_yaml(root / "ties.yml", recipes["ties"]))], env)
    for kind in args.builds:
        if kind == "twin" and not args.twin_set and args.twin_max_params and pool.shape.n_params > args.twin_max_params:
            row.builds[kind] = f"skipped (> {args.twin_max_params / 1e6:.0f}M params, --twin-max-params)"
            continue
        recipe = write_yaml(root / f"{kind}.yml", recipes[kind])
        extra = [a for kv in (args.twin_set if kind == "twin" else []) for a in ("--set", kv)]
        est = plan_estimate(recipe, env, extra)
        if est is not None:
            row.estimates[kind] = est
        out = root / f"out_{kind}"
        log(f"  {row.name}: moerge build {kind} ...")
        run = measure(kind, [*moerge_cmd(), "build", str(recipe), str(out), "--force", "--quiet", *extra], env)
        row.builds[kind] = run
        log(f"    {secs(run.wall_s)}, peak anon {mib(run.peak_anon)}, peak total {mib(run.peak_rss)}")
        shutil.rmtree(out, ignore_errors=True)


def rss_table(rows: list[RssRow]) -> list[str]:
    lines = [("| pool | params | experts | largest tensor | x (experts + 1) fp32 | validate anon | TIES wall | TIES anon | "
             "TIES plan's estimate | TIES total | twin wall | twin anon | twin plan's estimate | twin total |"),
             "|---|---:|---:|---:|---:|---:|" + "---:|" * 8]
    for r in rows:
        cells = []
        for kind in ("ties", "twin"):
            b = r.builds.get(kind, "not run")
            est = mib(r.estimates[kind]) if kind in r.estimates else ""
            cells += [secs(b.wall_s), mib(b.peak_anon), est, mib(b.peak_rss)] if isinstance(b, Run) else [b, "", est, ""]
        big = r.shape.largest_tensor()
        lines.append(f"| {r.name} | {r.shape.n_params / 1e6:,.0f}M | {r.n_experts} | {big / 1e6:.1f}M | "
                     f"{mib(big * 4 * (r.n_experts + 1))} | {mib(r.validate.peak_anon) if r.validate else ''} | "
                     + " | ".join(cells) + " |")
    return lines


def flatness(rows: list[RssRow], kind: str, from_params: float = 3.4e8) -> str:
    runs = [(r.shape.n_params, r.builds[kind]) for r in rows if isinstance(r.builds.get(kind), Run)
            and r.shape.n_params >= from_params]
    if len(runs) < 2:
        return f"{kind}: fewer than two sizes >= 347M measured"
    anon = [b.peak_anon for _, b in runs]  # type: ignore[union-attr]
    spread = max(anon) / min(anon) - 1
    return (f"{kind}: peak anon RSS from {runs[0][0] / 1e6:,.0f}M to {runs[-1][0] / 1e6:,.0f}M params: "
            f"{mib(min(anon))} .. {mib(max(anon))}, spread **{100 * spread:.0f}%** (target <= 15%: "
            f"{'met' if spread <= 0.15 else 'NOT met'})")


def rss_plot(rows: list[RssRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, color in (("ties", "tab:blue"), ("twin", "tab:orange")):
        pts = [(r.shape.n_params, r.builds[kind]) for r in rows if isinstance(r.builds.get(kind), Run)]
        if pts:
            x = [p for p, _ in pts]
            ax.plot(x, [b.peak_anon / 2**30 for _, b in pts], "o-", color=color, label=f"{kind}: peak anon RSS")
            ax.plot(x, [b.peak_rss / 2**30 for _, b in pts], "o--", color=color, alpha=0.5, label=f"{kind}: peak total RSS")
    x = [r.shape.n_params for r in rows]
    ax.plot(x, [r.shape.largest_tensor() * 4 * (r.n_experts + 1) / 2**30 for r in rows], "k:",
            label="largest tensor x (experts + 1), fp32")
    ax.set_xscale("log")
    ax.set_xlabel("parameters per model")
    ax.set_ylabel("GiB")
    ax.set_title("moerge build memory vs model size (bf16 pools)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_rss(args: argparse.Namespace, env: dict[str, str], work: Path) -> list[str]:
    rows, notes = [], []
    for name, shape, note in pick_sizes(args.sizes, args.rss_experts, work, int(args.margin_gb * GB)):
        if shape is None:
            notes.append(f"- {name}: {note}")
            log(f"rss {name}: {note}")
            continue
        root = work / "rss" / name
        row = RssRow(name + (f" ({note})" if note else ""), shape, args.rss_experts)
        delta = DeltaSpec(rank=16, noise=2e-4)
        t0 = time.perf_counter()
        pool = cached_pool(root / "pool", shape, args.rss_experts, delta, shard_size=2 * GB)
        row.write_s = time.perf_counter() - t0
        rss_builds(pool, row, args, env, root)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    png = (HERE if args.write else work) / "scale_rss.png"  # bench/ only for a recorded run
    if rows:
        rss_plot(rows, png)
    return [(f"#### rss: streaming `moerge build` vs model size ({args.rss_experts} experts, bf16; twin r{args.rank} of "
            "every MLP, routers uniform)"), "", *rss_table(rows), "", *notes,
            *(f"- {flatness(rows, k)}" for k in args.builds), f"- plot: `{png.relative_to(REPO) if png.is_relative_to(REPO) else png}`"]


# ------------------------------------------------------------------------------------------------ plan


def expected_output(shape: ModelShape, n_experts: int, rank: int, modules: str, itemsize: int = 2) -> dict[str, int]:
    """Output bytes of a twin build routing every unit of ``modules``, computed from the shapes alone."""
    groups = ("self_attn", "mlp") if modules == "both" else ({"attention": "self_attn"}.get(modules, modules),)
    factors = sum(n_experts * min(rank, *s) * (s[0] + s[1]) * itemsize
                  for i in range(shape.layers) for n, s in shape.layer_tensors(i)
                  if len(s) == 2 and n.split(".")[3] in groups)
    router = (n_experts * shape.hidden + shape.hidden + 1 + n_experts) * itemsize  # prototypes, center, scale, bias
    base = shape.n_params * itemsize
    return {"base": base, "factors": factors, "router": router, "total": base + factors + router}


def _ints(pattern: str, text: str) -> int | None:
    m = re.search(pattern, text)
    return int(m.group(1).replace(",", "")) if m else None


def section_plan(args: argparse.Namespace, env: dict[str, str], work: Path) -> list[str]:
    shape = PRESETS[args.plan_preset]
    root = work / "plan" / shape.name
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    pool = write_pool(root / "pool", shape, args.plan_experts, sparse=True)
    t_write = time.perf_counter() - t0
    apparent = sum(folder_bytes(f) for f in pool.folders)
    used = sum(f.stat().st_blocks * 512 for d in pool.folders for f in d.glob("*.safetensors"))
    if used > 0.01 * apparent:
        raise SystemExit(f"{root}: the filesystem did not keep the files sparse ({gbytes(used)} used)")
    recipe = write_yaml(root / "twin.yml", twin_recipe(pool, args.density, "both", args.rank))
    log(f"plan: {shape.name} x {args.plan_experts} sparse pool ({gbytes(apparent)} apparent, {mib(used)} on disk, "
        f"written in {secs(t_write)}); moerge plan ...")
    run = measure("plan", [*moerge_cmd(), "plan", str(recipe)], env)
    exp = expected_output(shape, args.plan_experts, args.rank, "both")
    extra, base = _ints(r"([\d,]+) extra bytes", run.output), _ints(r"\(([\d,]+) bytes at", run.output)
    out = _ints(r"output[^\n\d]*([\d,]{5,})", run.output)
    checks = [f"factors: plan {extra:,} vs expected {exp['factors']:,} ({'equal' if extra == exp['factors'] else 'DIFFER'})"
              if extra is not None else "factors: plan printed no 'extra bytes'",
              f"base: plan {base:,} vs expected {exp['base']:,} ({'equal' if base == exp['base'] else 'DIFFER'})"
              if base is not None else "base: plan printed no base bytes",
              f"output (weights; routers written after, 'routers and gates aside'): plan {out:,} vs expected "
              f"{exp['total'] - exp['router']:,} ({'equal' if out == exp['total'] - exp['router'] else 'DIFFER'})"
              if out is not None else f"output: plan prints no output total yet; expected {exp['total']:,} bytes "
                                      f"({gbytes(exp['total'])}: base + factors + router {exp['router']:,})"]
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    shown = run.output.strip().splitlines()
    body = shown if len(shown) <= 16 else [*shown[:6], f"... ({len(shown) - 12} lines)", *shown[-6:]]
    return [(f"#### plan: `moerge plan` of {shape.name} x {args.plan_experts} (sparse files: {gbytes(apparent)} apparent, "
            f"{mib(used)} on disk; twin r{args.rank}, every attention and MLP unit, `select: {{all: true}}`)"), "",
            (f"- wall **{secs(run.wall_s)}** (goal < 60 s: {'met' if run.wall_s < 60 else 'NOT met'}), peak anon RSS "
            f"{mib(run.peak_anon)}, peak total {mib(run.peak_rss)}; pool written in {secs(t_write)}"),
            *(f"- {c}" for c in checks), "", "```", *body, "```"]


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", default=",".join(SECTIONS), help="comma-separated: layer,rss,plan")
    ap.add_argument("--quick", action="store_true", help="small shapes: a few minutes")
    ap.add_argument("--write", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--threads", default="auto", help="torch threads in process and OMP_NUM_THREADS of the children; "
                                                       "auto = every core when the machine is idle, else 1")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("MOERGE_BENCH_WORK", HERE / "_work")) / "scale")
    ap.add_argument("--keep", action="store_true", help="keep the rss / plan pools")
    ap.add_argument("--density", type=float, default=0.5, help="TIES density (moerge and mergekit)")
    ap.add_argument("--rank", type=int, default=16, help="twin rank")
    g = ap.add_argument_group("layer")
    g.add_argument("--layer-preset", default="mistral-7b", choices=sorted(PRESETS))
    g.add_argument("--experts", type=int, default=4)
    g.add_argument("--reps", type=int, default=1, help="end-to-end runs of each tool and pool (median)")
    g.add_argument("--exact", choices=("per-shape", "all"), default="per-shape",
                   help="time the exact SVD on one expert per distinct shape (default) or on all 28 matrices")
    g = ap.add_argument_group("rss")
    g.add_argument("--sizes", default=None, help="comma-separated presets or 'max' (default 114m,347m,1b,max; "
                                                  "quick: tiny,27m)")
    g.add_argument("--rss-experts", type=int, default=4)
    g.add_argument("--builds", default="ties,twin", help="comma-separated: ties,twin")
    g.add_argument("--twin-max-params", type=float, default=0, help="skip twin builds above this size (0: never)")
    g.add_argument("--twin-set", action="append", default=[], metavar="KEY=VALUE", help="--set override of the twin "
                                                                                        "builds (lifts the size cap)")
    g.add_argument("--margin-gb", type=float, default=15.0, help="disk kept free")
    g = ap.add_argument_group("plan")
    g.add_argument("--plan-preset", default="llama3-70b", choices=sorted(PRESETS))
    g.add_argument("--plan-experts", type=int, default=8)
    args = ap.parse_args(argv)
    args.section = [s for s in args.section.split(",") if s]
    args.builds = [b for b in args.builds.split(",") if b]
    bad = [s for s in args.section if s not in SECTIONS] + [b for b in args.builds if b not in ("ties", "twin")]
    if bad:
        ap.error(f"unknown section / build: {', '.join(bad)}")
    args.sizes = (args.sizes or ("tiny,27m" if args.quick else "114m,347m,1b,max")).split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = auto_threads(args.threads)
    torch.set_num_threads(threads)
    env = child_env(threads)
    args.work.mkdir(parents=True, exist_ok=True)
    load_start, t0 = loadavg(), time.perf_counter()
    runners = {"layer": section_layer, "rss": section_rss, "plan": section_plan}
    parts: list[str] = []
    for name in args.section:
        s0 = time.perf_counter()
        parts += [*runners[name](args, env, args.work), "", f"_{name} section: {secs(time.perf_counter() - s0)}_", ""]
    cmd = shlex.join(["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])])
    entry = "\n".join([
        f"### {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}{' (quick)' if args.quick else ''}", "",
        f"- machine: {machine()}",
        f"- load average before: {load_start}, after: {loadavg()}; {threads} threads in process and in the children",
        f"- command: `{cmd}` ({secs(time.perf_counter() - t0)})", "", *parts])
    print()
    print(entry)
    if args.write:
        record(entry, HEADING)
        print(f"appended to {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
