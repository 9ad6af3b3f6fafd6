"""Row-block streaming: a tensor read in blocks gives the same bytes as the whole-tensor computation.

Static merges (linear, task arithmetic, TIES, breadcrumbs), routed kinds (dense, wemoe, bit1, sparse, twin exact,
lora) and the streamed exact top-k; the randomized twin over blocks agrees up to float rounding.  Blocks are
forced tiny with ``MOERGE_BLOCK_BYTES``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from folders import tensors
from hypothesis import given, settings
from hypothesis import strategies as st

import moerge
from moerge.merge.sparsify import top_mask
from moerge.merge.streaming import TopK, row_blocks
from moerge.recipe import recipe_from_dict


def _recipe(pool: dict[str, Any], merge: dict, routing: dict | None = None, lora: bool = False) -> Any:
    sources = [pool["lora"][0]] * 2 if lora else pool["full"][:2]
    raw: dict[str, Any] = {"base": str(pool["base"]), "merge": merge,
                           "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)]}
    if routing:
        raw["routing"] = {"select": {"all": True}, "modules": "both", "router": {"init": "uniform"}, **routing}
    return recipe_from_dict(raw)


def _both(recipe: Any, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    monkeypatch.delenv("MOERGE_BLOCK_BYTES", raising=False)
    whole = tensors(moerge.build(recipe, tmp / "whole", progress=False))
    monkeypatch.setenv("MOERGE_BLOCK_BYTES", "2048")  # a few rows per block
    blocks = tensors(moerge.build(recipe, tmp / "blocks", progress=False))
    assert sorted(whole) == sorted(blocks)
    return whole, blocks


@pytest.mark.parametrize("merge", [{"method": "linear"}, {"method": "task_arithmetic", "lambda": 0.7},
                                   {"method": "ties", "density": 0.3},
                                   {"method": "breadcrumbs", "density": 0.5, "gamma": 0.05}],
                         ids=["linear", "task_arithmetic", "ties", "breadcrumbs"])
def test_static_merges_stream_to_the_same_bytes(llama_pool: dict, tmp_path: Path, merge: dict,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    whole, blocks = _both(_recipe(llama_pool, merge), tmp_path, monkeypatch)
    for name, t in whole.items():
        assert torch.equal(t, blocks[name]), name


@pytest.mark.parametrize("expert,lora", [({"kind": "dense"}, False), ({"kind": "wemoe"}, False),
                                         ({"kind": "bit1"}, False), ({"kind": "sparse", "density": 0.3}, False),
                                         ({"kind": "twin", "rank": 4, "svd": "exact"}, False),
                                         ({"kind": "lora"}, True)],
                         ids=["dense", "wemoe", "bit1", "sparse", "twin-exact", "lora"])
def test_routed_kinds_stream_to_the_same_bytes(llama_pool: dict, tmp_path: Path, expert: dict, lora: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    merge = {"method": "task_arithmetic"} if lora else {"method": "ties", "density": 0.5}
    whole, blocks = _both(_recipe(llama_pool, merge, {"expert": expert}, lora), tmp_path, monkeypatch)
    for name, t in whole.items():
        assert torch.equal(t, blocks[name]), name


def test_randomized_twin_over_blocks_matches_up_to_rounding(llama_pool: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    routing = {"expert": {"kind": "twin", "rank": 4, "svd": "randomized"}}
    whole, blocks = _both(_recipe(llama_pool, {"method": "ties", "density": 0.5}, routing), tmp_path, monkeypatch)
    for name, t in whole.items():
        assert torch.allclose(t, blocks[name], atol=1e-4, rtol=1e-3), name


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), frac=st.floats(0, 1), block=st.integers(1, 64), levels=st.integers(1, 6),
       seed=st.integers(0, 10**6))
def test_streamed_top_k_equals_top_mask(n: int, frac: float, block: int, levels: int, seed: int) -> None:
    """Exactly k entries, the same ones as the whole-tensor mask (ties at the cut: lowest indices)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (n,), generator=g).float()  # many ties
    k = int(frac * n)
    want = top_mask(values, k)
    ranges = row_blocks((n,), block * 4)
    top = TopK(n, k).fit(lambda: (values[a:b] for a, b in ranges))
    got = torch.cat([top.mask(values[a:b]) for a, b in ranges])
    assert torch.equal(got, want) and int(got.sum()) == k


@pytest.mark.parametrize("levels", [3, 0], ids=["ties", "floats"])
def test_streamed_top_k_on_large_tensors(levels: int) -> None:
    """Above the direct-selection size the cut is bracketed by a sample and refined in a second pass."""
    g = torch.Generator().manual_seed(1)
    n = 200_003
    values = torch.randint(0, levels, (n,), generator=g).float() if levels else torch.randn(n, generator=g).abs()
    ranges = row_blocks((n,), 4 * 7_001)
    for k in (1, 777, n // 2, n - 5):
        top = TopK(n, k).fit(lambda: (values[a:b] for a, b in ranges))
        assert torch.equal(torch.cat([top.mask(values[a:b]) for a, b in ranges]), top_mask(values, k)), k


def test_conflict_metrics_stream(llama_pool: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conflict analysis of a unit read in row blocks equals the whole-tensor one (float64 sums)."""
    from moerge.pipeline.analyze import unit_metrics
    from moerge.pipeline.context import BuildContext
    from moerge.pipeline.units import candidate_units

    ctx = BuildContext.open(_recipe(llama_pool, {"method": "ties", "density": 0.5}))
    units = candidate_units(ctx.base.index, ctx.n_layers, ctx.family, "both")
    monkeypatch.delenv("MOERGE_BLOCK_BYTES", raising=False)
    whole = [unit_metrics(ctx, u, 0.2) for u in units]
    monkeypatch.setenv("MOERGE_BLOCK_BYTES", "2048")
    blocks = [unit_metrics(ctx, u, 0.2) for u in units]
    for w, b in zip(whole, blocks):
        assert w == pytest.approx(b, abs=1e-12)


def test_streamed_topk_on_a_tensor_past_2_24_values() -> None:
    """A 2^24+ value tensor with a fifth of its values tied at one magnitude: the streamed mask is exactly
    the whole-tensor top-k, ties at the cut included."""
    from moerge.merge.sparsify import top_mask
    from moerge.merge.streaming import TopK, fit_tops

    g = torch.Generator().manual_seed(0)
    x = torch.randn((1 << 24) + 4099, generator=g).abs()
    x[::5] = x[3]  # a fifth of the values tie
    k = x.numel() // 3
    top = fit_tops([TopK(x.numel(), k)], lambda: ([b] for b in x.split(1 << 20)))[0]
    mask = torch.cat([top.mask(b) for b in x.split(1 << 20)])
    assert torch.equal(mask, top_mask(x, k))


@pytest.mark.parametrize("path", ["sample", "radix"])
@pytest.mark.parametrize("kind", ["normal", "zeros", "one_bin", "subnormal", "huge"])
@pytest.mark.parametrize("frac", [1e-6, 0.01, 0.5, 0.99, 1 - 1e-6])
def test_streamed_topk_equals_the_whole_tensor_mask(kind: str, frac: float, path: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Values that stress a two-pass top-k: many exact zeros, every value inside one upper-16-bit bin
    (only the lower bits differ), subnormals, values near the float32 maximum; k from 1 to n - 1, blocks of
    uneven size, two masks fitted together; by the sample bracket and by the radix select."""
    from moerge.merge import streaming
    from moerge.merge.sparsify import top_mask
    from moerge.merge.streaming import TopK, fit_tops

    if path == "radix":  # the radix select, used from 2^24 values, on a small tensor
        monkeypatch.setattr(streaming, "_RADIX", 1 << 16)
    g = torch.Generator().manual_seed(1)
    n = 70_001
    x = torch.randn(n, generator=g).abs()
    if kind == "zeros":
        x[torch.rand(n, generator=g) < 0.6] = 0.0
    elif kind == "one_bin":
        x = (1.0 + torch.randint(0, 1 << 7, (n,), generator=g).float() / (1 << 23)).float()  # 128 distinct values
    elif kind == "subnormal":
        x = x * 1e-40
    elif kind == "huge":
        x = x * 1e38
    k = min(n - 1, max(1, int(frac * n)))
    parts = list(x.split(9_999))
    tops = fit_tops([TopK(n, k), TopK(n, n - k)], lambda: ([b, b] for b in parts))
    for top, kk in zip(tops, (k, n - k)):
        assert torch.equal(torch.cat([top.mask(b) for b in parts]), top_mask(x, kk))
