"""``moerge.linalg``: exact and randomized low-rank factors.

* at full rank both methods reproduce the matrix;
* on spectra like real task vectors (fast, power-law, slow, flat, low rank + noise floor, a tiny gap at the rank),
  tall, wide and square, the randomized factors' relative Frobenius error is within 1% of the exact truncated
  SVD's (``err_rand <= 1.01 * err_exact``); the same on real deltas of the full-fine-tune SmolLM2 pool when it is
  in ``~/.cache/moerge`` (skipped otherwise);
* same seed -> same bytes; the row-block operator (a matrix streamed from disk) gives the dense operator's factors;
* results are float32 on the input's device (the ``cuda`` case is skipped without a GPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moerge.linalg import (
    NITER,
    OVERSAMPLE,
    choose_method,
    dense_operator,
    iter_row_blocks,
    low_rank_factors,
    randomized_factors,
    relative_error,
    row_block_operator,
    svd_factors,
)

BOUND = 1.01  # err_rand <= BOUND * err_exact
RANK = 16
PROFILES = ("exp", "pow2", "pow1", "pow0.5", "pow0.25", "pow0.1", "flat", "lowrank+noise", "gap")
SHAPES = ((256, 1024), (1024, 256), (512, 512))
POOL = Path.home() / ".cache" / "moerge"
TASKS = ("imdb", "tweets", "bbc", "arith")
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")))


def spectrum(profile: str, n: int) -> torch.Tensor:
    """Singular values (n,) of one decay profile, largest first."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    if profile == "exp":
        return torch.exp(-i / 8)
    if profile.startswith("pow"):
        return i ** -float(profile[3:])
    if profile == "flat":
        return torch.ones(n, dtype=torch.float64)
    if profile == "lowrank+noise":  # a LoRA-like head over a flat floor
        return torch.where(i <= 24, 10 * i ** -0.5, torch.full_like(i, 0.3))
    if profile == "gap":  # nearly flat, a 10% gap right at the rank: the hardest for a sketch
        return torch.where(i <= RANK, 1.0, 0.9)
    raise ValueError(profile)


def with_spectrum(shape: tuple[int, int], profile: str, seed: int = 0) -> torch.Tensor:
    """A float32 (O, I) matrix U diag(s) V^T with Haar-random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64)).Q  # (O, k)
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64)).Q  # (I, k)
    return ((u * spectrum(profile, k)) @ v.T).float()  # (O, I)


def error_ratio(delta: torch.Tensor, rank: int = RANK) -> tuple[float, float]:
    """(err_rand / err_exact, err_exact) for ``delta`` at ``rank`` with the default oversample / niter."""
    exact = relative_error(delta, *low_rank_factors(delta, rank, method="exact"))
    rand = relative_error(delta, *low_rank_factors(delta, rank, method="randomized", seed=1))
    return rand / max(exact, 1e-12), exact


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_full_rank_is_exact(method: str, shape: tuple[int, int]) -> None:
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    U, V = low_rank_factors(a, min(shape), method=method)  # type: ignore[arg-type]
    assert U.shape == (shape[0], min(shape)) and V.shape == (min(shape), shape[1])
    assert relative_error(a, U, V) < 1e-5


def test_rank_is_clamped_and_low_rank_matrix_recovered() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, 5, generator=g) @ torch.randn(5, 300, generator=g)  # rank 5
    U, V = low_rank_factors(a, 8, method="randomized")
    assert U.shape == (200, 8) and V.shape == (8, 300)
    assert relative_error(a, U, V) < 1e-5
    U, V = low_rank_factors(a[:6, :7], 50, method="randomized")  # rank above min(O, I): min(O, I) factors
    assert U.shape == (6, 6) and V.shape == (6, 7)


def test_singular_values_folded_into_U_and_V_orthonormal() -> None:
    a = with_spectrum((300, 200), "pow1")
    U, V = low_rank_factors(a, RANK, method="randomized")
    torch.testing.assert_close(V @ V.T, torch.eye(RANK), atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(a)[:RANK]
    torch.testing.assert_close(U.norm(dim=0), s, rtol=1e-3, atol=0)  # column norms = singular values


# ------------------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("profile", PROFILES)
def test_randomized_within_one_percent_of_exact(profile: str, shape: tuple[int, int]) -> None:
    ratio, exact = error_ratio(with_spectrum(shape, profile))
    assert ratio <= BOUND, f"{profile} {shape}: err_rand / err_exact = {ratio:.4f} (err_exact {exact:.4f})"


def test_fewer_power_iterations_are_measurably_worse() -> None:
    """The accuracy bound is carried by the power iterations: without them the slow profile fails it."""
    a = with_spectrum((256, 1024), "pow0.25")
    exact = relative_error(a, *svd_factors(a, RANK))
    none = relative_error(a, *randomized_factors(dense_operator(a), RANK, oversample=OVERSAMPLE, niter=0, seed=1))
    full = relative_error(a, *randomized_factors(dense_operator(a), RANK, oversample=OVERSAMPLE, niter=NITER, seed=1))
    assert none > BOUND * exact and full < none


def _real_pairs() -> list[tuple[str, Path]]:
    base = POOL / "smollm2-135m-instruct" / "model.safetensors"
    ready = [(t, POOL / "smollm2-135m-instruct-full" / t) for t in TASKS]
    return [(t, p / "model.safetensors") for t, p in ready
            if base.is_file() and (p / "train.json").is_file() and (p / "model.safetensors").is_file()]


@pytest.mark.parametrize("task", TASKS)
def test_randomized_within_one_percent_on_real_deltas(task: str) -> None:
    pairs = dict(_real_pairs())
    if task not in pairs:
        pytest.skip(f"full-fine-tune expert '{task}' not in {POOL} (tools: shared/pool/full)")
    from safetensors import safe_open

    base_file = POOL / "smollm2-135m-instruct" / "model.safetensors"
    with safe_open(str(base_file), "pt") as hb, safe_open(str(pairs[task]), "pt") as he:
        n_layers = 1 + max(int(k.split(".")[2]) for k in hb.keys() if k.startswith("model.layers."))  # noqa: SIM118
        names = [f"model.layers.{layer}.{mod}.weight" for layer in (0, n_layers // 2, n_layers - 1)
                 for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        worst = max((error_ratio(he.get_tensor(n).float() - hb.get_tensor(n).float())[0], n) for n in names)
    assert worst[0] <= BOUND, f"{task}: worst err_rand / err_exact {worst[0]:.4f} at {worst[1]}"


# ------------------------------------------------------------------------------------------------ contract


def test_same_seed_same_bytes_and_seed_matters() -> None:
    a = with_spectrum((300, 500), "pow0.5")
    U1, V1 = low_rank_factors(a, RANK, method="randomized", seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    U2, V2 = low_rank_factors(a, RANK, method="randomized", seed=7)
    assert torch.equal(U1, U2) and torch.equal(V1, V2)
    U3, _ = low_rank_factors(a, RANK, method="randomized", seed=8)
    assert not torch.equal(U1, U3)


def test_row_block_operator_matches_dense() -> None:
    a = with_spectrum((333, 200), "pow0.5").to(torch.bfloat16)  # bf16 on disk, odd row count
    op = row_block_operator((333, 200), lambda: iter_row_blocks(a, 64))
    U, V = randomized_factors(op, RANK, seed=2)
    Ud, Vd = low_rank_factors(a, RANK, method="randomized", seed=2)
    torch.testing.assert_close(U @ V, Ud @ Vd, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_float32_on_the_input_device(device: str, method: str) -> None:
    a = with_spectrum((256, 384), "pow1").to(device=device, dtype=torch.bfloat16)
    U, V = low_rank_factors(a, RANK, method=method)  # type: ignore[arg-type]
    assert U.device.type == device and V.device.type == device
    assert U.dtype == V.dtype == torch.float32
    ratio, _ = error_ratio(a.float())
    assert ratio <= BOUND
    if device != "cpu":
        Uc, Vc = low_rank_factors(a.cpu(), RANK, method=method)  # type: ignore[arg-type]
        torch.testing.assert_close((U @ V).cpu(), Uc @ Vc, atol=1e-3, rtol=1e-3)


def test_auto_picks_exact_for_small_or_thick_and_randomized_for_large_thin() -> None:
    assert choose_method((128, 4096), RANK) == "exact"  # short side small
    assert choose_method((1024, 1024), 400) == "exact"  # sketch not much thinner than the matrix
    assert choose_method((4096, 14336), RANK) == "randomized"
    assert choose_method((1024, 1024), 256) == "randomized"
    a = with_spectrum((600, 700), "pow0.5")
    assert choose_method(tuple(a.shape), RANK) == "randomized"
    Ua, Va = low_rank_factors(a, RANK, method="auto")
    Ur, Vr = low_rank_factors(a, RANK, method="randomized")
    assert torch.equal(Ua, Ur) and torch.equal(Va, Vr)


@pytest.mark.parametrize(("delta", "kwargs", "match"), [
    (torch.zeros(3, 4, 5), {"rank": 2}, "matrix"),
    (torch.zeros(4, 5), {"rank": 2, "method": "lanczos"}, "unknown method"),
    (torch.zeros(4, 5), {"rank": 0}, "rank"),
])
def test_bad_arguments_raise(delta: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        low_rank_factors(delta, **kwargs)
