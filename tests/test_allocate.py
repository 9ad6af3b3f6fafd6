"""Mixed kinds and ranks in one checkpoint, and the activation-based budget allocator, on tiny full-rank experts.

Invariants: a plan whose units take different kinds (and different ranks / densities per expert, or nothing for
one expert) writes a checkpoint that loads in a fresh process without moerge and generates, with a forced
route reproducing the expert that every unit stores exactly; at a budget that fits everything the allocated
plan routes every unit exactly (forced routes reproduce each expert's logits); the written files never exceed
the budget; a unit with zero measured gain is never routed ahead of one with gain.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from isolation import fresh_process_logits
from transformers import AutoModelForCausalLM

import moerge
from moerge.analysis import activations as act
from moerge.io.atomic import atomic_output
from moerge.kinds import KINDS, KindConfig
from moerge.pipeline import plan_for, plan_text
from moerge.pipeline.output import write_moerge
from moerge.pipeline.routed import RoutedUnit
from moerge.recipe import recipe_from_dict
from moerge.testing import tiny

TASKS = ("sentiment", "topic")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """llama (hidden 32, 2 layers, untied): two experts moving every linear and every layer norm (full rank),
    and two moving only the MLPs (attention units then have zero gain)."""
    root = tmp_path_factory.mktemp("alloc")
    base = tiny.make_base(root / "base", family="llama", hidden=32, layers=2, tie=False, seed=0)
    full = [tiny.make_full_expert(base, root / f"full{i}", seed=10 + i, scale=0.5,
                                  modules=("self_attn", "mlp", "layernorm")) for i in range(2)]
    mlp = [tiny.make_full_expert(base, root / f"mlp{i}", seed=20 + i, scale=0.5, modules=("mlp",)) for i in range(2)]
    data = {t: tiny.make_task_data(root / "data" / f"{t}.jsonl", t, 16, seed=1) for t in TASKS}
    return {"root": root, "base": base, "full": full, "mlp": mlp, "data": data}


def _recipe(pool: dict, sources: list[Path], budget: str, **allocate) -> dict:
    experts = [{"name": f"e{i}", "source": str(s),
                "calibration": {"data": str(pool["data"][TASKS[i]]), "max_samples": 16, "chat_template": True}}
               for i, s in enumerate(sources)]
    return {"base": str(pool["base"]), "experts": experts, "merge": {"method": "task_arithmetic", "lambda": 0.5},
            "routing": {"select": {"budget": budget, "metric": "activation"}, "modules": "both",
                        "allocate": {"kinds": ["twin", "bit1", "sparse", "dense"], **allocate},
                        "router": {"level": "sequence", "init": "prototype"}}}


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 99, 7, 256, 3, 11]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _assert_forced_reproduces(out: Path, sources: list[Path], tol: float = 1e-4) -> None:
    moe = _load(out)
    for e, src in enumerate(sources):
        moe.force_route(f"e{e}")
        err = (_logits(moe) - _logits(_load(src))).abs().max()
        assert err <= tol, (e, float(err))


# ---------------------------------------------------------------- mixed kinds and ranks (no allocator)

def _mixed_plan(pool: dict) -> moerge.pipeline.Plan:
    """A twin-all plan rewritten by hand: L0 attention dense, L0 MLP twin (e0 full rank, e1 rank 2), L1 attention
    sparse (e0 every entry, e1 nothing), L1 MLP twin (e0 full rank, e1 nothing)."""
    raw = _recipe(pool, pool["full"], "2x")
    raw["routing"] = {"select": {"all": True}, "modules": "both", "expert": {"kind": "twin", "rank": 4},
                      "router": {"level": "sequence", "init": "prototype"}}
    plan = plan_for(recipe_from_dict(raw), progress=False, device="cpu")
    u = {ru.unit.path: ru.unit for ru in plan.routed}
    full, sparse_all = KindConfig(rank=32), KindConfig(density=1.0)

    def per(unit: str, e0: KindConfig | None, e1: KindConfig | None) -> dict:
        return {k: v for lin in u[unit].linears for k, v in (((lin.name, 0), e0), ((lin.name, 1), e1))}

    plan.routed = [
        RoutedUnit(u["model.layers.0.self_attn"], KINDS.get("dense"), KindConfig()),
        RoutedUnit(u["model.layers.0.mlp"], KINDS.get("twin"), KindConfig(),
                   per("model.layers.0.mlp", full, KindConfig(rank=2))),
        RoutedUnit(u["model.layers.1.self_attn"], KINDS.get("sparse"), KindConfig(),
                   per("model.layers.1.self_attn", sparse_all, None)),
        RoutedUnit(u["model.layers.1.mlp"], KINDS.get("twin"), KindConfig(), per("model.layers.1.mlp", full, None)),
    ]
    return plan


def test_mixed_kinds_and_ranks_load_fresh_and_generate(pool: dict, tmp_path: Path) -> None:
    plan = _mixed_plan(pool)
    out = tmp_path / "mixed"
    with atomic_output(out) as tmp:
        write_moerge(plan, tmp, progress=False)
    units = _load(out).config.moerge["units"]
    assert {u["kind"] for u in units.values()} == {"dense", "twin", "sparse"}
    mlp0 = units["model.layers.0.mlp"]["linears"]["down_proj"]["experts"]
    assert mlp0[0]["U"] == [32, 32] and mlp0[1]["U"] == [32, 2]
    assert units["model.layers.1.self_attn"]["linears"]["q_proj"]["experts"][1]["values"] == [0]
    _assert_forced_reproduces(out, pool["full"][:1])  # e0 is stored exactly in every unit
    moe = _load(out)
    moe.force_route("e1")
    want = _logits(moe)
    assert (fresh_process_logits(out, _ids(), "e1", tmp_path) - want).abs().max() <= 1e-5


# ---------------------------------------------------------------- the allocator end to end

def test_budget_that_fits_everything_routes_every_unit_exactly(pool: dict) -> None:
    raw = _recipe(pool, pool["full"], "20x", ranks=[1, 4, 32])
    out = pool["root"] / "alloc_all"
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False, device="cpu")
    units = _load(out).config.moerge["units"]
    assert len(units) == 4
    _assert_forced_reproduces(out, pool["full"])


@pytest.mark.parametrize("budget", ["1.2x", "1.35x", "1.6x"])
def test_written_checkpoint_stays_within_budget(pool: dict, budget: str) -> None:
    recipe = recipe_from_dict(_recipe(pool, pool["full"], budget))
    plan = plan_for(recipe, progress=False, device="cpu")
    out = pool["root"] / f"alloc_{budget}"
    moerge.build(recipe, out, force=True, progress=False, device="cpu")
    ratio = float(budget.rstrip("x"))
    assert plan.routed, "a budget above the base's bytes routes something here"
    assert _file_bytes(out) <= ratio * plan.base_bytes(), (_file_bytes(out), plan.base_bytes())


def test_zero_gain_units_are_never_routed(pool: dict) -> None:
    """The experts move only the MLPs: the attention units' measured gain is zero, so neither a tight budget nor
    one that fits everything routes them (routing them would spend bytes for nothing)."""
    for budget in ("1.2x", "20x"):
        plan = plan_for(recipe_from_dict(_recipe(pool, pool["mlp"], budget)), progress=False, device="cpu")
        routed = {ru.unit.path for ru in plan.routed}
        assert routed and all(p.endswith(".mlp") for p in routed), (budget, routed)
        assert all(ru.gain is not None and ru.gain["before"] > ru.gain["after"] for ru in plan.routed)


def test_plan_prints_choice_and_gain(pool: dict) -> None:
    text = plan_text(recipe_from_dict(_recipe(pool, pool["full"], "1.25x")), device="cpu")
    assert "gain/MB" in text and "error merged" in text and "shared weight" in text
    assert "routed" in text


def test_activation_needs_budget_and_calibration(pool: dict) -> None:
    raw = _recipe(pool, pool["full"], "1.1x")
    raw["routing"]["select"] = {"metric": "activation", "all": True}
    with pytest.raises(moerge.errors.RecipeError, match="budget"):
        plan_for(recipe_from_dict(raw), progress=False, device="cpu")
    raw = _recipe(pool, pool["full"], "1.1x")
    del raw["experts"][1]["calibration"]
    with pytest.raises(moerge.errors.RecipeError, match="calibration"):
        plan_for(recipe_from_dict(raw), progress=False, device="cpu")


# ---------------------------------------------------------------- the knapsack (pure)

def _opt(label: str, nbytes: int, error: float) -> act.Option:
    return act.Option(label, nbytes, error)


def test_knapsack_prefers_gain_and_keeps_zero_gain_merged() -> None:
    groups = {
        "flat": {"merged": {"a": [_opt("none", 0, 1.0)]}, "twin": {"a": [_opt("r0", 0, 1.0), _opt("r1", 10, 1.0)]}},
        "steep": {"merged": {"a": [_opt("none", 0, 5.0)]},
                  "twin": {"a": [_opt("r0", 0, 5.0), _opt("r1", 10, 2.0), _opt("r2", 20, 0.5)]}},
    }
    for budget in (10, 25, 1000):
        picked = act.allocate(groups, budget)
        assert picked["flat"][0] == "merged" or all(o.nbytes == 0 for o in picked["flat"][1].values())
        assert picked["steep"][0] == "twin"
        spent = sum(o.nbytes for _, opts in picked.values() for o in opts.values())
        assert spent <= budget
    assert act.allocate(groups, 1000)["steep"][1]["a"].label == "r2"
    assert act.allocate(groups, 5)["steep"][0] == "merged"  # nothing fits: every unit stays merged


def test_twin_spectrum_tail_is_the_factor_error() -> None:
    g = torch.Generator().manual_seed(0)
    delta, x = torch.randn(12, 16, generator=g), torch.randn(64, 16, generator=g)
    c = act.second_moment(x)
    wh = act.Whitener.of(c, 1e-6)
    spec = act.twin_spectrum(delta, wh)
    for r in (1, 4, 12):
        u, v = act.twin_factors(delta, wh, r)
        got = act.quad_error(delta - u @ v, act.damped(c, 1e-6))
        assert abs(got - float(spec[r:].sum())) <= 1e-3 * float(spec.sum())


def test_randomized_twin_factors_are_seeded_and_thread_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small ranks of large linears take the randomized SVD: near the exact error, and the same bytes from any
    thread without touching the global RNG (the build computes linears in worker threads, which share it: two
    builds of one recipe once differed in a few factors by up to 100%)."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(0)
    decay = 0.8 ** torch.arange(80.0)  # a decaying spectrum, as deltas have
    deltas = [torch.randn(96, 80, generator=g) * decay for _ in range(4)]  # (O, I) with I's columns scaled
    c = act.second_moment(torch.randn(256, 80, generator=g))
    wh = act.Whitener.of(c, 1e-6)
    rank = 4  # 4 * (4 + 8) <= 80: the randomized path
    want = [act.twin_factors(d, wh, rank) for d in deltas]
    for d, (u, v) in zip(deltas, want):
        tail = float(act.twin_spectrum(d, wh)[rank:].sum())
        assert act.quad_error(d - u @ v, act.damped(c, 1e-6)) <= 1.01 * tail + 1e-6

    def global_rng(*args: object, **kwargs: object) -> None:
        raise AssertionError("twin_factors used the global RNG")

    monkeypatch.setattr(torch, "manual_seed", global_rng)
    monkeypatch.setattr(torch, "svd_lowrank", global_rng)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda d: act.twin_factors(d, wh, rank), deltas * 3))
    for (u, v), (wu, wv) in zip(got, want * 3):
        assert torch.equal(u, wu) and torch.equal(v, wv)


def test_upgrade_spends_the_room_a_fixed_kind_leaves() -> None:
    """A unit left at bit1 (one fixed size) switches to twin when the room left buys a lower error there."""
    groups = {"u": {"merged": {"a": [_opt("none", 0, 10.0)]},
                    "bit1": {"a": [_opt("none", 0, 10.0), _opt("bit1", 10, 2.0)]},
                    "twin": {"a": [_opt("r0", 0, 10.0), _opt("r1", 8, 4.0), _opt("r4", 30, 0.5)]}}}
    start = {"u": ("bit1", {"a": groups["u"]["bit1"]["a"][1]})}
    kind, picks = act.upgrade(groups, dict(start), 40)["u"]
    assert (kind, picks["a"].label) == ("twin", "r4")
    assert act.upgrade(groups, dict(start), 20)["u"] == start["u"]  # twin r4 does not fit: bit1 stays


def test_router_tap_after_routed_units_uses_a_prepass(pool: dict) -> None:
    """``router.tap: 1`` with layer 0 routed: the route comes from a pre-pass of the shared model; the unforced
    forward equals the forward forced to the route it chose, and generation (decode steps keep the route) runs."""
    raw = _recipe(pool, pool["full"], "2x")
    raw["routing"] = {"select": {"all": True}, "modules": "both", "expert": {"kind": "twin", "rank": 4},
                      "router": {"level": "sequence", "init": "prototype", "tap": 1}}
    out = pool["root"] / "tap"
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False, device="cpu")
    moe = _load(out)
    assert moe.config.moerge["prepass"] is True
    assert moe.config.moerge["router_input"] == "model.layers.1.self_attn"
    ids = torch.tensor([[5, 17, 42, 99, 7, 256, 3, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
    with torch.no_grad():
        free = moe(input_ids=ids).logits
        routes = moe.last_routes()
        for b in range(2):
            moe.force_route({n: float(w) for n, w in zip(moe.expert_names, routes[b])})
            assert (moe(input_ids=ids[b:b + 1]).logits - free[b:b + 1]).abs().max() <= 1e-5
        moe.force_route(None)
        assert moe.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 11)
    raw["routing"]["router"]["tap"] = 5
    with pytest.raises(moerge.errors.RecipeError, match="tap"):
        plan_for(recipe_from_dict(raw), progress=False, device="cpu")


def test_analyze_writes_the_allocation(pool: dict, tmp_path: Path) -> None:
    import json

    from moerge.pipeline import analyze_text

    text = analyze_text(recipe_from_dict(_recipe(pool, pool["mlp"], "1.2x")), tmp_path / "a", device="cpu")
    data = json.loads((tmp_path / "a" / "allocation.json").read_text())
    assert data["units"] and all(u["group"] == "mlp" and u["before"] > u["after"] for u in data["units"])
    assert (tmp_path / "a" / "allocation.png").stat().st_size > 0 and "gain/MB" in text


def test_moments_are_the_inputs_second_moments(pool: dict) -> None:
    """q/k/v share one site; its moment is Σ x xᵀ of the real (unpadded) tokens entering q_proj."""
    from moerge.pipeline import moments as mom
    from moerge.pipeline.context import BuildContext

    ctx = BuildContext.open(recipe_from_dict(_recipe(pool, pool["full"], "2x")))
    lins = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    texts = ["good movie loved it", "the market report today was long and dull"]
    tok = ctx.tokenizer()
    m = mom.collect(ctx, 0, texts, tok, lins)
    assert m.site[lins[0]] == m.site[lins[1]] and m.site[lins[2]] == lins[2]
    model = mom.expert_model(ctx, 0)
    seen: list[torch.Tensor] = []
    for path in (lins[0], lins[2]):
        h = model.get_submodule(path).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        for t in texts:  # one prompt at a time: no padding
            with torch.no_grad():
                model(**tok([t], return_tensors="pt", add_special_tokens=False))
        h.remove()
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()  # (N, I)
        assert torch.allclose(m.of(path), x.T @ x, rtol=1e-4, atol=1e-5)
        seen.clear()
    assert m.tokens == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


# ---------------------------------------------------------------- sensitivity: fisher (output-gradient row weights)

def test_fisher_moments_are_output_gradient_moments(pool: dict) -> None:
    """Batched and padded, the output-gradient moment of a linear is Σ_t (∂ℓ/∂y_t)² of ℓ = -log p(top token) at
    each prompt's last token, as autograd gives it one unpadded prompt at a time."""
    from moerge.pipeline import moments as mom
    from moerge.pipeline.context import BuildContext

    ctx = BuildContext.open(recipe_from_dict(_recipe(pool, pool["full"], "2x", sensitivity="fisher")))
    lins = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    texts = ["good movie loved it", "the market report today was long and dull", "ok"]
    tok = ctx.tokenizer()
    m = mom.collect(ctx, 1, texts, tok, lins, fisher=True)
    model = mom.expert_model(ctx, 1)
    want = {p: torch.zeros(model.get_submodule(p).out_features, dtype=torch.float64) for p in lins}
    outs: dict[str, torch.Tensor] = {}
    for t in texts:
        outs.clear()
        hs = [model.get_submodule(p).register_forward_hook(lambda _m, _a, o, p=p: outs.__setitem__(p, o)) for p in lins]
        logits = model(**tok([t], return_tensors="pt", add_special_tokens=False)).logits[0, -1]  # (V,)
        for h in hs:
            h.remove()
        loss = -torch.log_softmax(logits, -1)[logits.argmax()]
        grads = torch.autograd.grad(loss, [outs[p] for p in lins])
        for p, g in zip(lins, grads):
            want[p] += g[0].double().pow(2).sum(0)
    for p in lins:
        got = m.grad(p)
        assert got.shape == want[p].shape and bool((got > 0).any())
        assert torch.allclose(got, want[p], rtol=1e-3, atol=1e-12 + 1e-4 * float(want[p].max())), p


def test_row_weighted_twin_factors_are_optimal_in_the_weighted_metric() -> None:
    """Factors of W^½ Δ mapped back by W^-½ leave the weighted error the spectrum's tail says, and less of it
    than the unweighted activation-aware factors of the same rank; uniform weights change nothing."""
    from moerge.pipeline.allocate import weigh_rows

    g = torch.Generator().manual_seed(3)
    delta, x = torch.randn(24, 16, generator=g), torch.randn(80, 16, generator=g)
    rows = torch.rand(24, generator=g).pow(4) * 10 + 1e-3  # (O,) very uneven
    c = act.second_moment(x)
    wh = act.Whitener.of(c, 1e-6)
    cd = act.damped(c, 1e-6)

    def weighted_err(u: torch.Tensor, v: torch.Tensor) -> float:
        return act.quad_error(weigh_rows(delta - u @ v, rows), cd)

    spec = act.twin_spectrum(weigh_rows(delta, rows), wh)
    for r in (1, 3, 8):
        u, v = act.twin_factors(weigh_rows(delta, rows), wh, r)
        u = u / rows.sqrt()[:, None]
        assert abs(weighted_err(u, v) - float(spec[r:].sum())) <= 1e-3 * float(spec.sum())
        assert weighted_err(u, v) < weighted_err(*act.twin_factors(delta, wh, r))
    assert torch.equal(weigh_rows(delta, torch.ones(24)), delta)


@pytest.mark.parametrize(("budget", "sensitivity"), [("1.2x", "fisher"), ("20x", "fisher"), ("1.2x", "fisher_global")])
def test_fisher_allocation_within_budget_and_exact_when_everything_fits(pool: dict, budget: str,
                                                                        sensitivity: str) -> None:
    raw = _recipe(pool, pool["full"], budget, ranks=[1, 4, 32], sensitivity=sensitivity)
    recipe = recipe_from_dict(raw)
    plan = plan_for(recipe, progress=False, device="cpu")
    out = pool["root"] / f"{sensitivity}_{budget}"
    moerge.build(recipe, out, force=True, progress=False, device="cpu")
    assert plan.routed
    assert _file_bytes(out) <= float(budget.rstrip("x")) * plan.base_bytes()
    if budget == "20x":
        assert len(_load(out).config.moerge["units"]) == 4
        _assert_forced_reproduces(out, pool["full"])


def test_row_weights_normalise_per_expert_or_over_all() -> None:
    """``fisher``: mean 1 over each expert's rows; ``fisher_global``: mean 1 over all, the same shape per expert
    (a constant factor apart), so the more sensitive expert weighs more; floored, never zero."""
    from moerge.pipeline import moments as mom
    from moerge.pipeline.allocate import row_weights

    g = torch.Generator().manual_seed(0)
    lins = ["a", "b"]
    ms = [mom.Moments({}, 10, c={mom.GRAD + p: torch.rand(n, generator=g) * k for p, n in zip(lins, (6, 4))})
          for k in (1.0, 50.0)]
    ms[0]._c[mom.GRAD + "a"][0] = 0.0
    per, glob = row_weights(ms, lins), row_weights(ms, lins, per_expert=False)
    for rows in per:
        assert abs(float(torch.cat([rows[p] for p in lins]).mean()) - 1) < 1e-3
    assert abs(float(torch.cat([r[p] for r in glob for p in lins]).mean()) - 1) < 1e-3
    for e in (0, 1):
        ratio = torch.cat([glob[e][p] / per[e][p] for p in lins])[1:]  # (the floored entry aside)
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)
    assert float(glob[1]["b"].mean()) > 10 * float(glob[0]["b"].mean())
    assert float(per[0]["a"].min()) > 0


# ---------------------------------------------------------------- add-expert on an allocated checkpoint

@pytest.mark.parametrize("budget", ["20x", "1.35x"])
def test_add_expert_to_an_allocated_checkpoint(pool: dict, tmp_path: Path, budget: str) -> None:
    """Mixed kinds, and ranks / densities per expert: the new expert takes, per linear, the unit's kind at the size
    of the largest stored expert; old experts keep their logits bit for bit; where everything fits (20x) the
    forced new expert reproduces it (its layer norms folded in as the build folds the others')."""
    from moerge.routing.add_expert import add_expert

    raw = _recipe(pool, [pool["full"][0], pool["mlp"][0]], budget)
    out = tmp_path / "alloc"
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False, device="cpu")
    moe = _load(out)
    before = {}
    for e in ("e0", "e1"):
        moe.force_route(e)
        before[e] = _logits(moe)
    add_expert(out, "e2", pool["full"][1], {"e2": {"data": str(pool["data"][TASKS[0]]), "chat_template": True}})
    moe = _load(out)
    units = moe.config.moerge["units"]
    assert units and moe.config.moerge["experts"] == ["e0", "e1", "e2"]
    for unit in units.values():
        for lin in unit["linears"].values():
            *old, new = lin["experts"]
            key = {"twin": "U", "sparse": "indices"}.get(unit["kind"])
            if key is not None:
                assert new[key] == max((s[key] for s in old), key=lambda shape: shape[-1])  # (O, r) or (k,)
            else:
                assert new == old[0]
    for e in ("e0", "e1"):
        moe.force_route(e)
        assert torch.equal(_logits(moe), before[e]), e
    if budget == "20x":
        moe.force_route("e2")
        assert (_logits(moe) - _logits(_load(pool["full"][1]))).abs().max() <= 1e-4
