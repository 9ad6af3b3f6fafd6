"""Benchmark: checkpoint bytes of every routed kind relative to the dense base, as ``moerge inspect`` prints them.

    python bench/storage.py [--kinds dense,wemoe,twin,bit1,lora,sparse] [--no-record]

The ~110M llama of ``routed_models.py`` (hidden 768, 12 layers, intermediate 3072), 4 experts, every MLP routed,
twin rank 16, sparse density 0.1, lora = 4 LoRA adapters (r 16, MLP linears), built at float32 (the calibrated
builds that ``generate_speed.py`` times) and at bfloat16 (``dtype: bfloat16``; routers left uniform: the same
tensors and bytes, no calibration pass).  For each build it runs ``python -m moerge inspect <folder>`` and
records its ``total ... x base`` ratio (base = the shared, base-shaped tensors at the checkpoint's dtype) and the
expert bytes.  Goal (issue 3): bit1 and twin <= 1.3x the dense base.  Results go to ``bench/RESULTS.md`` under
``## storage (issue 3)``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import routed_models as rm
from _measure import loadavg, machine_with_transformers, record

HEADING = "## storage (issue 3)"
GOAL = 1.3
DTYPES = ("float32", "bfloat16")


def inspect(folder: Path) -> tuple[str, dict[str, tuple[str, float]]]:
    """(the full ``moerge inspect`` output, {category: (human size, ratio)})."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(rm.REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "moerge", "inspect", str(folder)], check=True, capture_output=True,
                         text=True, env=env, cwd=rm.REPO).stdout
    parts = {m.group(1): (m.group(2), float(m.group(3)))
             for m in re.finditer(r"^\s+(\S+)\s+([\d.]+ [KMG]?B)\s+([\d.]+)x base$", out, re.MULTILINE)}
    return out, parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(rm.KIND_PARAMS))
    ap.add_argument("--threads", default="auto", help="torch threads of the builds; auto = 2 when idle, else 1")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    load_start = loadavg()
    import torch

    torch.set_num_threads(rm.auto_threads(args.threads, load_start))
    models = rm.prepare_110m()
    rows, raw = [], []
    for kind in kinds:
        row = {"kind": kind}
        for dtype in DTYPES:
            folder = rm.build_routed(models, kind, dtype, calibrate=dtype == "float32")
            text, parts = inspect(folder)
            raw.append(f"$ moerge inspect {folder.relative_to(rm.REPO)}\n{text.rstrip()}")
            expert = next((v for k, v in parts.items() if k.startswith("experts:")), ("-", 0.0))
            row[dtype] = (parts["total"], expert, parts["shared"][0])
        rows.append(row)
        print(f"{kind:<7} " + "  ".join(f"{d}: {row[d][0][1]:.3f}x" for d in DTYPES), flush=True)

    lines = ["| kind | fp32 total | fp32 ratio | fp32 experts | bf16 total | bf16 ratio | bf16 experts | goal <= 1.3x |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        (t32, e32, _), (t16, e16, _) = row["float32"], row["bfloat16"]
        goal = ""
        if row["kind"] in ("bit1", "twin"):
            worst = max(t32[1], t16[1])
            goal = f"met ({worst:.3f}x at worst)" if worst <= GOAL else f"**missed** ({worst:.3f}x)"
        lines.append(f"| {row['kind']} | {t32[0]} | {t32[1]:.3f}x | {e32[0]} ({e32[1]:.3f}x) | {t16[0]} | "
                     f"{t16[1]:.3f}x | {e16[0]} ({e16[1]:.3f}x) | {goal} |")
    base32, base16 = rows[0]["float32"][2], rows[0]["bfloat16"][2]
    summary = "\n".join(lines)
    print()
    print(summary)
    if not args.no_record:
        cmd = shlex.join(["python", "bench/storage.py", *(argv if argv is not None else sys.argv[1:])])
        entry = "\n".join([
            f"### {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"- machine: {machine_with_transformers()}",
            f"- load average before: {load_start}, after: {loadavg()} (sizes do not depend on load)",
            f"- command: `{cmd}`",
            ("- model: llama hidden 768, 12 layers, intermediate 3072, 114M parameters; 4 experts, every MLP routed "
             "(12 units), sequence-level routers; twin rank 16, sparse density 0.1 (int32 index + value), lora = "
             f"4 LoRA adapters r {rm.LORA['r']} on the MLP linears; dense base (= the shared tensors) "
             f"{base32} at fp32, {base16} at bf16"),
            "- ratio = `moerge inspect`'s `total ... x base` line (checkpoint bytes / shared base-shaped bytes)",
            "",
            summary,
            "",
            "<details><summary>moerge inspect output</summary>",
            "",
            "```",
            *"\n\n".join(raw).split("\n"),
            "```",
            "",
            "</details>",
        ])
        record(entry, HEADING)
        print(f"appended to {rm.HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
