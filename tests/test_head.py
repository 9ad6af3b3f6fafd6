"""The output head as a routed unit (``routing.head``), on tiny full-rank experts that move every tensor.

Invariants: with an untied head and unchanged input embeddings, a budget that fits everything routes every unit
and the head exactly (forced routes reproduce each expert's logits, its final norm folded into its head); with
tied embeddings the checkpoint stores the embedding once (no ``lm_head.weight``), each expert's head tensors on
top, and a forced route equals the expert whose *input* embedding is the merge (the part that stays static); the
files stay within the budget; row-block and whole-tensor builds write the same bytes; the checkpoint loads in a
fresh process without moerge and generates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from isolation import fresh_process_logits
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moerge
from moerge.pipeline import plan_for
from moerge.recipe import recipe_from_dict
from moerge.testing import tiny

TASKS = ("sentiment", "topic")
NOT_EMBED = ("self_attn", "mlp", "layernorm", "model.norm", "lm_head")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two llama bases (hidden 32, 2 layers): untied, with experts moving everything but the input embedding; tied,
    with experts moving every tensor (the tied embedding, so the head, included)."""
    root = tmp_path_factory.mktemp("head")
    untied = tiny.make_base(root / "untied", family="llama", hidden=32, layers=2, tie=False, seed=0)
    tied = tiny.make_base(root / "tied", family="llama", hidden=32, layers=2, tie=True, seed=1)
    return {"root": root, "untied": untied, "tied": tied,
            "untied_experts": [tiny.make_full_expert(untied, root / f"u{i}", seed=10 + i, scale=0.5,
                                                     modules=NOT_EMBED) for i in range(2)],
            "tied_experts": [tiny.make_full_expert(tied, root / f"t{i}", seed=20 + i, scale=0.5) for i in range(2)],
            "data": {t: tiny.make_task_data(root / "data" / f"{t}.jsonl", t, 16, seed=1) for t in TASKS}}


def _recipe(pool: dict, which: str, budget: str = "20x", **routing) -> dict:
    experts = [{"name": f"e{i}", "source": str(s),
                "calibration": {"data": str(pool["data"][TASKS[i]]), "max_samples": 16, "chat_template": True}}
               for i, s in enumerate(pool[f"{which}_experts"])]
    spec = {"select": {"budget": budget, "metric": "activation"}, "modules": "both", "head": True,
            "allocate": {"kinds": ["twin", "bit1", "dense"], "ranks": [1, 4, 32]},
            "router": {"level": "sequence", "init": "prototype"}, **routing}
    return {"base": str(pool[which]), "experts": experts, "merge": {"method": "task_arithmetic", "lambda": 0.5},
            "routing": spec}


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 99, 7, 256, 3, 11]])


def _load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _tensor_names(folder: Path) -> set[str]:
    out: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            out |= set(sf.keys())
    return out


def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_untied_head_routed_exactly_when_everything_fits(pool: dict) -> None:
    out = pool["root"] / "untied_all"
    moerge.build(recipe_from_dict(_recipe(pool, "untied")), out, force=True, progress=False, device="cpu")
    moe = _load(out)
    units = moe.config.moerge["units"]
    assert "lm_head" in units and list(units["lm_head"]["linears"]) == [""]
    assert len(units) == 5  # 2 layers x (attention, MLP) + the head
    for e, src in enumerate(pool["untied_experts"]):
        moe.force_route(f"e{e}")
        err = (_logits(moe) - _logits(_load(src))).abs().max()
        assert err <= 1e-4, (e, float(err))
    moe.force_route({})  # the shared weights: the merged model (task arithmetic, lambda 0.5)
    assert (_logits(moe) - _logits(_load(src))).abs().max() > 1e-2


def _expert_with_merged_input_embedding(src: Path, merged_embed: torch.Tensor) -> torch.nn.Module:
    model = _load(src)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie: the head keeps the expert's own
    model.get_input_embeddings().weight = torch.nn.Parameter(merged_embed.clone())
    return model


def test_tied_head_stores_experts_on_the_merged_embedding(pool: dict, tmp_path: Path) -> None:
    out = pool["root"] / "tied_all"
    moerge.build(recipe_from_dict(_recipe(pool, "tied")), out, force=True, progress=False, device="cpu")
    names = _tensor_names(out)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert all(any(n.startswith(f"lm_head.experts.{e}.") for n in names) for e in (0, 1))
    moe = _load(out)
    embed = moe.get_input_embeddings().weight
    assert moe.get_output_embeddings().weight is embed  # still tied in the loaded model
    for e, src in enumerate(pool["tied_experts"]):
        moe.force_route(f"e{e}")
        want = _logits(_expert_with_merged_input_embedding(src, embed.detach()))
        err = (_logits(moe) - want).abs().max()
        assert err <= 1e-4, (e, float(err))
    moe.force_route("e1")
    assert (fresh_process_logits(out, _ids(), "e1", tmp_path) - _logits(moe)).abs().max() <= 1e-5


@pytest.mark.parametrize("budget", ["1.3x", "1.6x"])
def test_head_plans_stay_within_budget(pool: dict, budget: str) -> None:
    recipe = recipe_from_dict(_recipe(pool, "tied", budget))
    plan = plan_for(recipe, progress=False, device="cpu")
    out = pool["root"] / f"tied_{budget}"
    moerge.build(recipe, out, force=True, progress=False, device="cpu")
    assert plan.routed
    assert _file_bytes(out) <= float(budget.rstrip("x")) * plan.base_bytes(), (_file_bytes(out), plan.base_bytes())


def test_row_blocks_write_the_same_head(pool: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A uniform twin plan (every unit and the head) built from whole tensors and in tiny row blocks."""
    raw = _recipe(pool, "tied")
    raw["routing"] = {"select": {"all": True}, "modules": "both", "head": True, "expert": {"kind": "twin", "rank": 4},
                      "router": {"level": "sequence", "init": "prototype"}}
    whole, blocks = pool["root"] / "twin_whole", pool["root"] / "twin_blocks"
    moerge.build(recipe_from_dict(raw), whole, force=True, progress=False, device="cpu")
    monkeypatch.setenv("MOERGE_BLOCK_BYTES", "512")
    moerge.build(recipe_from_dict(raw), blocks, force=True, progress=False, device="cpu")
    names = _tensor_names(whole)
    assert names == _tensor_names(blocks) and "lm_head.experts.0.U" in names and "lm_head.weight" not in names
    a, b = _load(whole), _load(blocks)
    for e in ("e0", "e1"):
        a.force_route(e)
        b.force_route(e)
        assert (_logits(a) - _logits(b)).abs().max() <= 1e-4


def test_add_expert_to_a_routed_tied_head(pool: dict, tmp_path: Path) -> None:
    """add-expert reads the tied head from the input embedding: old experts keep their logits bit for bit, and at a
    budget that fits everything the new expert equals itself with the merged input embedding (its final norm folded
    into its head as the build folds the others')."""
    from moerge.routing.add_expert import add_expert

    raw = _recipe(pool, "tied")
    raw["experts"] = raw["experts"][:1]
    raw["routing"]["allocate"]["kinds"] = ["twin", "dense"]
    out = tmp_path / "one"
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False, device="cpu")
    moe = _load(out)
    moe.force_route("e0")
    before = _logits(moe)
    add_expert(out, "e1", pool["tied_experts"][1], {"e1": {"data": str(pool["data"][TASKS[1]]), "chat_template": True}})
    moe = _load(out)
    assert moe.config.moerge["experts"] == ["e0", "e1"] and "lm_head" in moe.config.moerge["units"]
    moe.force_route("e0")
    assert torch.equal(_logits(moe), before)
    moe.force_route("e1")
    want = _logits(_expert_with_merged_input_embedding(pool["tied_experts"][1], moe.get_input_embeddings().weight))
    assert (_logits(moe) - want).abs().max() <= 1e-4


def test_calibrate_and_remove_expert_with_a_routed_head(pool: dict, tmp_path: Path) -> None:
    """Supervised calibration trains the router through the routed head; removing an expert keeps the other's
    forced logits bit for bit."""
    from moerge.routing.calibrate import CalibrateOptions, calibrate
    from moerge.routing.remove_expert import remove_expert

    out = tmp_path / "tied"
    moerge.build(recipe_from_dict(_recipe(pool, "tied", "1.6x")), out, force=True, progress=False, device="cpu")
    data = {f"e{i}": {"data": str(pool["data"][t]), "chat_template": True} for i, t in enumerate(TASKS)}
    report = calibrate(out, data, options=CalibrateOptions(method="supervised"))
    assert report is not None
    moe = _load(out)
    assert "lm_head" in moe.config.moerge["units"] and moe.config.moerge["initialized"]
    moe.force_route("e1")
    before = _logits(moe)
    remove_expert(out, "e0")
    moe = _load(out)
    assert moe.config.moerge["experts"] == ["e1"]
    moe.force_route("e1")
    assert torch.equal(_logits(moe), before)
    moe.force_route(None)
    assert moe.generate(_ids(), max_new_tokens=3, do_sample=False).shape == (1, _ids().shape[1] + 3)


def test_tied_head_over_the_base_keeps_the_written_embedding_as_its_shared_weight(pool: dict) -> None:
    """``shared: base`` routes the layers' linears over the base, but a tied head's W_s is the embedding as written
    (the static merge): forced routes still give each expert's head on the merged input embedding."""
    raw = _recipe(pool, "tied")
    raw["routing"] = {"select": {"all": True}, "modules": "both", "head": True, "shared": "base",
                      "expert": {"kind": "twin", "rank": 32}, "router": {"level": "sequence", "init": "prototype"}}
    out = pool["root"] / "twin_over_base"
    moerge.build(recipe_from_dict(raw), out, force=True, progress=False, device="cpu")
    moe = _load(out)
    assert moe.config.moerge["shared"] == "base"
    for e, src in enumerate(pool["tied_experts"]):
        moe.force_route(f"e{e}")
        want = _logits(_expert_with_merged_input_embedding(src, moe.get_input_embeddings().weight.detach()))
        assert (_logits(moe) - want).abs().max() <= 1e-4, e


def test_head_moments_and_fisher_are_the_final_hidden_states(pool: dict) -> None:
    """The head's input moment is Σ_t h_t h_tᵀ of the decoder's output at every real token (batched and padded,
    against one unpadded prompt at a time); its gradient moment is Σ (∂ℓ/∂logits)² at each prompt's last token."""
    from moerge.pipeline import moments as mom
    from moerge.pipeline.context import BuildContext

    raw = _recipe(pool, "tied")
    raw["routing"]["allocate"]["sensitivity"] = "fisher"
    ctx = BuildContext.open(recipe_from_dict(raw))
    lins = ["model.layers.1.mlp.down_proj", "lm_head"]
    texts = ["good movie loved it", "the market report today was long and dull", "ok"]
    tok = ctx.tokenizer()
    m = mom.collect(ctx, 0, texts, tok, lins, fisher=True)
    model = mom.expert_model(ctx, 0)
    c = torch.zeros(32, 32, dtype=torch.float64)
    g2 = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for t in texts:
        with torch.no_grad():
            hidden = model.model(**tok([t], return_tensors="pt", add_special_tokens=False)).last_hidden_state[0]
            z = model.lm_head(hidden[-1])  # (V,)
        c += hidden.double().T @ hidden.double()  # (T, H) -> (H, H)
        p = torch.softmax(z.double(), -1)
        p[z.argmax()] -= 1.0  # ∂(-log p_top)/∂z
        g2 += p.pow(2)
    assert m.site["lm_head"] == "lm_head" and torch.allclose(m.of("lm_head"), c, rtol=1e-4, atol=1e-5)
    assert torch.allclose(m.grad("lm_head"), g2, rtol=1e-3, atol=1e-4 * float(g2.max()))
    assert m.of("model.layers.1.mlp.down_proj").shape[0] != 32  # the other linears keep their own moments
