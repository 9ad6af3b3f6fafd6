#!/usr/bin/env python
"""Make (once) and return the real pool's full fine-tune experts, beside the converted base in the moerge cache.

The four experts (imdb, tweets, bbc, arith: every parameter of SmolLM2-135M-Instruct trained on one task) are made
by the pool's own script, ``shared/pool/full/make_full_experts.py`` (see ``shared/REAL_DATA.md``), never by a copy
of it: same data, sampling, seed and thread count on every machine.  About an hour on two free cores, once.

Usage::

    python tools/get_full_pool.py [--pool ../shared/pool] [--out DIR] [--jobs 2]   # prints the folder

    from tools.get_full_pool import get_full_pool
    folder = get_full_pool()          # folder/<task>/ is a full HF checkpoint (fp32) with train.json

Default folder: ``$MOERGE_CACHE/smollm2-135m-instruct-full`` (``~/.cache/moerge/...``), beside the base that
``tools/get_base_model.py`` converts.  A task whose folder is complete is skipped (the script resumes), so a
second call returns at once.  Each expert's ``model.safetensors`` sha256 is checked against the prefix recorded in
``shared/pool/full/RESULTS.md``; a mismatch is reported (another machine may differ in the last bits of the floats)
but does not fail, since the experts are still valid fine-tunes.

On a CPU without native bf16 (AVX2 only) the script's bf16-autocast GEMMs run about 16x slower (one step 297 s
instead of 23 s here); ``--bf16-emulation auto`` (the default) then runs it under :mod:`bf16_emulation`, which
computes each bf16 GEMM as an fp32 GEMM of the same bf16 values rounded once to bf16, the arithmetic of a native
bf16 GEMM up to summation order.  The training (script, data, steps, seeds, autocast) is not changed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16_emulation import native_bf16
from get_base_model import get_base_model

TASKS = ("imdb", "tweets", "bbc", "arith")
NAME = "smollm2-135m-instruct-full"
REPO = Path(__file__).resolve().parents[1]


def default_pool() -> Path:
    return REPO.parent / "shared" / "pool"


def default_out(base: Path) -> Path:
    return base.parent / NAME


def complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "train.json"))


def expected_sha(pool: Path) -> dict[str, str]:
    """Task -> sha256 prefix of model.safetensors, from the pool's RESULTS.md (empty when absent)."""
    path = pool / "full" / "RESULTS.md"
    text = path.read_text() if path.is_file() else ""
    return dict(re.findall(r"\b(imdb|tweets|bbc|arith) ([0-9a-f]{16})\b", text))


def check(out: Path, pool: Path) -> list[str]:
    """Lines naming any expert whose sha256 (from its train.json) differs from the pool's record."""
    want, notes = expected_sha(pool), []
    for task in TASKS:
        got = str(json.loads((out / task / "train.json").read_text()).get("model_safetensors_sha256", ""))
        if task in want and not got.startswith(want[task]):
            notes.append(f"{task}: sha256 {got[:16]} differs from the pool's {want[task]} (float bits of another machine?)")
    return notes


def get_full_pool(pool: Path | None = None, out: Path | None = None, jobs: int = 2, emulation: str = "auto") -> Path:
    """The folder holding the four full experts, made first where missing (``emulation``: auto | on | off, see
    the module's docstring)."""
    pool = Path(pool or default_pool())
    script = pool / "full" / "make_full_experts.py"
    if not script.is_file():
        raise SystemExit(f"error: {script} not found (pass --pool: the real pool folder)")
    base = get_base_model()
    out = Path(out or default_out(base))
    if not all(complete(out / t) for t in TASKS):
        print(f"[get_full_pool] making the full experts into {out} (about an hour, once)", file=sys.stderr)
        emulate = emulation == "on" or (emulation == "auto" and not native_bf16())
        wrap = [str(Path(__file__).resolve().parent / "bf16_emulation.py")] if emulate else []
        if emulate:
            print("[get_full_pool] no native bf16 on this CPU: bf16 GEMMs computed in fp32 and rounded "
                  "(tools/bf16_emulation.py)", file=sys.stderr)
        subprocess.run([sys.executable, *wrap, str(script), str(base), str(out), "--jobs", str(jobs)], check=True)
    for note in check(out, pool):
        print(f"[get_full_pool] note: {note}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, default=None, help="the real pool folder (default ../shared/pool)")
    ap.add_argument("--out", type=Path, default=None, help=f"target folder (default: beside the base, {NAME})")
    ap.add_argument("--jobs", type=int, default=2, help="tasks trained at a time (one torch thread each)")
    ap.add_argument("--bf16-emulation", choices=("auto", "on", "off"), default="auto",
                    help="compute bf16 GEMMs in fp32 (auto: when the CPU has no native bf16)")
    args = ap.parse_args(argv)
    print(get_full_pool(args.pool, args.out, args.jobs, args.bf16_emulation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
