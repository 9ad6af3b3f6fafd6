"""Fast paths found by the real-pool benchmark (issue 6), checked against the slow ones.

* ``twin`` over a LoRA expert takes its SVD through the LoRA factors: same factors as the full SVD;
* a batch whose rows take different sequence routes works under bf16 autocast (the routed linear's output
  takes the dtype autocast gives it);
* during the decode steps of a generation the routed linears skip re-validating their weight cache (it is
  checked at the prefill), and a prefill after an in-place change still sees the change.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moerge.kinds import KindConfig
from moerge.kinds.twin import Twin, svd_factors
from moerge.modeling.modeling_moerge import RoutedLinear, RouteSlot


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_twin_through_lora_factors_matches_full_svd(rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)  # LoRA rank 4
    w_s = torch.randn(40, 24, generator=g)
    got = Twin().build(w_s, w_s + B @ A, (A, B), KindConfig(rank=rank))
    U, V = svd_factors(B @ A, rank)
    assert got["U"].shape == (40, rank) and got["V"].shape == (rank, 24)
    assert torch.allclose(got["U"] @ got["V"], U @ V, atol=1e-4)
    if rank >= 4:  # at or above the adapter's rank: exact
        assert torch.allclose(got["U"] @ got["V"], B @ A, atol=1e-4)


def test_twin_ignores_factors_that_do_not_match() -> None:
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    w_s, w_e = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g)  # not w_s + B @ A
    got = Twin().build(w_s, w_e, (A, B), KindConfig(rank=3))
    U, V = svd_factors(w_e - w_s, 3)
    assert torch.allclose(got["U"] @ got["V"], U @ V, atol=1e-4)


def _routed_linear(slot: RouteSlot) -> RoutedLinear:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    routed = RoutedLinear(lin, "lora", [{"A": [2, 16], "B": [8, 2]}] * 2, slot)
    for ex in routed.experts:
        for buf in ex.tensors().values():
            buf.copy_(torch.randn_like(buf))
    return routed


def test_mixed_row_routes_under_bf16_autocast() -> None:
    slot = RouteSlot()
    routed = _routed_linear(slot)
    route = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # (B, E): two groups
    slot.set_rows(route, max_groups=4)
    x = torch.randn(3, 5, 16)  # (B, T, I)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = routed(x)  # (B, T, O)
    assert y.shape == (3, 5, 8) and y.dtype == torch.bfloat16
    with torch.inference_mode():
        for b, e in enumerate([0, 1, 0]):
            want = x[b] @ (routed.weight + routed.delta(e)).T
            assert torch.allclose(y[b].float(), want, atol=0.1)


def test_decode_steps_reuse_the_cache_and_prefill_revalidates() -> None:
    slot = RouteSlot()
    routed = _routed_linear(slot)
    slot.set_rows(torch.tensor([[1.0, 0.0]]), max_groups=4)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        before = routed(x)  # prefill: validates and caches W_s + Δ_0
        routed.experts[0].tensors()["B"].mul_(2.0)  # in-place change
        slot.decode = True
        assert torch.equal(routed(x), before)  # decode step: the cache is trusted
        slot.decode = False
        after = routed(x)  # next prefill: the change is seen
    assert not torch.allclose(after, before)
    assert torch.allclose(after, x @ (routed.weight + routed.delta(0)).T, atol=1e-5)
