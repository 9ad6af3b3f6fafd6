"""The expert kinds of the model side (``ExpertKind`` classes in ``KIND_IMPLS``), each against its dense Δ_e.

Every kind's ``apply`` (factorised, row kernels, cached dense Δ) equals ``x @ Δ_e^T`` for few and many tokens, and
its ``combine`` equals ``W_s + Σ r_e Δ_e`` (``dense`` with Σ r = 1: exactly ``Σ r_e W_e``); a kind registered
outside the model file with ``@expert_kind`` works through every route path of ``RoutedLinear``.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from test_modeling_golden import routed_linear
from torch import nn

from moerge.modeling import DELTAS, KIND_IMPLS, ExpertKind, expert_kind
from moerge.modeling.modeling_moerge import SMALL_ROWS, RoutedLinear, RouteSlot

KINDS = ["dense", "wemoe", "twin", "bit1", "lora", "sparse"]


def test_every_kind_is_registered_with_its_fixed_dtypes() -> None:
    assert sorted(KIND_IMPLS) == sorted(KINDS)
    assert all(issubclass(impl, ExpertKind) and impl.name == name for name, impl in KIND_IMPLS.items())
    assert KIND_IMPLS["bit1"].dtypes == {"signs": torch.uint8}
    assert KIND_IMPLS["sparse"].dtypes == {"indices": torch.int32}
    assert sorted(DELTAS) == sorted(KINDS)  # the compatibility mapping follows the registry
    with pytest.raises(ValueError, match="unknown expert kind 'nope'"):
        RoutedLinear(nn.Linear(4, 4), "nope", [], RouteSlot())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens", [3, SMALL_ROWS + 5])  # row kernels / dense Δ
@pytest.mark.parametrize("cached", [False, True])
def test_apply_equals_the_dense_delta(kind: str, tokens: int, cached: bool) -> None:
    routed, _ = routed_linear(kind, torch.float32)
    impl, w = KIND_IMPLS[kind], routed.weight.detach()
    x = torch.randn(tokens, routed.in_features)
    cache: dict | None = {} if cached else None
    for e in range(len(routed.experts)):
        t = routed.experts[e].tensors()
        want = x @ DELTAS[kind](t, w).T  # (n, O)
        assert torch.allclose(impl.apply(t, x, w, cache), want, atol=1e-5), (kind, e)
        if cache is not None:  # bit1 / sparse keep what they built; a second call reads it
            assert torch.allclose(impl.apply(t, x, w, cache), want, atol=1e-5)
            assert set(cache) <= {"delta", "rows"}
            assert bool(cache) == (kind in ("bit1", "sparse"))
            cache.clear()


@pytest.mark.parametrize("kind", KINDS)
def test_combine_is_shared_plus_weighted_deltas(kind: str) -> None:
    routed, _ = routed_linear(kind, torch.float32)
    with torch.no_grad():
        for key in [(0.0, 1.0, 0.0), (0.3, 0.2, 0.0), (0.25, 0.25, 0.5), (0.0, 0.0, 0.0)]:
            want = routed.weight + sum(r * routed.delta(e) for e, r in enumerate(key))
            w, b = routed.combine(key)
            assert torch.allclose(w, want, atol=1e-6), (kind, key)
            bias = routed.bias + sum(r * ex.bias_delta for r, ex in zip(key, routed.experts))
            assert torch.allclose(b, bias, atol=1e-6)
        if kind == "dense":  # forcing expert t gives W_t to the bit
            assert torch.equal(routed.combine((0.0, 1.0, 0.0))[0], routed.experts[1].weight)


def test_shared_plus_deltas_choice() -> None:
    assert all(KIND_IMPLS[k].shared_plus_deltas(10**6, True) for k in ("twin", "lora"))
    assert not any(KIND_IMPLS[k].shared_plus_deltas(1, c) for k in ("dense", "wemoe") for c in (False, True))
    for k in ("bit1", "sparse"):
        impl = KIND_IMPLS[k]
        assert impl.shared_plus_deltas(SMALL_ROWS, False) and not impl.shared_plus_deltas(SMALL_ROWS + 1, False)
        assert not impl.shared_plus_deltas(1, True)  # a cached effective weight is faster


@pytest.fixture
def row_scale_kind():
    """A kind defined here: Δ_e = d_e[:, None] * W_s (a per-row rescale of the shared weight)."""

    @expert_kind("row_scale")
    class RowScale(ExpertKind):
        dtypes: ClassVar[dict[str, torch.dtype]] = {}

        @staticmethod
        def delta(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
            return t["d"][:, None] * w

    try:
        yield RowScale
    finally:
        KIND_IMPLS.pop("row_scale")


def test_a_kind_defined_elsewhere_works_in_every_path(row_scale_kind) -> None:
    torch.manual_seed(0)
    slot = RouteSlot()
    routed = RoutedLinear(nn.Linear(12, 6), "row_scale", [{"d": [6], "bias_delta": [6]}] * 2, slot)
    with torch.no_grad():
        for ex in routed.experts:
            ex.d.copy_(torch.randn(6))
            ex.bias_delta.copy_(torch.randn(6))
    w_e = [routed.weight * (1 + ex.d[:, None]) for ex in routed.experts]  # (O, I)
    b_e = [routed.bias + ex.bias_delta for ex in routed.experts]
    x = torch.randn(3, 4, 12)  # (B, T, I)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # (B, E): three groups
    tokens = torch.softmax(torch.randn(3, 4, 2), -1)  # (B, T, E)
    tokens[0, 1] = torch.tensor([0.0, 1.0])
    cases = [(rows, 4), (rows, 1), (rows[:, None].expand(-1, 4, -1).contiguous(), 0), (tokens, 0)]
    for route, max_groups in cases:  # grouped rows, too many routes to group (per-row path), token routes
        if route.dim() == 3:
            slot.set_tokens(route)
        else:
            slot.set_rows(route, max_groups=max_groups)
        r = route if route.dim() == 3 else route[:, None].expand(-1, 4, -1)  # (B, T, E)
        want = sum(r[..., e : e + 1] * (x @ w_e[e].T + b_e[e]) for e in range(2))  # Σ r = 1
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                assert torch.allclose(routed(x), want, atol=1e-5), (route.dim(), max_groups, grad)
