"""``bench/real/full.py``: the full-pool benchmark's method list and budget arithmetic (no model is run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.real import full, run
from bench.real.methods import Env
from moerge.testing import tiny


def test_methods_cover_every_budget_once() -> None:
    keys = [m.key for m in full.full_methods()]
    assert len(keys) == len(set(keys))
    for b in full.BUDGETS:  # the allocation at every budget; the side-by-side comparison at 1.03x and 1.05x
        assert {f"alloc-{b}-cal", f"alloc-fisher_global-{b}-cal"} <= set(keys)
        for prefix in ("sel-sign_conflict-bit1", "sel-merge_error-bit1", "twin-uniform"):
            assert (f"{prefix}-{b}-cal" in keys) == (b in ("1.03", "1.05"))
    quick = [m.key for m in full.full_methods() if m.quick]
    assert {"base", "oracle", "recipe-real_pool_full"} <= set(quick)


def test_uniform_twin_rank_fits_the_budget(tmp_path: Path) -> None:
    base = tiny.make_base(tmp_path / "base", family="llama", hidden=32, layers=2, tie=False, seed=0)
    env = Env(pool=tmp_path, base=base, full=tmp_path)
    shapes = full.tensor_shapes(base)
    base_bytes = 4 * sum(full._numel(s) for s in shapes.values())
    lin = [s for n, s in shapes.items() if n.rsplit(".", 2)[-2] in full.LINEARS]
    for b in ("1.05", "1.5", "3"):
        r = full.uniform_twin_rank(env, b)
        extra = 4 * len(full.TASKS) * r * sum(o + i for o, i in lin)
        assert extra <= (float(b) - 1) * base_bytes < 4 * len(full.TASKS) * (r + 2) * sum(o + i for o, i in lin)


def test_pool_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        run.main(["--pool", "nowhere"])


def test_worker_groups_keep_a_build_together() -> None:
    """--jobs: a build's prototype and calibrated rows share its folder and predictions, so one worker runs both
    (in order); every key is in exactly one group."""
    keys = [m.key for m in full.full_methods()]
    groups = run.worker_groups(keys)
    assert sorted(k for g in groups for k in g) == sorted(keys)
    assert ["grid-dense-all", "grid-dense-all-cal"] in groups and ["alloc-1.03-cal"] in groups
    assert run.worker_groups(["a-cal", "b", "a"]) == [["a-cal", "a"], ["b"]]
