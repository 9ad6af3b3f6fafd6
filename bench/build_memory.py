"""Benchmark: peak anonymous RSS of a routed ``moerge build`` (twin rank 16, 4 full experts, every MLP routed) at
two model sizes, next to the model size, one layer x all inputs, and the output shard size.

    python bench/build_memory.py [--sizes 110m,350m] [--calibrate] [--shard-size 200MB] [--no-record]

Models (cached in ``bench/_work``, see ``routed_models.py``): the ~110M llama (hidden 768, 12 layers, intermediate
3072) and a ~350M llama (hidden 1024, 24 layers, intermediate 3328, 16 heads), each with 4 full experts
(``make_full_expert``, scale 0.02), fp32.  For each size it runs, as child processes,

* ``python -m moerge validate <recipe>`` (imports torch/transformers/moerge and opens every header: the
  interpreter's own baseline), then
* ``python -m moerge build <recipe> <out> --force --quiet`` (routers uniform by default: the tensor build alone;
  ``--calibrate`` adds a run with the prototype calibration pass, which loads the built model),

polling ``/proc/<pid>/status`` of the child and its descendants every ~20 ms: peak of the summed ``RssAnon``
(anonymous memory: tensors, heaps; memory-mapped checkpoint pages are file-backed and do not count), peak summed
``VmRSS`` and the child's ``VmHWM`` (both include those mapped pages).  The expectation (issue 3): peak anonymous
RSS stays within baseline + one layer x (4 experts + base) + one output shard.  Results go to ``bench/RESULTS.md``
under ``## build_memory (issue 3)``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import routed_models as rm
from _measure import child_env, loadavg, machine_with_transformers, measure, mib, record

HEADING = "## build_memory (issue 3)"


# ------------------------------------------------------------------------------------------------ sizes


def layer_bytes(base: Path, layer: int = 0) -> tuple[int, int]:
    """(bytes of decoder layer ``layer``'s tensors, bytes of its largest MLP linear) in the base."""
    from moerge.io.index import CheckpointIndex

    idx = CheckpointIndex.from_folder(base)
    prefix = f"model.layers.{layer}."
    infos = {n: i for n, i in idx.tensors.items() if n.startswith(prefix)}
    largest = max(i.nbytes for n, i in infos.items() if ".mlp." in n)
    return sum(i.nbytes for i in infos.values()), largest


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    import yaml

    from moerge.recipe import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="110m,350m")
    ap.add_argument("--shard-size", default="200MB", help="output shard_size of the recipe")
    ap.add_argument("--calibrate", action="store_true", help="also time a build with prototype calibration")
    ap.add_argument("--keep", action="store_true", help="keep the built folders")
    ap.add_argument("--threads", default="auto", help="OMP_NUM_THREADS of the children; auto = 2 when idle, else 1")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    load_start = loadavg()
    threads = rm.auto_threads(args.threads, load_start)
    env = child_env(threads)
    shard = parse_size(args.shard_size)
    root = rm.WORK / "build_memory"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in [s for s in args.sizes.split(",") if s]:
        models = rm.prepare_110m() if size == "110m" else rm.prepare_big()
        n_params = rm.n_params(models["base"])
        base_b = folder_bytes(models["base"])
        layer_b, linear_b = layer_bytes(models["base"])
        variants = [False, True] if args.calibrate and models["data"] else [False]
        for calibrate in variants:
            recipe = rm.routed_recipe(models, "twin", "float32", calibrate=calibrate, shard_size=args.shard_size)
            tag = f"{size}-twin{'-calibrated' if calibrate else ''}"
            rfile = root / f"{tag}.yml"
            rfile.write_text(yaml.safe_dump(recipe, sort_keys=False))
            out = root / f"{tag}-out"
            shutil.rmtree(out, ignore_errors=True)
            py = sys.executable
            rm._log(f"{tag}: baseline (moerge validate) ...")
            base_run = measure("validate", [py, "-m", "moerge", "validate", str(rfile)], env)
            rm._log(f"{tag}: moerge build ...")
            build_run = measure("build", [py, "-m", "moerge", "build", str(rfile), str(out), "--force", "--quiet"], env)
            shards = sorted(out.glob("model*.safetensors"))
            largest_shard = max(f.stat().st_size for f in shards)
            bound = base_run.peak_anon + (rm.N_EXPERTS + 1) * layer_b + shard
            rows.append({
                "tag": tag, "params": n_params, "base": base_b, "layer": layer_b, "linear": linear_b,
                "out": folder_bytes(out), "shards": len(shards), "largest_shard": largest_shard,
                "baseline": base_run, "build": build_run, "bound": bound,
            })
            rm._log(f"  wall {build_run.wall_s:.0f} s, peak anon {mib(build_run.peak_anon)} (baseline "
                    f"{mib(base_run.peak_anon)}), VmHWM {mib(build_run.hwm)}, bound {mib(bound)}; "
                    f"load {loadavg()}")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)

    lines = [("| build | params | base (fp32) | one layer | one layer x (4 experts + base) | output shard (max) | "
             "baseline anon (validate) | **peak anon RSS (build)** | peak - baseline | VmHWM (incl. mapped) | "
             "wall | within baseline + layer x 5 + shard? |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        b, v = r["build"], r["baseline"]
        ok = "yes" if b.peak_anon <= r["bound"] else "**no**"
        lines.append(f"| {r['tag']} | {r['params'] / 1e6:.0f}M | {mib(r['base'])} | {mib(r['layer'])} | "
                     f"{mib(5 * r['layer'])} | {mib(r['largest_shard'])} ({r['shards']} shards) | "
                     f"{mib(v.peak_anon)} | **{mib(b.peak_anon)}** | {mib(b.peak_anon - v.peak_anon)} | "
                     f"{mib(b.hwm)} | {b.wall_s:.0f} s | {ok} ({mib(r['bound'])}) |")
    summary = "\n".join(lines)
    print()
    print(summary)
    if not args.no_record:
        cmd = shlex.join(["python", "bench/build_memory.py", *(argv if argv is not None else sys.argv[1:])])
        entry = "\n".join([
            f"### {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"- machine: {machine_with_transformers()}",
            f"- load average before: {load_start}, after: {loadavg()}; children run with OMP_NUM_THREADS={threads}",
            f"- command: `{cmd}`",
            ("- builds: `python -m moerge build <recipe> <out> --force --quiet`, twin rank 16, 4 full experts, every MLP "
             f"routed, static merge ties 0.5 for the shared weights, fp32, `output.shard_size: {args.shard_size}`, "
             "routers uniform unless `-calibrated`; baseline = `python -m moerge validate <recipe>` (same imports, "
             "headers opened); RSS polled every 20 ms over the child and its descendants"),
            ("- one layer = the bytes of decoder layer 0 of the base (attention + MLP + norms); the largest single "
             f"MLP linear is {', '.join(mib(r['linear']) for r in rows)} for the sizes above"),
            "",
            summary,
        ])
        record(entry, HEADING)
        print(f"appended to {rm.HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
