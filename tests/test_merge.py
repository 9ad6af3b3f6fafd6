"""Static merges: pure-function invariants, and tensor-for-tensor equivalence with mergekit 0.1.5.

The equivalence tests run mergekit as a separate program (``mergekit-multi``, the batch form of
``mergekit-yaml``: one process runs every named merge of a multi-document YAML, so its slow start-up is
paid once per module) on the tiny fp32 pools of ``conftest.py`` and compare every output tensor with
``moerge.build`` on the same recipe: max abs difference <= 1e-6.  They are skipped when mergekit is not
installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moerge import build
from moerge.merge.consensus import sign_mask
from moerge.merge.methods import METHODS, MergeParams, merge_task_vectors, merge_tensor
from moerge.merge.sparsify import (
    keep_count,
    kth_largest,
    magnitude,
    magprune,
    outliers,
    random,
    rescale_l1,
    top_mask,
)
from moerge.recipe import recipe_from_dict

FAST = settings(max_examples=40, deadline=None)


def _distinct(n: int, seed: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``n`` values with pairwise distinct, non-zero magnitudes and random signs (seeded)."""
    g = torch.Generator().manual_seed(seed)
    mags = (torch.randperm(n, generator=g).double() + 1) / n
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    out = (mags * signs).float()
    return out.reshape(shape) if shape else out


def _rand(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


shapes = st.sampled_from([(7,), (16,), (5, 9), (12, 8), (3, 4, 5)])


# --------------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------------


@FAST
@given(shape=shapes, seed=st.integers(0, 2**16), w=st.floats(-3, 3).filter(lambda x: abs(x) > 1e-3),
       lam=st.floats(-2, 2))
def test_ties_density_one_single_expert_is_task_arithmetic(shape, seed, w, lam) -> None:
    base, tau = _rand(shape, seed), _rand(shape, seed + 1, 0.1)
    ties, ta = METHODS.get("ties"), METHODS.get("task_arithmetic")
    # normalised TIES divides the weight back out: equals task arithmetic with weight 1
    got = merge_tensor(ties, base, [tau], MergeParams(weights=(w,), density=1.0, lambda_=lam, normalize=True))
    want = merge_tensor(ta, base, [tau], MergeParams(weights=(1.0,), lambda_=lam))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # unnormalised TIES keeps the weight: equals task arithmetic with the same weight
    got = merge_tensor(ties, base, [tau], MergeParams(weights=(w,), density=1.0, lambda_=lam, normalize=False))
    want = merge_tensor(ta, base, [tau], MergeParams(weights=(w,), lambda_=lam))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@FAST
@given(shape=shapes, seed=st.integers(0, 2**16), ws=st.lists(st.floats(0.05, 4), min_size=1, max_size=4))
def test_linear_of_identical_experts_is_the_expert(shape, seed, ws) -> None:
    base, tau = _rand(shape, seed), _rand(shape, seed + 1, 0.1)
    got = merge_tensor(METHODS.get("linear"), base, [tau] * len(ws), MergeParams(weights=tuple(ws), normalize=True))
    torch.testing.assert_close(got, base + tau, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della"])
def test_lambda_zero_gives_the_base(method: str) -> None:
    base = _rand((6, 10), 0)
    taus = [_rand((6, 10), 1, 0.1), _rand((6, 10), 2, 0.1)]
    p = MergeParams(weights=(0.7, 1.3), density=0.5 if method != "task_arithmetic" else 1.0, lambda_=0.0,
                    normalize=METHODS.get(method).normalize, rescale=METHODS.get(method).rescale)
    assert torch.equal(merge_tensor(METHODS.get(method), base, taus, p), base)


def test_no_task_vector_gives_the_base() -> None:
    base = _rand((4, 4), 0)
    for method in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs"):
        p = MergeParams(weights=(1.0, 2.0), density=0.5, lambda_=0.5)
        assert torch.equal(merge_tensor(METHODS.get(method), base, [None, None], p), base)


@FAST
@given(n=st.integers(1, 300), density=st.floats(0.001, 0.999), seed=st.integers(0, 2**16))
def test_magnitude_keeps_exactly_k_largest(n, density, seed) -> None:
    tau = _distinct(n, seed)
    k = max(1, int(density * n))
    assert keep_count(n, density) == k
    out = magnitude(tau, density)
    kept = out != 0
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], tau[kept])  # kept values are untouched (no rescale)
    if k < n:
        assert tau[kept].abs().min() > tau[~kept].abs().max()


def _values(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=g).abs()
    if kind == "ties":  # few distinct values: the cut falls inside a run of equal values
        return torch.randint(0, 37, (n,), generator=g).float()
    if kind == "zeros":  # mostly zeros (a LoRA or a partial fine-tune)
        return torch.where(torch.rand(n, generator=g) < 0.8, 0.0, torch.rand(n, generator=g))
    if kind == "skewed":  # heavy tail
        return torch.randn(n, generator=g).exp_() ** 4
    return torch.full((n,), 0.5)


@pytest.mark.parametrize("n", [1000, 70_001, 250_000])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "skewed", "constant"])
def test_kth_largest_and_top_mask_are_exact(n: int, kind: str) -> None:
    """The sampled selection used for big tensors: the exact k-th largest value, and a mask of exactly k
    entries that never drops a larger value for a smaller one; ties at the cut keep the lowest indices."""
    values = _values(kind, n, n)
    desc = values.sort(descending=True, stable=True)
    ks = sorted({1, 2, n // 100 + 1, n // 3, n // 2, n - 1, n, *torch.randint(1, n + 1, (3,)).tolist()})
    for k in ks:
        assert kth_largest(values, k).item() == desc.values[k - 1].item(), (kind, n, k)
        mask = top_mask(values, k)
        want = torch.zeros(n, dtype=torch.bool)
        want[desc.indices[:k]] = True  # stable descending sort: equal values in index order
        assert torch.equal(mask, want), (kind, n, k)


def test_magnitude_on_a_big_tensor_matches_a_full_sort() -> None:
    tau = torch.randn(1024, 700, generator=torch.Generator().manual_seed(5)).mul_(1e-3).half().float()  # ties
    for density in (0.1, 0.5, 0.9):
        k = max(1, int(density * tau.numel()))
        want = torch.zeros(tau.numel(), dtype=torch.bool)
        want[tau.abs().reshape(-1).sort(descending=True, stable=True).indices[:k]] = True
        out = magnitude(tau, density)
        assert torch.equal(out.reshape(-1) != 0, want)
        assert torch.equal(out.reshape(-1)[want], tau.reshape(-1)[want])


def test_magnitude_keeps_shape_and_at_least_one() -> None:
    tau = _distinct(60, 3, (6, 10))
    out = magnitude(tau, 1e-6)
    assert out.shape == tau.shape and int((out != 0).sum()) == 1
    assert out.abs().max() == tau.abs().max()


@FAST
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_density_one_is_identity(shape, seed) -> None:
    tau = _rand(shape, seed)
    g = torch.Generator().manual_seed(seed)
    for fn in (magnitude, random, outliers, magprune):
        assert torch.equal(fn(tau, 1.0, rescale=True, generator=g), tau)


def test_dare_density_one_merges_like_task_arithmetic() -> None:
    base, taus = _rand((8, 8), 0), [_rand((8, 8), 1, 0.1), _rand((8, 8), 2, 0.1)]
    p = MergeParams(weights=(0.7, 1.3), density=1.0, lambda_=0.8, rescale=True)
    got = merge_tensor(METHODS.get("dare_linear"), base, taus, p)
    want = merge_tensor(METHODS.get("task_arithmetic"), base, taus, MergeParams(weights=(0.7, 1.3), lambda_=0.8))
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della"])
def test_seeded_random_merges_are_reproducible(method: str) -> None:
    m = METHODS.get(method)
    base, taus = _rand((32, 48), 0), [_rand((32, 48), 1, 0.1), _rand((32, 48), 2, 0.1)]

    def run(seed: int, name: str = "layers.0.mlp.up_proj.weight") -> bytes:
        p = MergeParams(weights=(0.7, 1.3), density=0.5, lambda_=1.0, epsilon=0.1, seed=seed,
                        normalize=m.normalize, rescale=m.rescale)
        return merge_tensor(m, base, taus, p, name).numpy().tobytes()

    assert run(0) == run(0)
    assert run(7) == run(7)
    assert run(0) != run(7)
    assert run(0, "a") != run(0, "b")  # the mask also depends on the tensor


@FAST
@given(shape=shapes, seed=st.integers(0, 2**16), density=st.floats(0.2, 0.8))
def test_rescale_keeps_l1_norm(shape, seed, density) -> None:
    tau = _rand(shape, seed)
    g = torch.Generator().manual_seed(seed)
    l1 = tau.abs().sum()
    for out in (random(tau, density, rescale=True, generator=g),
                magprune(tau, density, epsilon=min(density, 1 - density) / 2, rescale=True, generator=g),
                magnitude(tau, density, rescale=True)):
        if (out != 0).any():
            torch.testing.assert_close(out.abs().sum(), l1, rtol=1e-5, atol=0)
    torch.testing.assert_close(rescale_l1(tau, tau * 0.25).abs().sum(), l1, rtol=1e-6, atol=0)
    assert torch.equal(rescale_l1(tau, torch.zeros_like(tau)), torch.zeros_like(tau))  # nothing kept: no NaN


def test_random_sparsify_without_rescale_keeps_values() -> None:
    tau = _rand((50, 40), 0)
    out = random(tau, 0.3, rescale=False, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert torch.equal(out[kept], tau[kept])
    assert 0.2 < kept.float().mean() < 0.4


@FAST
@given(n=st.integers(1, 300), density=st.floats(0.01, 0.99), gamma=st.floats(0.0, 0.3), seed=st.integers(0, 2**16))
def test_breadcrumbs_keeps_the_rank_window(n, density, gamma, seed) -> None:
    tau = _distinct(n, seed)
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - n_keep - n_top)
    ascending = tau.abs().argsort()
    want = torch.zeros(n, dtype=torch.bool)
    want[ascending[n_bot:n_bot + n_keep]] = True
    out = outliers(tau, density, gamma=gamma)
    assert torch.equal(out != 0, want)
    assert torch.equal(out[want], tau[want])


def test_sign_mask_semantics() -> None:
    deltas = torch.tensor([[1.0, -2.0, 0.0, 3.0, -1.0],
                           [-3.0, 1.0, 0.0, -3.0, -1.0],
                           [0.5, 0.5, 0.0, 0.5, 4.0]])
    # sum: elected sign of the column sum (zero elects +); zeros never agree
    # column sums -1.5, -0.5, 0, 0.5, 2 -> -, -, +, +, +
    want_sum = torch.tensor([[False, True, False, True, False],
                             [True, False, False, False, False],
                             [False, False, False, True, True]])
    assert torch.equal(sign_mask(deltas, "sum"), want_sum)
    # count: majority of signs (a tie elects +): column 0 +,-,+ -> +; column 1 -,+,+ -> +; column 4 -,-,+ -> -
    want_count = torch.tensor([[True, False, False, True, True],
                               [False, True, False, False, True],
                               [True, True, False, True, False]])
    assert torch.equal(sign_mask(deltas, "count"), want_count)


@FAST
@given(shape=shapes, n=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_ties_consensus_matches_reference_loop(shape, n, seed) -> None:
    """Normalised TIES (density 1) per entry: the weighted mean of the task vectors that agree with the sign of
    the weighted sum; 0 where none agrees."""
    taus = [_rand(shape, seed + i) for i in range(n)]
    ws = [float(w) for w in torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2 + 0.1]
    got = merge_task_vectors(METHODS.get("ties"), taus, MergeParams(weights=tuple(ws), normalize=True))
    flat = [t.reshape(-1).double() for t in taus]
    want = torch.zeros(flat[0].numel(), dtype=torch.float64)
    for j in range(want.numel()):
        vals = [w * f[j] for w, f in zip(ws, flat)]
        elected = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(v, w) for v, w in zip(vals, ws) if v != 0 and (v > 0) == (elected > 0)]
        if agree:
            want[j] = sum(v for v, _ in agree) / sum(w for _, w in agree)
    torch.testing.assert_close(got.reshape(-1).double(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# equivalence with mergekit 0.1.5
# --------------------------------------------------------------------------------------------------------

W = (0.7, 1.3)  # non-uniform expert weights
# case -> (moerge merge section, mergekit merge_method, per-model mergekit parameters, shared mergekit
# parameters, use the LoRA expert as the second expert)
CASES: dict[str, tuple[dict[str, Any], str, dict[str, Any], dict[str, Any], bool]] = {
    "linear": ({"method": "linear"}, "linear", {}, {}, False),
    "linear_sum": ({"method": "linear", "normalize": False}, "linear", {}, {"normalize": False}, False),
    "task_arithmetic": ({"method": "task_arithmetic", "lambda": 0.8}, "task_arithmetic", {}, {"lambda": 0.8},
                        False),
    "ties_d05": ({"method": "ties", "density": 0.5, "lambda": 0.8}, "ties", {"density": 0.5},
                 {"normalize": True, "lambda": 0.8}, False),
    "ties_d1": ({"method": "ties", "density": 1.0, "lambda": 1.2}, "ties", {"density": 1.0},
                {"normalize": True, "lambda": 1.2}, False),
    "dare_ties_d1": ({"method": "dare_ties", "density": 1.0, "lambda": 0.8}, "dare_ties", {"density": 1.0},
                     {"lambda": 0.8}, False),
    "dare_linear_d1": ({"method": "dare_linear", "density": 1.0, "lambda": 0.8}, "dare_linear", {"density": 1.0},
                       {"lambda": 0.8}, False),
    "breadcrumbs": ({"method": "breadcrumbs", "density": 0.8, "gamma": 0.05, "lambda": 0.8}, "breadcrumbs",
                    {"density": 0.8, "gamma": 0.05}, {"lambda": 0.8}, False),
    "lora_task_arithmetic": ({"method": "task_arithmetic", "lambda": 0.8}, "task_arithmetic", {}, {"lambda": 0.8},
                             True),
}
POOLS = ("llama_pool", "qwen2_pool")


def _experts(pool: dict[str, Any], lora: bool) -> list[tuple[str, Path]]:
    second = pool["lora"][0] if lora else pool["full"][1]
    return [("a", pool["full"][0]), ("b", second)]


def _mergekit_doc(name: str, pool: dict[str, Any], case: str) -> dict[str, Any]:
    _, method, per_model, shared, lora = CASES[case]
    base = str(pool["base"])
    models = []
    for (_, path), w in zip(_experts(pool, lora), W):
        ref = f"{base}+{path}" if (path / "adapter_config.json").is_file() else str(path)  # base+lora syntax
        models.append({"model": ref, "parameters": {"weight": w, **per_model}})
    doc: dict[str, Any] = {"name": name, "merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":  # linear averages the listed models; a base_model there would only pick the config
        doc["base_model"] = base
    if shared:
        doc["parameters"] = shared
    return doc


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no safetensors in {folder}"
    return out


@pytest.fixture(scope="module")
def mergekit_outputs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every (pool, case) merged by mergekit in one ``mergekit-multi`` run; name -> output folder."""
    pytest.importorskip("mergekit", reason="mergekit (the reference implementation) is not installed")
    exe = shutil.which("mergekit-multi", path=str(Path(sys.executable).parent)) or shutil.which("mergekit-multi")
    if exe is None:
        pytest.skip("mergekit-multi is not on PATH")
    work = tmp_path_factory.mktemp("mergekit")
    docs, folders = [], {}
    for pool_name in POOLS:
        pool = request.getfixturevalue(pool_name)
        for case in CASES:
            name = f"{pool_name}-{case}"
            docs.append(_mergekit_doc(name, pool, case))
            folders[name] = work / "out" / name
    (work / "config.yml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([exe, str(work / "config.yml"), "-I", str(work / "out"), "--no-cuda", "--quiet",
                          "--lora-merge-cache", str(work / "lora_cache"), "--no-write-model-card"],
                         check=False, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, f"mergekit-multi failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return folders


def _moerge_build(pool: dict[str, Any], case: str, out: Path) -> Path:
    merge, _, _, _, lora = CASES[case]
    experts = _experts(pool, lora)
    recipe = recipe_from_dict({
        "base": str(pool["base"]),
        "dtype": "float32",
        "experts": [{"name": n, "source": str(p)} for n, p in experts],
        "merge": {**merge, "weights": {n: w for (n, _), w in zip(experts, W)}},
    })
    return build(recipe, out, progress=False)


@pytest.mark.parametrize("pool_name", POOLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(pool_name: str, case: str, request: pytest.FixtureRequest,
                          mergekit_outputs: dict[str, Path], tmp_path: Path) -> None:
    pool = request.getfixturevalue(pool_name)
    ours = _load_folder(_moerge_build(pool, case, tmp_path / "moerge"))
    theirs = _load_folder(mergekit_outputs[f"{pool_name}-{case}"])
    assert sorted(ours) == sorted(theirs)
    worst, where = 0.0, ""
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == torch.float32, name
        assert t.shape == theirs[name].shape, name
        diff = (t - theirs[name]).abs().max().item()
        if diff > worst:
            worst, where = diff, name
    assert worst <= 1e-6, f"{case} on {pool_name}: max abs difference {worst:.3g} at {where}"
    if case != "linear" and case != "linear_sum":  # the merge must have moved something
        base = _load_folder(Path(pool["base"]))
        assert any(not torch.equal(ours[n], base[n]) for n in base)


def test_parallel_and_sequential_builds_are_identical(llama_pool: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    outs = []
    for workers in ("1", "3"):
        monkeypatch.setenv("MOERGE_WORKERS", workers)
        outs.append(_moerge_build(llama_pool, "ties_d05", tmp_path / f"w{workers}"))
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
