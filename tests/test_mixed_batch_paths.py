"""Mixed-route batches at sequence level, every kind: rows equal the rows alone, at prefill and over decode steps.

twin / lora (always) and bit1 / sparse (few rows per route, with the weight cache off) take the factorised path of
``RoutedLinear._forward_groups`` (``x W_s^T`` for every row plus each group's ``x Δ_e^T``); the others keep one
cached effective weight per route, applied by ``cached_linear``.  The kernels ``bit1_apply`` / ``sparse_apply`` /
``cached_linear`` are also checked against dense products.
"""

from __future__ import annotations

import pytest
import torch
from test_modeling import KINDS, build, left_pad, load, logits, point_prototypes_at, prompts3, save

from moerge.modeling.modeling_moerge import (
    DELTAS,
    SMALL_M,
    RoutedLinear,
    bit1_apply,
    bit1_lookup_index,
    cached_linear,
    sparse_apply,
    sparse_rows,
)


@pytest.mark.parametrize("shape", [(48, 37), (64, 64), (5, 8), (3, 1)])
def test_bit1_and_sparse_kernels_match_dense_delta(shape):
    torch.manual_seed(0)
    out_f, in_f = shape
    w = torch.zeros(out_f, in_f)
    x = torch.randn(5, in_f)
    signs = torch.randint(0, 256, (out_f, (in_f + 7) // 8), dtype=torch.uint8)
    if in_f % 8:  # pad bits are 0 in the format
        signs[:, -1] &= (1 << (in_f % 8)) - 1
    scale = torch.rand(out_f)
    dense = DELTAS["bit1"]({"signs": signs, "scale": scale}, w)
    assert (bit1_apply(x, bit1_lookup_index(signs), scale) - x @ dense.T).abs().max() <= 1e-5
    for shuffled in (False, True):
        k = max(1, out_f * in_f // 7)
        idx = torch.randperm(out_f * in_f)[:k]
        idx = idx if shuffled else idx.sort().values
        values = torch.randn(k)
        t = {"indices": idx.to(torch.int32), "values": values}
        dense = DELTAS["sparse"](t, w)
        got = sparse_apply(x, *sparse_rows(t["indices"], values, shape))
        assert (got - x @ dense.T).abs().max() <= 1e-5


@pytest.mark.parametrize("base_name", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_route_batch_equals_rows_alone_every_kind(tmp_path, base_name, kind):
    config, sd, _, _ = build(base_name, kind, "sequence")
    model = load(save(tmp_path / "m", config, sd))
    prompts = prompts3()
    point_prototypes_at(model, prompts)
    ids, mask = left_pad(prompts)
    batch_logits = logits(model, ids, mask)
    assert model.last_routes().argmax(-1).tolist() == [0, 1, 2]
    # cached: one effective weight (+ bias) per route and routed linear, except for the factorised kinds
    routed = [m for m in model.modules() if isinstance(m, RoutedLinear)]
    one_route = sum(t.numel() * t.element_size() for m in routed for t in (m.weight, m.bias) if t is not None)
    assert model.route_cache_bytes() == (0 if kind in ("twin", "lora") else 3 * one_route)
    for i, p in enumerate(prompts):
        assert (batch_logits[i, -1] - logits(model, p[None])[0, -1]).abs().max() <= 1e-4
    model.clear_route_cache()
    seen = []
    original = RoutedLinear._factored_groups

    def spy(self, x, groups, caching):
        used = original(self, x, groups, caching)
        seen.append((x.shape[1], used))
        return used

    RoutedLinear._factored_groups = spy
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                 pad_token_id=0, min_new_tokens=5)
    finally:
        RoutedLinear._factored_groups = original
    decode = {used for t, used in seen if t == 1}
    assert decode == ({True} if kind in ("twin", "lora") else {False})
    if kind in ("bit1", "sparse"):  # without the weight cache: the bit1 / sparse kernels, same logits
        seen.clear()
        caching = RoutedLinear._caching
        RoutedLinear._factored_groups, RoutedLinear._caching = spy, lambda self: False
        try:
            uncached = logits(model, ids, mask)
        finally:
            RoutedLinear._factored_groups, RoutedLinear._caching = original, caching
        assert {used for _, used in seen} == {True}
        assert model.last_routes().argmax(-1).tolist() == [0, 1, 2]
        assert (uncached - batch_logits).abs().max() <= 1e-4
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], max_new_tokens=5, do_sample=False, pad_token_id=0,
                               min_new_tokens=5)
        assert out[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()


@pytest.mark.parametrize("in_f", [7, 1024, 2 * 1024 + 300])
@pytest.mark.parametrize("rows", [1, 2, SMALL_M, SMALL_M + 1, 19])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cached_linear_equals_linear(in_f, rows, with_bias):
    torch.manual_seed(in_f + rows)
    w = torch.randn(40, in_f)
    b = torch.randn(40) if with_bias else None
    x = torch.randn(rows, 1, in_f)  # (B, T, I)
    got = cached_linear(x, w, b)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (rows, 1, 40) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-6 * in_f  # fp32 rounding of an in_f-term sum of O(1) terms
    if rows == 1 or rows > SMALL_M:  # one row (GEMV) and many rows are F.linear's own product
        assert torch.equal(got, torch.nn.functional.linear(x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same bf16 product as F.linear under autocast
        assert torch.equal(cached_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    wb, bb = w.bfloat16(), None if b is None else b.bfloat16()  # half precision keeps F.linear
    assert torch.equal(cached_linear(x.bfloat16(), wb, bb), torch.nn.functional.linear(x.bfloat16(), wb, bb))